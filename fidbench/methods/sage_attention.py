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
decode. A decode row sums the K mean, the softmax and P·V in float64 (exact or nearly so for these
terms, where fp32's result would depend on how many masked keys a call holds) before rounding as the
kernel does; integer Q·Kᵀ products are exact in fp32 anyway. The prefill keeps fp32 sums.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..attention import AttentionCall
from .base import Method, register


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
                   pv_dtype: torch.dtype = torch.float16, causal: bool = True) -> torch.Tensor:
    """Attention output (batch, heads, q, dim) of query (b, h, q, d) over key/value (b, kvh, kv, d).

    ``visible_rows(start, stop)`` gives the bool mask (b|1, 1|h, stop - start, kv) of those query rows.
    ``bits=None`` skips quantization (then only the chunking, smoothing and ``pv_dtype`` remain).
    ``causal``: the queries are the last q of the kv positions and see no later key (every model mask).
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
    k, v = k[:, :, None], value.to(pv_dtype).float()[:, :, None]  # broadcast over the query heads of a KV head
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
        p = torch.softmax((scores * scaling).masked_fill(~mask, -math.inf), dim=-1)
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
                row_elements: int = 1 << 22, attend: torch.Tensor | None = None) -> torch.Tensor:
    """Decode queries (b, h, q, d), each with the statistics of the keys it sees (``visible``: (b|1, 1|h, q, kv),
    every row sees a contiguous run of keys), as a one-query call over exactly those keys computes them.
    ``attend`` (default ``visible``) narrows what the softmax covers without changing the statistics."""
    attend = visible if attend is None else attend
    (b, h, n, d), (kvh, kv) = query.shape, key.shape[1:3]
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
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        p = e / e.double().sum(-1, keepdim=True).float()
        pv = torch.einsum("bkgrj,bkxjd->bkgrd", p.to(pv_dtype).double(), v.double())
        out.append(pv.to(pv_dtype).flatten(1, 2))
    return torch.cat(out, dim=2).to(query.dtype)


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
    test_params = {"degenerate": None, "why": "bits <= 8: no lossless setting", "real": {"bits": 3}}
    block_q: int = 128
    block_k: int = 64
    bits: int = 8
    smooth_k: bool = True

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
                              self.smooth_k)
        else:
            out = sage_attention(call.query, call.key, call.value, _visible_rows(call), scaling,
                                 self.block_q, self.block_k, self.bits, self.smooth_k)
        return out.transpose(1, 2).contiguous()  # the (batch, q, heads, dim) layout attention functions return

    def kept(self) -> dict:
        return {"qk_bits": self.bits, "pv_dtype": "float16"}
