"""``fp8-attention``: attention on Q, K, V rounded to float8 e4m3, as FP8 attention kernels compute it
(FlashAttention-3's FP8 path, Shah et al. 2024).

Each of Q, K, V is scaled per (batch, head) so that its absolute maximum over the call's tokens maps
to 448 (e4m3's largest finite value), rounded to the nearest e4m3 value, and dequantized; attention
then runs dense on the dequantized tensors. Scales cover every token a call sees (the whole cache
for K and V), so a step's rounding depends on the cache at that step: the method runs stepwise.
"""

from __future__ import annotations

import torch

from ..attention import AttentionCall
from .base import Method, register

E4M3_MAX = 448.0


def fp8_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 codes, per-(batch, head) scale) of ``x`` (batch, heads, tokens, dim): x ≈ codes * scale."""
    absmax = x.detach().float().abs().amax(dim=(-2, -1), keepdim=True)
    scale = absmax.clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX
    # The clamp only catches float error at the top of the range: e4m3fn has no inf, overflow is NaN.
    codes = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return codes, scale


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` quantized to e4m3 with per-head scales and dequantized, in ``x``'s dtype."""
    codes, scale = fp8_e4m3(x)
    return (codes.float() * scale).to(x.dtype)


@register
class FP8Attention(Method):
    name = "fp8-attention"
    description = "attention on Q, K, V rounded to float8 e4m3 with per-head absmax scales (FP8 kernels)"
    test_params = {"degenerate": None, "why": "no parameters: the e4m3 rounding is the method", "real": {}}
    parallel_exact = False  # K/V scales span the whole cache of each step

    def attend(self, call: AttentionCall):
        return call.dense(query=fp8_round(call.query), key=fp8_round(call.key), value=fp8_round(call.value))

    def kept(self) -> dict:
        return {"qkv_format": "float8_e4m3fn", "qkv_scale": "per head, absmax/448 over the call's tokens"}
