"""``awq``: activation-aware weight quantization (Lin et al. 2024, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration"), after the reference code mit-han-lab/llm-awq
(``awq/quantize/pre_quant.py :: run_awq``, ``auto_scale.py``, ``auto_clip.py``).

Each decoder layer's linears are grouped by the input they read, as the reference groups them:
q/k/v (input norm before them), o_proj (after v_proj), gate/up (norm before them), down_proj (after
up_proj). A group's input channels j get scales s_j = m_j^α / sqrt(max m^α · min m^α), with m_j the mean
|x_j| over the calibration tokens and α on the grid 0, 0.05, ..., 0.95 chosen by the smallest mean
squared error of the group's output with every linear of the group replaced by Q(W·diag(s))·diag(s)⁻¹
(Q: ``bits``-bit round-to-nearest in groups of ``group`` inputs, rtn's grid): the output of the
attention or MLP module for a group that opens it, of the linear itself otherwise. As in the
reference, o_proj is scaled only without grouped-query attention (its scales must fold into v_proj's
rows). Then, with ``clip``, every linear except q and k (names with ``q_``/``k_``, the reference's rule)
searches per output row and group a clipping range ±(1 - i/20)·max|w|, i = 0..9, minimizing the error
of that group's partial outputs on up to 512 of the calibration tokens. The final weight is
Q(clip(W·diag(s)))·diag(s)⁻¹: the same product as the reference's, which folds diag(s)⁻¹ into the
previous norm or linear instead (a foldable previous op is why o_proj under GQA is not scaled).
Scales and clips are searched on the full-precision model's activations, as the reference does; the
weights change only after every layer is searched. ``bits: 16`` leaves the model unchanged. Weights
are restored on exit.

Differences from the reference:
- the grid is fidbench's (``_weights.fake_quant``, as ``rtn`` and ``gptq``): with ``zero_point:
  integer`` (default) the zero point is rounded to an integer level as the reference's
  ``pseudo_quantize_tensor`` rounds it, the range widened to hold 0 as GPTQ's quantizer does (the same
  grid for every group holding both signs); ``float`` keeps each group's minimum as the offset; a row
  whose width is not a multiple of ``group`` ends in a shorter group (the reference asserts divisibility);
- groups, the module whose output a group's scales are judged on, and whether a group opens its
  module are found from the forward itself (linears reading one tensor; the decoder layer's child
  holding them), so every family runs; the reference lists projection names per architecture;
- calibration: the suite's ``dataset`` prompts, with ``continued`` each followed by the base model's
  greedy continuation, one forward each (the default suites: 16 prompts, about 2,200 tokens), instead
  of 128 blocks of 512 tokens of pile-val in one batch; a
  prompt-weighted mean of squared errors replaces the batch mean (the same when lengths are equal);
- clipping errors are computed as matrix products (the reference sums elementwise products), on every
  (n // 512)-th token as the reference samples them, every token when n < 1024 (the reference's step
  is 0, an error, below 512).
"""

import contextlib
from typing import Literal

import torch

from . import _weights as weights
from .base import register

GRID = 20  # scale exponents 0, 1/20, ..., 19/20 (auto_scale.py: n_grid)
SHRINK = 10  # clipping ranges (1 - i/20) · max|w|, i < 10 (auto_clip.py: n_grid=20, max_shrink=0.5)
CLIP_TOKENS = 512  # auto_clip.py: n_sample_token
UNCLIPPED = ("q_", "k_", "query", "key", "Wqkv")  # auto_clip.py: "due to qk bmm, it is hard to clip precisely"


def scale_candidates(x_mean: torch.Tensor):
    """The reference's 20 candidate scale vectors for mean input magnitudes ``x_mean``."""
    for i in range(GRID):
        s = x_mean.pow(i / GRID).clamp(min=1e-4)
        yield s / (s.max() * s.min()).sqrt()


def clip_search(w: torch.Tensor, x: torch.Tensor, bits: int, group: int, integer_zero: bool = True) -> torch.Tensor:
    """Per (output row, input group) clipping bound of ``w`` (float32, scaled) for inputs ``x`` (tokens, in)."""
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)]
    group = group or w.shape[1]
    bounds = []
    for g0 in range(0, w.shape[1], group):
        wg, xg = w[:, g0 : g0 + group], x[:, g0 : g0 + group]
        top = wg.abs().amax(1)
        best, best_err = top.clone(), torch.full_like(top, torch.inf)
        for i in range(SHRINK):
            bound = top * (1 - i / GRID)
            q = weights.fake_quant(wg.clamp(-bound[:, None], bound[:, None]), bits, 0, False, integer_zero)
            err = (xg @ (q - wg).T).square().mean(0)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, bound, best)
        bounds.append(best)
    return torch.stack(bounds, 1)


def clipped(w: torch.Tensor, bounds: torch.Tensor, group: int) -> torch.Tensor:
    """``w`` clamped to ±bound per (row, input group)."""
    cols = torch.arange(w.shape[1], device=w.device) // (group or w.shape[1])
    b = bounds[:, cols]
    return torch.maximum(torch.minimum(w, b), -b)


