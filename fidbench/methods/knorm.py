"""``knorm``: key-norm eviction (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression").

After the prefill, each KV head keeps the prompt positions whose cached (post-RoPE) keys have the
smallest L2 norm: low-norm keys tend to draw high attention. The score is kvpress's KnormPress
(``-‖k‖``, per KV head and position); every prompt position competes, without a recency window, in
every layer. Key norms are a property of the KV head, so there is no granularity to choose.
Differences from kvpress: fidbench's budget rule (``_kv``; kvpress floors ``k_len × (1 - ratio)``).
"""

from ..attention import AttentionCall
from ._kv import Evicting
from .base import register


@register
class KNorm(Evicting):
    name = "knorm"
    description = "after prefill, keep per KV head the prompt keys with the smallest L2 norm"
    defaults_from = "kvpress KnormPress (no parameters of its own); budget: fidbench's rule (_kv)"
    test_params = {"degenerate": {"ratio": 1.0}, "real": {"budget": 12}}

    def score(self, call: AttentionCall):
        return -call.key.float().norm(dim=-1)
