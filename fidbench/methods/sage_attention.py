"""``sage-attention``: SageAttention's INT8 Q·Kᵀ (Zhang et al. 2024, "SageAttention: Accurate 8-Bit
Attention for Plug-and-play Inference Acceleration"), simulated in PyTorch.

K is smoothed by subtracting its mean over the tokens (per head and channel: every score of a query
row shifts by the same amount, which softmax ignores), then Q and K are quantized to symmetric INT8
per block of tokens (``block_q`` queries, ``block_k`` keys; scale = absmax / 127), their integer
product is dequantized with the two block scales, softmax runs in fp32, and P·V in fp16. The math
is explicit, one chunk of ``block_q`` queries at a time, so memory grows with the prompt length, not
its square. The paper's fp16 P·V accumulates in fp16 on some GPUs; here it accumulates in fp32.

Decode: each query is computed as a token-by-token decode's step computes it, the kernel called with
one query over the cache: the K mean and K's blocks (aligned at the first key, the last one partial)
are those of the keys that query sees, and the query is its own Q block. Several reference tokens in
one forward get each row's own statistics (``sage_decode``), so one forward equals the token-by-token
decode in exact arithmetic (fp32 summation order upstream can still flip an int8 rounding: benchmarks/LOG.md,
"Noise floor of rounding methods"). A decode row sums the K mean, the softmax and P·V in float64 (exact or
nearly so for these terms, where fp32's result would depend on how many masked keys a call holds) before
rounding as the kernel does; integer Q·Kᵀ products are exact in fp32 anyway. The prefill keeps fp32 sums.

``pv: fp8`` is SageAttention2's P·V on sm89/sm90 instead (``sage_attention``'s ``v_fp8_max``); this
method's default stays the SageAttention (1) paper's fp16, ``sparge-attention``'s is fp8. A decode row
then takes V's per-channel scale over the keys it sees and P's key tiles from its first key, as its
one-query call does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from ..attention import AttentionCall
from .base import Method, register
from .fp8_attention import fp8_softmax

S_FP8_OFFSET = 8.807  # SageAttention's csrc/qattn/attn_utils.cuh: P scaled by 2^8.807 = 448, e4m3's largest


def quantize_blocks(x: torch.Tensor, block: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer quantization of ``x`` (..., tokens, dim) per block of ``block`` tokens.

    Returns integer values (as floats) and the scale of each token's block, (..., tokens, 1).
    """
    qmax = 2 ** (bits - 1) - 1
    n = x.shape[-2]
    pad = -n % block
    padded = torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(-2, (-1, block))
    scale = padded.abs().amax(dim=(-2, -1), keepdim=True).clamp(min=torch.finfo(x.dtype).tiny) / qmax
    ints = torch.round(padded / scale).clamp(-qmax, qmax)
    scale = scale.expand(*scale.shape[:-2], block, 1)
    return ints.flatten(-3, -2)[..., :n, :], scale.flatten(-3, -2)[..., :n, :]


