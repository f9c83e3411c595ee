"""``gear``: GEAR KV-cache compression (Kang et al. 2024, "GEAR: An Efficient KV Cache Compression Recipe
for Near-Lossless Generative Inference of LLM"), after the reference code opengear-project/GEAR
(``GEARLM/Simulated/compress_function.py :: compress_insert_function``, method "GEAR", and
``modeling_llama_new.py``'s streaming), with the parameter names of its configuration.

Each compressed stretch X of keys or values (batch, kv heads, tokens, head dim) becomes D + S + L:
- S, outliers kept exact: the ``k = int(H·D · left / 2)`` largest and the k smallest values (signed) of
  every token's H·D values for V, and as the reference does, of every key channel's values over the
  stretch's tokens for K (so a key channel of n tokens keeps 2k/n of its entries);
- D, the rest quantized to ``quantize_bit`` bits (uniform min-max, 2^b - 1 steps): K per channel in
  groups of ``group_size`` consecutive tokens, V per token in groups of ``group_size`` consecutive
  channels of H·D; outlier positions take the vector's mean first, so they do not stretch the grid;
- L, a rank-r approximation of the residual X - D - S, for each (batch, head) tokens × head-dim
  matrix, by ``loop`` power iterations from a uniform random start, orthonormalized (QR) only in the
  last one; r is ``prefillrank`` / ``prefillrankv`` for the prompt, ``rank`` / ``rankv`` later.

When (``schedule``):
- ``"reference"`` (default): what GEAR's own evaluation runs (``GenerationBench/GenerationTest/
  run_template_*.sh``: ``--compress_method GEAR --quantize_bit 2 --group_size 64 --left 0.02 --rank 2
  --rankv 2 --loop 3 --streaming --streaming_gap 64``, no ``--stream_grouping``; the original fidbench's
  ``config/gear.json`` the same) in ``modeling_llama_new.py``: its compressed prefill is discarded, so
  the prompt stays in full precision, and whenever a decode step starts with a cache length that is a
  multiple of ``streaming_gap``, the whole cache (prompt and tokens compressed before, again) is
  compressed with ``rank`` / ``rankv``; ``prefillrank(v)`` is unused;
- ``"paper"`` (the paper's Algorithm 1): the prompt's K/V are compressed once after the prefill;
  generated tokens wait in a full-precision buffer, compressed as one block when it holds
  ``streaming_gap`` tokens (after the query of the token that filled it).
``kept()["blocks_compressed"]``: the compressions holding generated tokens that decode queries read,
summed over the case's samples (counted on one layer): the paper's full blocks of ``streaming_gap``
generated tokens, the reference's recompressions of a cache longer than the prompt. With ``streaming_gap``
at least the reference length, the paper schedule compresses none (then only the prompt is compressed).
Prompt queries read full-precision K/V either way. This hook rebuilds, from the full-precision cache
the model holds, exactly what each decode query of a stepwise GEAR decode reads (as ``kivi`` does):
what a query reads depends only on its position and earlier tokens' K/V, and compression is
deterministic, so parallel teacher forcing is exact. Compressed stretches are computed once per
sample and layer. ``kept()["kv_quantized"]`` is the fraction of the K/V entries decode queries see that
they read compressed. Sliding-window layers stay in full precision, like every KV method's
(fidbench/methods/_kv.py): their entries count as visible and not compressed.

Differences from the reference:
- 2^b - 1 quantization steps with the values clamped to the grid (fidbench's ``fake_quant``); the
  reference uses b² - 1 steps, the same for b = 2 and 4 only; a constant group is exact (the
  reference divides by zero), and a stretch not a multiple of ``group_size`` ends in a shorter group
  (the reference leaves a trailing key remainder unquantized and rejects a value width that is not a
  multiple; its streaming schedules never produce either);
- the power iteration starts from a generator seeded with ``seed`` for every stretch (the reference
  draws an unseeded start each time), which makes results reproducible and parallel equal stepwise;
- compressed K/V keep the cache's dtype (the reference stores fp16), outlier counts are capped at half
  a vector (the reference fails when k exceeds it);
- the reference's ``stream_grouping: true`` branch (blocks aligned to absolute positions, its
  compressed prefill discarded too) is not provided.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..attention import AttentionCall
from ._kv import require_every_position
from ._weights import fake_quant
from .base import Method, register


def outliers_quantized(x: torch.Tensor, k: int, bits: int, group: int) -> torch.Tensor:
    """D + S for vectors along the last dim of ``x`` (float32): the k largest and k smallest values of each
    vector exact, the others quantized in groups of ``group`` (outliers replaced by the vector's mean first)."""
    k = min(k, x.shape[-1] // 2)
    if k == 0:
        return fake_quant(x, bits, group, False)
    idx = torch.cat([x.topk(k, dim=-1).indices, x.topk(k, dim=-1, largest=False).indices], dim=-1)
    filled = x.scatter(-1, idx, x.mean(-1, keepdim=True).expand_as(idx))
    return fake_quant(filled, bits, group, False).scatter(-1, idx, x.gather(-1, idx))


def low_rank(r: torch.Tensor, rank: int, loop: int, seed: int) -> torch.Tensor:
    """Rank-``rank`` approximation of each matrix r[..., :, :] by ``loop`` power iterations (QR in the last)."""
    generator = torch.Generator(device=r.device).manual_seed(seed)
    p = torch.rand(*r.shape[:-2], r.shape[-1], rank, generator=generator, device=r.device)
    for i in range(loop):
        if i == loop - 1:
            p = torch.linalg.qr(p).Q
        q = r @ p
        if i == loop - 1:
            q = torch.linalg.qr(q).Q
        p = r.transpose(-1, -2) @ q
    return q @ p.transpose(-1, -2)


def gear_compress(x: torch.Tensor, kind: str, bits: int, group: int, left: float, rank: int, loop: int,
                  seed: int) -> torch.Tensor:
    """GEAR's D + S + L of keys (``kind="key"``) or values ``x`` (batch, heads, tokens, dim), in x's dtype."""
    b, h, n, d = x.shape
    k = int(h * d * left / 2)
    xf = x.float()
    if kind == "key":  # channels along tokens
        ds = outliers_quantized(xf.permute(0, 1, 3, 2), k, bits, group).permute(0, 1, 3, 2)
    else:  # tokens along the H·D channels
        flat = xf.transpose(1, 2).reshape(b, n, h * d)
        ds = outliers_quantized(flat, k, bits, group).reshape(b, n, h, d).transpose(1, 2)
    out = ds + low_rank(xf - ds, rank, loop, seed) if rank > 0 else ds
    return out.to(x.dtype)


@register
class GEAR(Method):
    name = "gear"
    description = ("GEAR: KV cache quantized to `quantize_bit` with `left` outliers exact and a rank-`rank` "
                   "residual, streamed in blocks of `streaming_gap`")
    defaults_from = ("GEAR GenerationBench/GenerationTest/run_template_*.sh (--compress_method GEAR --quantize_bit 2 "
                     "--group_size 64 --left 0.02 --rank 2 --rankv 2 --prefillrank 4 --prefillrankv 4 --loop 3 "
                     "--streaming --streaming_gap 64, no --stream_grouping: schedule reference)")
    test_params = {"degenerate": {"quantize_bit": 16},
                   "real": {"group_size": 4, "left": 0.2, "prefillrank": 2, "rank": 1, "prefillrankv": 2, "rankv": 1,
                            "streaming_gap": 8}}
    role = "cache"
    full_attention_only = True
    not_physically_checked = ("it evicts nothing: each decode query reads a D + S + L reconstruction of the cache, "
                              "checked against a direct implementation and stepwise decoding in tests/test_gear.py")
    base_prefill = True  # the prompt is attended in full precision; the cache is compressed for decode queries
    quantize_bit: int = 2
    group_size: int = 64
    left: float = 0.02
    prefillrank: int = 4
    prefillrankv: int = 4
    rank: int = 2
    rankv: int = 2
    loop: int = 3
    streaming_gap: int = 64
    schedule: Literal["reference", "paper"] = "reference"
    seed: int = 0
    per_sample = ("_stretches",)

    def validate(self):
        if self.quantize_bit not in (2, 3, 4, 8, 16):
            raise ValueError(f"gear: quantize_bit must be 2, 3, 4, 8 or 16 (unchanged), got {self.quantize_bit}")
        if self.group_size < 1:
            raise ValueError(f"gear: group_size must be >= 1, got {self.group_size}")
        if not 0 <= self.left < 1:
            raise ValueError(f"gear: left (the outlier fraction) must be in [0, 1), got {self.left}")
        for name in ("prefillrank", "prefillrankv", "rank", "rankv"):
            if getattr(self, name) < 0:
                raise ValueError(f"gear: {name} must be >= 0, got {getattr(self, name)}")
        if self.loop < 1:
            raise ValueError(f"gear: loop (power iterations) must be >= 1, got {self.loop}")
        if self.streaming_gap < 1:
            raise ValueError(f"gear: streaming_gap must be >= 1, got {self.streaming_gap}")

    def begin(self, prompt_len: int) -> None:
        self._stretches: dict = {}  # (layer, start, end) -> compressed (keys, values) of positions start..end-1

    def __post_init__(self):
        super().__post_init__()
        self.begin(0)
        self._blocks: dict[int, int] = {}  # layer -> compressions holding generated tokens, over the samples

    def compressed(self, call: AttentionCall, start: int, end: int, prompt: bool, keys=None, values=None):
        """GEAR of positions start..end-1 (of ``keys``/``values`` if given, else the cache), once a sample and layer."""
        where = (call.layer_idx, start, end)
        if where not in self._stretches:
            keys = call.key[:, :, start:end] if keys is None else keys
            values = call.value[:, :, start:end] if values is None else values
            ranks = (self.prefillrank, self.prefillrankv) if prompt else (self.rank, self.rankv)
            args = (self.quantize_bit, self.group_size, self.left)
            self._stretches[where] = (gear_compress(keys, "key", *args, ranks[0], self.loop, self.seed),
                                      gear_compress(values, "value", *args, ranks[1], self.loop, self.seed))
            if end > call.phase.prompt_len:
                self._blocks[call.layer_idx] = self._blocks.get(call.layer_idx, 0) + 1
        return self._stretches[where]

    def attend(self, call: AttentionCall):
        if call.phase.name != "decode":
            return None
        visible = call.visible()
        shape = (*call.query.shape[:3], call.key.shape[2])  # counted per query head, as a stack's selection masks come
        if self.quantize_bit == 16 or call.sliding_window is not None:
            self.record(call.layer_idx, 0, visible.expand(shape).sum())
            return None
        require_every_position(self, call)  # key index = position below
        n_q, n_k = call.query.shape[2], call.key.shape[2]
        p, gap = call.phase.prompt_len, self.streaming_gap
        pos_k = torch.arange(n_k, device=call.query.device)
        pos_q = pos_k[n_k - n_q :, None]
        last = n_k - 1  # the last query's position
        copies = []  # (keys, values, positions each query reads from this copy)
        if self.schedule == "paper":
            # Compressed: the prompt, and each full block of `gap` generated tokens before the query.
            parts = [self.compressed(call, 0, p, prompt=True)]
            parts += [self.compressed(call, s, s + gap, prompt=False) for s in range(p, last - gap + 1, gap)]
            end = p + (last - p) // gap * gap
            keys = torch.cat([k for k, _ in parts] + [call.key[:, :, end:]], dim=2)
            values = torch.cat([v for _, v in parts] + [call.value[:, :, end:]], dim=2)
            copies.append((keys, values, pos_k < p + (pos_q - p) // gap * gap))
            full_from = p + (pos_q - p) // gap * gap
        else:
            # Every cache length m = multiple of `gap` reached by a decode step recompresses [0, m): keys
            # already compressed at the previous such length are compressed again.
            events = list(range(-(-p // gap) * gap, last + 1, gap))
            if not events:
                self.record(call.layer_idx, 0, visible.expand(shape).sum())
                return None
            previous = 0
            for m in events:
                if previous:
                    base = self._stretches[(call.layer_idx, 0, previous)]
                    keys = torch.cat([base[0], call.key[:, :, previous:m]], dim=2)
                    values = torch.cat([base[1], call.value[:, :, previous:m]], dim=2)
                    state = self.compressed(call, 0, m, prompt=False, keys=keys, values=values)
                else:
                    state = self.compressed(call, 0, m, prompt=False)
                copies.append((torch.cat([state[0], call.key[:, :, m:]], dim=2),
                               torch.cat([state[1], call.value[:, :, m:]], dim=2),
                               (pos_q // gap * gap == m) & (pos_k < m)))
                previous = m
            full_from = torch.where(pos_q // gap * gap >= p, pos_q // gap * gap, 0)
        copies.append((call.key, call.value, pos_k >= full_from))
        masks = [visible & reads for _, _, reads in copies]
        self.record(call.layer_idx, sum(m.expand(shape).sum() for m in masks[:-1]), visible.expand(shape).sum())
        return call.dense(mask=torch.cat(masks, dim=-1), key=torch.cat([k for k, _, _ in copies], dim=2),
                          value=torch.cat([v for _, v, _ in copies], dim=2))

    def kept(self) -> dict:
        counts = [(float(c), float(v)) for c, v in self._kept.values()]
        visible = sum(v for _, v in counts)
        return {"bits": self.quantize_bit, "schedule": self.schedule,
                "kv_quantized": sum(c for c, _ in counts) / visible if visible else 0.0,
                "blocks_compressed": max(self._blocks.values(), default=0)}
