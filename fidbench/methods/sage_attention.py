"""``sage-attention``: SageAttention's INT8 Q·Kᵀ (Zhang et al. 2024, "SageAttention: Accurate 8-Bit
Attention for Plug-and-play Inference Acceleration"), simulated in PyTorch.

K is smoothed by subtracting its mean over the tokens (per head and channel: every score of a query
row shifts by the same amount, which softmax ignores), then Q and K are quantized to symmetric INT8
per block of tokens (``block_q`` queries, ``block_k`` keys; scale = absmax / 127), their integer
product is dequantized with the two block scales, softmax runs in fp32, and P·V in fp16. The math
is explicit, one chunk of ``block_q`` queries at a time, so memory grows with the prompt length, not
its square. The paper's fp16 P·V accumulates in fp16 on some GPUs; here it accumulates in fp32.
The mean and the last K block span the whole cache of each step: the method runs stepwise.
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
    role = "kernel"
    parallel_exact = False  # the K mean and the last K block's scale span each step's cache
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
        out = sage_attention(call.query, call.key, call.value, _visible_rows(call), scaling,
                             self.block_q, self.block_k, self.bits, self.smooth_k)
        return out.transpose(1, 2).contiguous()  # the (batch, q, heads, dim) layout attention functions return

    def kept(self) -> dict:
        return {"qk_bits": self.bits, "pv_dtype": "float16"}