def sage_attention(query, key, value, visible_rows: Callable[[int, int], torch.Tensor], scaling: float,
                   block_q: int = 128, block_k: int = 64, bits: int | None = 8, smooth_k: bool = True,
                   pv_dtype: torch.dtype = torch.float16, causal: bool = True,
                   v_fp8_max: float | None = None) -> torch.Tensor:
    """Attention output (batch, heads, q, dim) of query (b, h, q, d) over key/value (b, kvh, kv, d).

    ``visible_rows(start, stop)`` gives the bool mask (b|1, 1|h, stop - start, kv) of those query rows.
    ``bits=None`` skips quantization (then only the chunking, smoothing and ``pv_dtype`` remain).
    ``causal``: the queries are the last q of the kv positions and see no later key (every model mask).
    ``v_fp8_max``: SageAttention2's FP8 P·V (its ``qk_int8_sv_f8`` kernels, sm89/sm90) instead of ``pv_dtype``'s:
    V quantized to e4m3 per (batch, KV head, channel) with scale absmax over the tokens / ``v_fp8_max``
    (SageAttention2's ``per_channel_fp8``: 448; SpargeAttn's ``scale_fuse_quant_cuda``: 2.25); P per key
    tile of ``block_k``, in order, as 2^(s - m + 8.807) against the running row max m, rounded to e4m3,
    the row sum over the unrounded P (``fp8_attention.fp8_softmax``); an fp16 output.
    """
    h, q_len = query.shape[1:3]
    kvh = key.shape[1]
    k = key.float()
    if smooth_k:
        k = k - k.mean(dim=-2, keepdim=True)
    if bits is not None:
        # Integer products summed over d stay below 2^24, so the fp32 matmul is exact (an int32 accumulator).
        k, k_scale = quantize_blocks(k, block_k, bits)
        k_scale = k_scale.transpose(-1, -2)[:, :, None]  # (b, kvh, 1, 1, kv)
    # P·V on fp16 inputs with an fp32 accumulator and an fp16 result: rounding P and V to fp16 and
    # multiplying in fp32 computes that, without CPU fp16 matmuls (several times slower than fp32).
    if v_fp8_max is None:
        v = value.to(pv_dtype).float()
    else:
        v_scale = value.float().abs().amax(-2, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / v_fp8_max
        v = (value.float() / v_scale).to(torch.float8_e4m3fn).float() * v_scale
    k, v = k[:, :, None], v[:, :, None]  # broadcast over the query heads of a KV head
    out = []
    for start in range(0, q_len, block_q):
        stop = min(start + block_q, q_len)
        mask = visible_rows(start, stop)
        n = needed_keys(q_len, k.shape[-2], stop) if causal else k.shape[-2]
        q = query[:, :, start:stop].float().unflatten(1, (kvh, h // kvh))  # (b, kvh, groups, c, d)
        if bits is None:
            scores = q @ k[..., :n, :].transpose(-1, -2)
        else:
            q, q_scale = quantize_blocks(q, stop - start, bits)  # the chunk is one Q block
            scores = (q @ k[..., :n, :].transpose(-1, -2)) * q_scale * k_scale[..., :n]
        mask = mask[..., :n]
        mask = mask.unflatten(1, (kvh, h // kvh)) if mask.shape[1] == h else mask[:, :, None]
        scores = (scores * scaling).masked_fill(~mask, -math.inf)
        if v_fp8_max is not None:
            weights, total = fp8_softmax(scores * math.log2(math.e), block_k, S_FP8_OFFSET, last_first=False)
            weights = torch.nn.functional.pad(weights, (0, v.shape[-2] - n))
            out.append(torch.where(total > 0, (weights @ v) / total, 0.0).to(torch.float16).flatten(1, 2))
            continue
        p = torch.softmax(scores, dim=-1)
        # The skipped keys' probabilities are exact zeros: pad them back so that P·V keeps its full
        # shape, whose fp32 accumulation order (and so the result, bitwise) a shorter product would change.
        p = torch.nn.functional.pad(p, (0, v.shape[-2] - n))
        out.append((p.to(pv_dtype).float() @ v).to(pv_dtype).flatten(1, 2))
    return torch.cat(out, dim=2).to(query.dtype)


def quantize_seen_blocks(k: torch.Tensor, seen: torch.Tensor, block: int, bits: int):
    """``quantize_blocks`` of each row's copy of ``k`` (b, kvh, rows, kv, d) over the keys it sees (``seen``,
    (b|1, 1|kvh, rows, kv), a contiguous run per row), blocks starting at the row's first key.

    Returns integer values and the scale of each key's block, (b, kvh, rows, kv, 1); unseen keys' values
    are not used."""
    qmax = 2 ** (bits - 1) - 1
    kv = k.shape[-2]
    first = seen.int().argmax(-1, keepdim=True)  # the row's first key
    index = ((torch.arange(kv, device=k.device) - first) // block).clamp(min=0)
    tokens = torch.where(seen, k.abs().amax(-1), 0.0)  # (b, kvh, rows, kv): unseen keys set no scale
    index = index.expand_as(tokens)
    absmax = tokens.new_zeros(*tokens.shape[:-1], -(-kv // block)).scatter_reduce(-1, index, tokens, "amax")
    scale = (absmax.clamp(min=torch.finfo(torch.float32).tiny) / qmax).gather(-1, index)[..., None]
    return torch.round(k / scale).clamp(-qmax, qmax), scale


def sage_decode(query, key, value, visible: torch.Tensor, scaling: float, block_k: int = 64,
                bits: int | None = 8, smooth_k: bool = True, pv_dtype: torch.dtype = torch.float16,
                row_elements: int = 1 << 22, attend: torch.Tensor | None = None,
                v_fp8_max: float | None = None) -> torch.Tensor:
    """Decode queries (b, h, q, d), each with the statistics of the keys it sees (``visible``: (b|1, 1|h, q, kv),
    every row sees a contiguous run of keys), as a one-query call over exactly those keys computes them.
    ``attend`` (default ``visible``) narrows what the softmax covers without changing the statistics.
    ``v_fp8_max``: ``sage_attention``'s FP8 P·V, V's scales over the row's keys, P's tiles from its first key."""
    attend = visible if attend is None else attend
    (_, h, n, d), (kvh, kv) = query.shape, key.shape[1:3]
    seen = visible if visible.shape[1] == 1 else visible.unflatten(1, (kvh, -1)).any(2)  # (b|1, 1|kvh, q, kv)
    v = value.to(pv_dtype)[:, :, None]  # (b, kvh, 1, kv, d)
    out, step = [], max(1, row_elements // (kvh * kv * d))  # each row holds its own copy of the keys
    for i in range(0, n, step):
        rows = slice(i, i + step)
        s = seen[..., rows, :]
        k = key.float()[:, :, None]  # (b, kvh, 1, kv, d), one copy per row below
        if smooth_k:
            w = s.double()
            k = k - ((w @ key.double()) / w.sum(-1, keepdim=True)).float()[..., None, :]
        q = query[:, :, rows].float().unflatten(1, (kvh, -1))  # (b, kvh, groups, r, d)
        if bits is None:
            scores = torch.einsum("bkgrd,bkrjd->bkgrj", q, k.expand(-1, -1, q.shape[3], -1, -1))
        else:
            k, k_scale = quantize_seen_blocks(k, s, block_k, bits)
            q, q_scale = quantize_blocks(q, 1, bits)  # each query its own Q block
            scores = torch.einsum("bkgrd,bkrjd->bkgrj", q, k) * q_scale * k_scale[..., 0][:, :, None]
        mask = attend[..., rows, :]
        mask = mask.unflatten(1, (kvh, -1)) if mask.shape[1] == h else mask[:, :, None]
        scores = (scores * scaling).masked_fill(~mask, -math.inf)
        if v_fp8_max is not None:
            out.append(_fp8_pv_rows(scores, value, s, block_k, v_fp8_max).flatten(1, 2))
            continue
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        p = e / e.double().sum(-1, keepdim=True).float()
        pv = torch.einsum("bkgrj,bkxjd->bkgrd", p.to(pv_dtype).double(), v.double())
        out.append(pv.to(pv_dtype).flatten(1, 2))
    return torch.cat(out, dim=2).to(query.dtype)


def _fp8_pv_rows(scores, value, seen, tile: int, v_fp8_max: float) -> torch.Tensor:
    """SageAttention2's FP8 P·V of decode rows: ``scores`` (b, kvh, groups, r, kv), -inf where unseen; ``value``
    (b, kvh, kv, d); ``seen`` (b|1, 1|kvh, r, kv), a contiguous run of keys per row. Each row as its one-query call
    over those keys: V per channel over them, P's tiles counted from the first. Sums in float64, as the rows'
    softmax above (a call's masked keys then change nothing)."""
    kv = scores.shape[-1]
    first = seen.int().argmax(-1, keepdim=True)  # (b|1, 1|kvh, r, 1)
    cols = torch.arange(kv, device=scores.device)
    # Rotate each row so that its first key is column 0 (the run then fills columns 0.., the rest is -inf).
    ahead, back = (cols + first) % kv, (cols - first) % kv
    rotated = scores.gather(-1, ahead[:, :, None].expand_as(scores))
    weights, total = fp8_softmax(rotated.double() * math.log2(math.e), tile, S_FP8_OFFSET, last_first=False)
    weights = weights.gather(-1, back[:, :, None].expand_as(weights))
    absmax = torch.where(seen[..., None], value.float().abs()[:, :, None], 0.0).amax(-2, keepdim=True)
    v_scale = absmax.clamp(min=torch.finfo(torch.float32).tiny) / v_fp8_max  # (b, kvh, r, 1, d)
    v = (value.float()[:, :, None] / v_scale).to(torch.float8_e4m3fn).float() * v_scale  # (b, kvh, r, kv, d)
    out = torch.einsum("bkgrj,bkrjd->bkgrd", weights, v.double())
    return torch.where(total > 0, out / total, 0.0).to(torch.float16)


def needed_keys(q_len: int, kv_len: int, stop: int) -> int:
    """How many leading keys query rows up to ``stop`` need under a causal mask: up to the last row's own.

    Scores of later keys would be masked to -inf (probability exactly 0): in a causal prefill the
    upper triangle, about half of the Q·Kᵀ and softmax work, skipped. Derived from shapes, so the
    host never waits for the device to say which keys are seen."""
    return min(kv_len, kv_len - q_len + stop)


def _visible_rows(call: AttentionCall) -> Callable[[int, int], torch.Tensor]:
    """Rows of ``call.visible()`` without materializing the full (q, kv) mask when the model passed none."""
    mask = call.attention_mask
    if mask is not None:  # already materialized (b|1, 1|h, q, kv) by the model: slice it
        if mask.dtype == torch.bool:
            return lambda start, stop: mask[..., start:stop, :]
        return lambda start, stop: mask[..., start:stop, :] == 0  # an additive float mask
    q_len, kv_len = call.query.shape[2], call.key.shape[2]
    cols = torch.arange(kv_len, device=call.query.device)

    def rows(start, stop):
        pos = torch.arange(start, stop, device=cols.device)[:, None] + (kv_len - q_len)
        return (cols[None, :] <= pos)[None, None]

    return rows


@register
class SageAttention(Method):
    name = "sage-attention"
    description = "SageAttention: K smoothed, per-block INT8 Q·K, fp32 softmax, fp16 P·V"
    defaults_from = ("SageAttention (1) paper and thu-ml/SageAttention sageattn_qk_int8_pv_fp16: INT8 Q·K per block "
                     "of 128 queries x 64 keys, K smoothed, fp16 P·V")
    test_params = {"degenerate": None, "why": "bits <= 8: no lossless setting", "real": {"bits": 3}}
    role = "kernel"
    block_q: int = 128
    block_k: int = 64
    bits: int = 8
    smooth_k: bool = True
    pv: Literal["fp16", "fp8"] = "fp16"
    v_fp8_max = 448.0  # SageAttention2 sageattention/quant.py per_channel_fp8 (a class constant, not a parameter)

    def validate(self):
        if self.block_q < 1:
            raise ValueError(f"sage-attention: block_q must be >= 1, got {self.block_q}")
        if self.block_k < 1:
            raise ValueError(f"sage-attention: block_k must be >= 1, got {self.block_k}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"sage-attention: bits must be in 2..8 (INT8 in the paper), got {self.bits}")

    def attend(self, call: AttentionCall):
        scaling = call.kwargs.get("scaling")
        if scaling is None:
            scaling = call.query.shape[-1] ** -0.5
        if call.phase.name == "decode":
            out = sage_decode(call.query, call.key, call.value, call.visible(), scaling, self.block_k, self.bits,
                              self.smooth_k, v_fp8_max=self.fp8_max)
        else:
            out = sage_attention(call.query, call.key, call.value, _visible_rows(call), scaling,
                                 self.block_q, self.block_k, self.bits, self.smooth_k, v_fp8_max=self.fp8_max)
        return out.transpose(1, 2).contiguous()  # the (batch, q, heads, dim) layout attention functions return

    @property
    def fp8_max(self) -> float | None:
        """V's e4m3 range for ``sage_attention`` (None: fp16 P·V)."""
        return self.v_fp8_max if self.pv == "fp8" else None

    def kept(self) -> dict:
        return {"qk_bits": self.bits, "pv_dtype": "float8_e4m3fn" if self.pv == "fp8" else "float16"}
