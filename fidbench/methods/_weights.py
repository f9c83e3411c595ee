"""Helpers shared by the weight methods (rtn, gptq, awq, magnitude, wanda, sparsegpt): grouped
quantize-dequantize, pruning masks, the decoder's linear layers, calibration statistics (the layer
Hessians of GPTQ and SparseGPT and their inverse's Cholesky factor), and restoring the weights.

Layers are found by type (``nn.Linear`` inside the decoder layers), never by projection names, so any
decoder-only model works. All transforms are simulated in place: the weights keep the model's dtype.
"""

from __future__ import annotations

import contextlib
import re

import torch
from torch import nn

from .base import Method

SCALE_BITS = 16  # a scale (and a zero point, asymmetric) per group, stored in fp16 as real kernels do


def fake_quant(x: torch.Tensor, bits: int, group: int, symmetric: bool, integer_zero: bool = False) -> torch.Tensor:
    """Quantize-dequantize ``x`` along its last dim in groups of ``group`` (0: the whole dim; a shorter last group).

    Computed in float32 with ``quant_params``/``quant_apply``, returned in ``x``'s dtype.
    """
    n = x.shape[-1]
    group = group or n
    full = n - n % group
    parts = [x[..., :full].unflatten(-1, (full // group, group))] if full else []
    if full < n:
        parts.append(x[..., full:].unsqueeze(-2))
    out = [quant_apply(p.float(), *quant_params(p.float(), bits, symmetric, integer_zero), bits, symmetric).flatten(-2)
           for p in parts]
    return torch.cat(out, dim=-1).to(x.dtype)


def quant_params(x: torch.Tensor, bits: int, symmetric: bool, integer_zero: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) of each group = x's last dim, kept for broadcasting.

    Asymmetric: ``2**bits`` levels from the group's min (the offset, stored like KIVI and llama.cpp's
    Q4_1 store it) to its max. ``integer_zero``: GPTQ's quantizer instead (IST-DASLab/gptq ``quant.py``,
    ``Quantizer.find_params``): the range widened to hold 0, then the zero point ``round(-min / scale)``
    an integer level, so 0 is exactly representable and the grid is shifted by up to half a step (AWQ's
    ``pseudo_quantize_tensor`` rounds the zero point the same way and gives the same grid for every group
    holding both signs). Symmetric: levels ``-q..q``, ``q = 2**(bits-1) - 1``, scaled to the group's max
    magnitude, offset 0. Either way a value of the group moves by at most half a step (GPTQ's
    per-column updates may leave the grid: ``quant_apply`` clamps).
    """
    if symmetric:
        scale = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        offset = torch.zeros_like(scale)
    elif integer_zero:
        lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (2**bits - 1)
        scale = torch.where(scale > 0, scale, 1.0)  # an all-zero group: zero point 0, exact
        return scale, -torch.round(-lo / scale) * scale
    else:
        offset = x.amin(-1, keepdim=True)
        scale = (x.amax(-1, keepdim=True) - offset) / (2**bits - 1)
    return torch.where(scale > 0, scale, 1.0), offset  # a constant group is exactly its offset


def quant_apply(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """Round ``x`` to the grid of (scale, offset), clamped to the ``bits`` levels (GPTQ's updated weights may
    leave it)."""
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    return torch.clamp(torch.round((x - offset) / scale), lo, hi) * scale + offset


def check_bits(method: str, bits: int, group: int, allowed=(2, 3, 4, 8, 16)) -> None:
    if bits not in allowed:
        raise ValueError(f"{method}: bits must be one of {', '.join(map(str, allowed))} (16 = unchanged), got {bits}")
    if group < 0:
        raise ValueError(f"{method}: group must be a positive number of columns, or 0 for one group per row; "
                         f"got {group}")


def quant_report(weights, bits: int, group: int, symmetric: bool) -> dict:
    """What a quantization changed: bits, bits per weight with fp16 scales/offsets, layers and weights touched."""
    total = sum(w.numel() for w in weights)
    extra = sum(w.numel() * overhead_bits(w.shape[-1], group, symmetric) for w in weights) if bits < 16 else 0
    return {"bits": bits, "effective_bits": bits + extra / max(total, 1),
            "layers": len(weights) if bits < 16 else 0, "weights": total if bits < 16 else 0}


def overhead_bits(columns: int, group: int, symmetric: bool) -> float:
    """Scale/zero bits per weight for rows of ``columns`` quantized in groups of ``group``."""
    groups = -(-columns // (group or columns))
    return groups * SCALE_BITS * (1 if symmetric else 2) / columns


def check_damp(method: str, damp: float) -> None:
    """GPTQ-style dampening (gptq, sparsegpt): a fraction of the mean Hessian diagonal, in [0, 1]."""
    if not 0 <= damp <= 1:
        raise ValueError(f"{method}: damp must be in [0, 1], got {damp}")


def check_pruning(method: str, sparsity: float | None, pattern: str | None) -> tuple[int, int] | None:
    """Validate a pruning target: exactly one of ``sparsity`` in [0, 1) or an N:M ``pattern``; returns (N, M) or
    None."""
    if (sparsity is None) == (pattern is None):
        raise ValueError(f"{method}: give exactly one of sparsity (e.g. 0.5) or pattern (e.g. '2:4')")
    if pattern is None:
        if not 0 <= sparsity < 1:
            raise ValueError(f"{method}: sparsity must be in [0, 1), got {sparsity}")
        return None
    match = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise ValueError(f"{method}: pattern must be 'N:M' with 1 <= N <= M (keep N of every M inputs, e.g. '2:4'), "
                         f"got {pattern!r}")
    return int(match[1]), int(match[2])


def prune_report(weights, nm: tuple[int, int] | None) -> dict:
    """What a pruning changed: the fraction of zero weights reached (measured), layers and weights touched."""
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    return {"sparsity": zeros / max(total, 1), "pattern": f"{nm[0]}:{nm[1]}" if nm else None,
            "layers": len(weights), "weights": total}


def prune_mask(score: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """Bool mask of the weights to keep: the highest ``score`` ones.

    N:M keeps the N best of every M consecutive inputs of a row; otherwise exactly
    ``round(sparsity * size)`` weights with the lowest scores go, per row or over the whole matrix.
    """
    rows, cols = score.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise ValueError(f"pattern {n}:{m}: a layer has {cols} inputs, not a multiple of {m}")
        blocks = score.reshape(rows, cols // m, m)
        drop = blocks.topk(m - n, dim=-1, largest=False).indices
        return torch.ones_like(blocks, dtype=torch.bool).scatter_(-1, drop, False).reshape(rows, cols)
    flat = score if per_row else score.reshape(1, -1)
    k = round(sparsity * flat.shape[1])
    drop = flat.topk(k, dim=-1, largest=False).indices
    return torch.ones_like(flat, dtype=torch.bool).scatter_(-1, drop, False).reshape(rows, cols)


def decoder_layers(model) -> nn.ModuleList:
    """The decoder's stack of layers: the ModuleList of ``num_hidden_layers`` blocks."""
    count = model.config.get_text_config().num_hidden_layers
    # transformers 4.56's get_decoder() returns None on *ForCausalLM models; the whole model then.
    for module in (model.get_decoder() or model).modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def linears(layer: nn.Module) -> list[nn.Linear]:
    return [m for m in layer.modules() if isinstance(m, nn.Linear)]


def decoder_linears(model) -> list[nn.Linear]:
    """Every nn.Linear inside the decoder layers (not the embeddings, not lm_head)."""
    return [lin for layer in decoder_layers(model) for lin in linears(layer)]


@contextlib.contextmanager
def restored(params):
    """Put ``params`` back bit for bit on exit, whatever the block did to them. The copies wait in host
    memory: kept beside the model on a GPU they would double its weights' share of the device's memory
    (an 8B model's 15 GB) for the whole run."""
    params = list({id(p): p for p in params}.values())  # tied weights once
    saved = [p.detach().to("cpu", copy=True) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


class _Stop(Exception):
    """Raised after the last decoder layer: the model's head need not run."""


def _stop(*_):
    raise _Stop


def _layer_calls(model, layers, ids: list[int]) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
    """One forward of ``ids``: the first layer's input hidden states, and each layer's other arguments (masks and
    position embeddings differ between layers in some families, e.g. Gemma 3's sliding and full layers)."""
    calls = []

    def record(module, args, kwargs):
        kwargs = dict(kwargs)
        if "hidden_states" in kwargs:
            hidden, rest = kwargs.pop("hidden_states"), args
        else:
            hidden, rest = args[0], args[1:]
        calls.append((None if calls else hidden, rest, kwargs))  # later layers' inputs are computed, not kept

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    hooks.append(layers[-1].register_forward_hook(_stop))
    try:
        with contextlib.suppress(_Stop):
            device = model.get_input_embeddings().weight.device
            model(input_ids=torch.tensor([ids], device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return calls[0][0], [(a, k) for _, a, k in calls]


def _run(layer, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    out = layer(hidden, *call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out  # a tuple in transformers 4.x


@torch.no_grad()
def sequential(model, prompts: list[list[int]], observe, transform, watch=None) -> None:
    """Calibrate and transform the decoder one layer at a time, as GPTQ and Wanda do.

    For layer i: run it on every prompt's hidden states (the outputs of layers before i, already
    transformed), calling ``observe(linear, x)`` with each (tokens, in_features) input of its linear
    layers; ``transform(linears)`` changes its weights; then it runs again to give layer i+1 its inputs.
    ``watch(layer)``, if given, returns hooks of its own to hold during that observing run only.
    One forward per prompt records each layer's arguments, so each layer runs twice per prompt (the
    reference's layer-input cache), where re-running the model up to layer i would cost L²/2 layers.
    """
    layers = decoder_layers(model)
    hidden, calls = [], []
    for ids in prompts:
        h, c = _layer_calls(model, layers, ids)
        hidden.append(h)
        calls.append(c)
    for i, layer in enumerate(layers):
        lins = linears(layer)
        hooks = [lin.register_forward_hook(lambda m, args, out: observe(m, args[0].reshape(-1, args[0].shape[-1])))
                 for lin in lins]
        hooks += watch(layer) if watch else []
        try:
            for h, c in zip(hidden, calls):
                _run(layer, h, c[i])
        finally:
            for h in hooks:
                h.remove()
        transform(lins)
        if i + 1 < len(layers):
            hidden = [_run(layer, h, c[i]) for h, c in zip(hidden, calls)]


class Hessians:
    """H = 2 X Xᵀ / n of each linear layer's calibration inputs X (n tokens), as GPTQ and SparseGPT use it.

    ``observe`` is ``sequential``'s observer; ``groups(linears)`` hands back (and forgets) a layer's
    Hessians, linears reading the same input (q/k/v, gate/up) together with their one Hessian.
    """

    def __init__(self):
        self._sums: dict = {}

    def observe(self, lin, x):
        x = x.float()
        h, n = self._sums.get(lin, (0, 0))
        self._sums[lin] = (h + x.T @ x, n + x.shape[0])

    def groups(self, lins) -> list[tuple[list, torch.Tensor]]:
        pending = [(lin, *self._sums.pop(lin)) for lin in lins]
        out = []
        while pending:
            same = [p for p in pending if torch.equal(p[1], pending[0][1])]
            pending = [p for p in pending if not any(p is s for s in same)]
            _, h, n = same[0]
            out.append(([lin for lin, _, _ in same], 2 * h / n))
        return out


def zero_dead_inputs(w: torch.Tensor, h: torch.Tensor) -> None:
    """Inputs never active in calibration (zero H diagonal): any weight is exact there, use 0 (in place)."""
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0


def inverse_cholesky(h: torch.Tensor, damp: float, method: str) -> torch.Tensor:
    """The upper Cholesky factor U of (H + damp · mean(diag H) · I)⁻¹ = UᵀU that GPTQ and SparseGPT update with.

    From one factorization: with J the reversal, JHJ = LLᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ(J L⁻¹ J), and J L⁻¹ J
    is upper triangular.
    """
    cols = h.shape[0]
    h = h + damp * h.diagonal().mean() * torch.eye(cols, device=h.device)
    try:
        lower = torch.linalg.cholesky(h.flip(0, 1))
    except torch.linalg.LinAlgError:
        raise ValueError(f"{method}: a layer's Hessian is not positive definite with damp={damp}; raise damp") from None
    return torch.linalg.solve_triangular(lower, torch.eye(cols, device=h.device), upper=False).flip(0, 1)


@contextlib.contextmanager
def one_thread():
    """Column loops (GPTQ, SparseGPT) are thousands of small CPU ops: intra-op threads cost more in hand-offs
    than they save (measured 20x slower with 2 threads than 1 on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Calibrated(Method):
    """A weight method calibrated on ``samples`` sequences of the suite dataset ``dataset`` (gptq, awq, wanda,
    sparsegpt). ``continued``: each prompt is followed by the base model's greedy continuation (its cached
    reference). The references calibrate on plain text (C4, pile-val), where every position is text like what
    is later evaluated; fidbench's calibration prompts are user turns only, while what it scores is the model's
    own continuation, so ``continued`` calibrates on both (the default suites' convention). A suite refuses a
    ``dataset`` that the variant also scores unless ``calibrate_on_scored`` (fidbench.suite)."""

    dataset: str = "chat"
    samples: int = 8
    continued: bool = False
    calibrate_on_scored: bool = False  # the suite allows calibrating on prompts the variant is scored on

    def validate(self):
        if self.samples < 1:
            raise ValueError(f"{self.name}: samples must be >= 1, got {self.samples}")

    def calibration(self, context) -> list[list[int]]:
        """The calibration sequences, read before the method changes any weight (continuations are generated
        by the model as it is)."""
        if context is None:
            raise ValueError(f"{self.name}: needs calibration prompts; apply it with the harness's context")
        return context.calibration(self.dataset, self.samples, self.continued)

    @staticmethod
    def calibration_report(seqs: list[list[int]]) -> dict:
        return {"calibration_prompts": len(seqs), "calibration_tokens": sum(len(p) for p in seqs)}

    def kept(self) -> dict:
        return getattr(self, "_report", {})  # filled by apply