@register
class AWQ(weights.Calibrated):
    name = "awq"
    description = ("AWQ: per-input-channel scales searched on `dataset` activations, then `bits` round-to-nearest "
                   "in groups of `group`")
    defaults_from = ("llm-awq scripts (w_bit 4, q_group_size 128, zero point, auto_scale + auto_clip: n_grid 20, "
                     "max_shrink 0.5); calibration (dataset, samples, continued): fidbench's suite settings")
    kind = "weights"
    test_params = {"degenerate": {"bits": 16}, "real": {"bits": 3, "group": 32}}
    bits: int = 4
    group: int = 128
    zero_point: Literal["integer", "float"] = "integer"
    clip: bool = True

    def validate(self):
        weights.check_bits(self.name, self.bits, self.group)
        super().validate()

    @property
    def integer_zero(self) -> bool:
        return self.zero_point == "integer"

    @contextlib.contextmanager
    def apply(self, model, context=None):
        prompts = self.calibration(context)
        lins = weights.decoder_linears(model)
        plan = {}
        with weights.restored(lin.weight for lin in lins):
            if self.bits < 16:
                plan = self.search(model, prompts)
                with torch.no_grad():
                    for lin, (s, bounds) in plan.items():
                        w = lin.weight.float() * s
                        if bounds is not None:
                            w = clipped(w, bounds, self.group)
                        q = weights.fake_quant(w, self.bits, self.group, False, self.integer_zero)
                        lin.weight.copy_((q / s).to(lin.weight.dtype))
            self._report = {**weights.quant_report([lin.weight for lin in lins], self.bits, self.group, False),
                            "scaled_layers": sum(bool((s != 1).any()) for s, _ in plan.values()),
                            "clipped_layers": sum(b is not None for _, b in plan.values()),
                            **self.calibration_report(prompts)}
            yield model

    @torch.no_grad()
    def search(self, model, prompts) -> dict:
        """Each decoder linear -> (input scales s, clipping bounds or None), from the full-precision model."""
        inputs: dict = {}  # linear -> its inputs, one (tokens, in) tensor per prompt
        calls: dict = {}  # child of the layer being searched -> its (args, kwargs), one per prompt
        plan = {}
        current = []  # the layer being searched

        def watch(layer):  # during the layer's observing run: record its children's calls
            current[:] = [layer]

            def record(module, args, kwargs):
                calls.setdefault(module, []).append((args, kwargs))

            return [child.register_forward_pre_hook(record, with_kwargs=True)
                    for child in layer.children() if weights.linears(child)]

        def observe(lin, x):
            inputs.setdefault(lin, []).append(x)

        def transform(layer_linears):
            layer = current[0]
            for lins, child, opens in self.groups(layer, layer_linears, inputs):
                xs = inputs[lins[0]]
                if opens:  # judged on the attention / MLP output, the module run on its own inputs
                    run, args = (lambda c, child=child: _first(child(*c[0], **c[1]))), calls[child]
                elif getattr(child, "num_key_value_groups", 1) > 1:  # o_proj under GQA: no op to fold into
                    plan.update({lin: (torch.ones_like(xs[0][0], dtype=torch.float32), None) for lin in lins})
                    continue
                else:  # a linear after a linear (o_proj, down_proj): judged on its own output
                    run, args = lins[0], xs
                s = self.best_scales(lins, run, args, torch.cat(xs).float().abs().mean(0))
                plan.update({lin: (s, None) for lin in lins})
            if self.clip:
                names = {m: n for n, m in layer.named_modules()}
                for lin in layer_linears:
                    if not any(k in names[lin] for k in UNCLIPPED):
                        s = plan[lin][0]
                        x = torch.cat(inputs[lin]).float() / s  # what the scaled weights will read
                        bounds = clip_search(lin.weight.float() * s, x, self.bits, self.group, self.integer_zero)
                        plan[lin] = (s, bounds)
            inputs.clear()
            calls.clear()

        weights.sequential(model, prompts, observe, transform, watch)
        return plan

    @staticmethod
    def groups(layer, layer_linears, inputs):
        """(linears reading one input, the layer's child holding them, whether they open it), in forward order."""
        groups = []
        for lin in layer_linears:  # inputs were recorded in forward order, layer_linears in module order
            same = next((g for g in groups if all(torch.equal(a, b) for a, b in zip(inputs[g[0]], inputs[lin]))), None)
            if same is None:
                groups.append([lin])
            else:
                same.append(lin)
        groups.sort(key=lambda g: list(inputs).index(g[0]))
        children = [c for c in layer.children() if weights.linears(c)]
        out, seen = [], set()
        for g in groups:
            child = next(c for c in children if any(g[0] is m for m in c.modules()))
            out.append((g, child, child not in seen))
            seen.add(child)
        return out

    def best_scales(self, lins, run, args, x_mean):
        """The candidate scales whose quantized group output is closest to the full-precision one (first of ties)."""
        reference = [run(a) for a in args]
        originals = [lin.weight.detach().clone() for lin in lins]
        best, best_loss = None, float("inf")
        for s in scale_candidates(x_mean):
            for lin, w in zip(lins, originals):
                q = weights.fake_quant(w.float() * s, self.bits, self.group, False, self.integer_zero) / s
                lin.weight.copy_(q.to(w.dtype))
            loss = sum((run(a).float() - r.float()).square().sum() for a, r in zip(args, reference))
            loss = float(loss) / sum(r.numel() for r in reference)
            if loss < best_loss:
                best, best_loss = s, loss
            for lin, w in zip(lins, originals):
                lin.weight.copy_(w)
        if best is None:
            raise ValueError(f"awq: no finite output error for any scale of a group of {len(lins)} linear(s)")
        return best


def _first(out):
    return out[0] if isinstance(out, tuple) else out
