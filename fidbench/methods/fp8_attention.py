"""``fp8-attention``: attention on Q, K, V rounded to float8 e4m3, as FlashAttention-3's FP8 path computes
it (Shah et al. 2024, "FlashAttention-3: Fast and Accurate Attention with Asynchrony and Low-precision";
Dao-AILab/flash-attention ``hopper/``).

FA3 takes e4m3 Q, K, V with one descale per (batch, KV head) each (``flash_api.cpp``: "(b, h_k), not
(b, h)"; a Q scale is shared by the query heads of a group); how the caller picks scales is its own
business. Here each scale maps the absolute maximum over the call's tokens (and, for Q, over the query
heads sharing the KV head) to 448, e4m3's largest finite value; values are rounded to the nearest
e4m3 value and dequantized. Scales cover every token a call sees (the whole cache for K and V), so a
step's rounding depends on the cache at that step: the method runs stepwise.

``p_fp8``: False (default) runs dense attention on the dequantized Q, K, V, P in float32. True also
converts P to e4m3 before P·V, as FA3's kernel does (``softmax.h``, ``Max_offset = 8``): keys are
processed in tiles of ``kBlockN`` (FA3's sm90 fp8 tile for the head dimension, ``tile_size.h``), last
tile first; each tile's P is ``exp2(s·log2(e)·scale − (m·log2(e)·scale − 8))`` against the running row
max m, so in [0, 256], rounded to e4m3 (round to nearest even, saturating) for P·V, while the row sum
accumulates the unrounded P; the output is the rescaled accumulator over the sum.

Differences: FA3 computes q·k on the e4m3 codes and folds the descales into the softmax scale, and
applies V's descale at the end; here the dequantized values are multiplied (the same products up to
float32 rounding). FA3 writes a bf16 output; here the output keeps the model's dtype.
"""

from __future__ import annotations

import math

import torch

from ..attention import AttentionCall
from .base import Method, register

E4M3_MAX = 448.0
ROWS = 256  # query rows per explicit p_fp8 product: (rows x keys) scores per head, never (n x n)


def fp8_e4m3(x: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, scale) of ``x`` (batch, heads, tokens, dim): x ≈ codes * scale, one scale per
    (batch, group of ``groups`` consecutive heads), shape (batch, heads, 1, 1)."""
    absmax = x.detach().float().abs().unflatten(1, (-1, groups)).amax(dim=(-3, -2, -1), keepdim=True)
    scale = (absmax.clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX).expand(-1, -1, groups, 1, 1).flatten(1, 2)
    # The clamp only catches float error at the top of the range: e4m3fn has no inf, overflow is NaN.
    codes = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_round(x: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``x`` quantized to e4m3 with a scale per group of heads (``fp8_e4m3``) and dequantized, in ``x``'s dtype."""
    codes, scale = fp8_e4m3(x, groups)
    return (codes.float() * scale).to(x.dtype)


def block_n(head_dim: int) -> int:
    """FA3's key tile for fp8 on sm90 (``tile_size_fwd_sm90``, element size 1, no paging or local window)."""
    for bound, tile in ((64, 160), (96, 128), (128, 224), (192, 160)):
        if head_dim <= bound:
            return tile
    return 128


def attention_p_fp8(query, key, value, visible: torch.Tensor, scaling: float, tile: int,
                    p_dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """FA3's fp8 softmax and P·V: (batch, heads, q, dim) of query (b, h, q, d) over key/value (b, kvh, kv, d).

    ``visible`` (b|1, 1|h, q, kv) is True where a query sees a key; P is rounded to ``p_dtype``."""
    h, kvh, kv = query.shape[1], key.shape[1], key.shape[2]
    k = key.float().repeat_interleave(h // kvh, 1)
    v = value.float().repeat_interleave(h // kvh, 1)
    log2_scale = scaling * math.log2(math.e)
    s = (query.float() @ k.transpose(-1, -2)).masked_fill(~visible, -math.inf) * log2_scale
    tiles = math.ceil(kv / tile)
    s = torch.nn.functional.pad(s, (0, tiles * tile - kv), value=-math.inf).unflatten(-1, (tiles, tile))
    # Tiles run from the last to the first: each tile's running max covers it and every later tile.
    running = s.amax(-1).flip(-1).cummax(-1).values.flip(-1)  # (b, h, q, tiles)
    offset = torch.where(running == -math.inf, 0.0, running - 8.0)  # FA3's Check_inf: a fully masked row stays 0
    p = torch.exp2(s - offset[..., None])
    p_fp8 = p.to(p_dtype).float()
    # Rescaling to the final max: a tile computed against running max m is worth 2^(m - M).
    rescale = torch.exp2(torch.where(running == -math.inf, -math.inf, running - running[..., :1]))
    total = (p.sum(-1) * rescale).sum(-1, keepdim=True)
    weights = (p_fp8 * rescale[..., None]).flatten(-2)[..., :kv]
    out = (weights @ v) / total
    return torch.where(total > 0, out, 0.0)


@register
class FP8Attention(Method):
    name = "fp8-attention"
    description = "attention on Q, K, V rounded to float8 e4m3 with per-KV-head absmax scales (FA3's FP8 path)"
    test_params = {"degenerate": None, "why": "the e4m3 rounding is the method", "real": {}}
    role = "kernel"
    parallel_exact = False  # K/V scales span the whole cache of each step
    p_fp8: bool = False

    def attend(self, call: AttentionCall):
        query, key, value = fp8_round(call.query, call.groups), fp8_round(call.key), fp8_round(call.value)
        if not self.p_fp8:
            return call.dense(query=query, key=key, value=value)
        scaling = call.kwargs.get("scaling") or call.query.shape[-1] ** -0.5
        visible, tile = call.visible(), block_n(call.query.shape[-1])
        # Query rows are independent: slices of ROWS rows compute the same rows as one product.
        rows = range(0, query.shape[2], ROWS)
        out = torch.cat([attention_p_fp8(query[:, :, i : i + ROWS], key, value, visible[..., i : i + ROWS, :],
                                         scaling, tile) for i in rows], dim=2)
        return out.to(call.query.dtype).transpose(1, 2).contiguous()  # the (batch, q, heads, dim) layout

    def kept(self) -> dict:
        return {"qkv_format": "float8_e4m3fn", "qkv_scale": "per KV head, absmax/448 over the call's tokens",
                "p_format": "float8_e4m3fn (x 2^8, FA3)" if self.p_fp8 else "float32"}
