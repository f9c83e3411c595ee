"""``random``: keep a uniformly random subset of prompt positions per KV head and layer.

The floor any real eviction method must beat at the same budget. Seeded: each sample draws from a
generator reset to ``seed`` in ``begin``, so a sample's choice does not depend on the samples before it.
"""

import torch

from ..attention import AttentionCall
from ._kv import Evicting, top_mask
from .base import register


@register
class Random(Evicting):
    name = "random"
    description = "after prefill, keep a seeded uniform random subset of prompt positions per KV head"
    test_params = {"degenerate": {"ratio": 1.0}, "real": {"budget": 12, "seed": 3}}
    seed: int = 0

    def begin(self, prompt_len: int) -> None:
        super().begin(prompt_len)
        self._generator = torch.Generator().manual_seed(self.seed)

    def select(self, call: AttentionCall, n: int):
        draws = torch.rand(call.key.shape[:3], generator=self._generator)
        return top_mask(draws, n).to(call.key.device)
