"""``knorm``: key-norm eviction (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression").

After the prefill, each KV head keeps the prompt positions whose cached (post-RoPE) keys have the
smallest L2 norm: low-norm keys tend to draw high attention. Key norms are a per-KV-head property,
so grouped-query attention needs no averaging. Every prompt position competes, without a recency
window, in every layer.
"""

from ..attention import AttentionCall
from ._kv import Evicting, top_mask
from .base import register


@register
class KNorm(Evicting):
    name = "knorm"
    description = "after prefill, keep per KV head the prompt keys with the smallest L2 norm"
    test_params = {"degenerate": {"ratio": 1.0}, "real": {"budget": 12}}

    def select(self, call: AttentionCall, n: int):
        return top_mask(-call.key.float().norm(dim=-1), n)
