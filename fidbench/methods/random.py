"""``random``: keep a uniformly random subset of prompt positions per KV head and layer.

The floor any real eviction method must beat at the same budget (kvpress's RandomPress: a uniform
random score per KV head and position). Seeded: each sample draws from a generator reset to ``seed``
in ``begin``, so a sample's choice does not depend on the samples before it (``reseed: sample``, the layers
draw in turn), or every layer draws from a generator reset to ``seed`` (``reseed: layer``: kvpress's
RandomPress, whose layers then keep the same positions; tests/test_kvpress.py checks it equal). The draws
come from a CPU generator (the same on every device) and are copied to the keys' device.
"""

from typing import Literal

import torch

from ..attention import AttentionCall
from ._kv import Evicting
from .base import register


@register
class Random(Evicting):
    name = "random"
    description = "after prefill, keep a seeded uniform random subset of prompt positions per KV head"
    defaults_from = "kvpress RandomPress (seeded); budget: fidbench's rule (_kv)"
    test_params = {"degenerate": {"ratio": 1.0}, "real": {"budget": 12, "seed": 3}}
    seed: int = 0
    reseed: Literal["sample", "layer"] = "sample"
    per_sample = ("keep", "_generator")

    def begin(self, prompt_len: int) -> None:
        super().begin(prompt_len)
        self._generator = torch.Generator().manual_seed(self.seed)

    def score(self, call: AttentionCall):
        generator = self._generator if self.reseed == "sample" else torch.Generator().manual_seed(self.seed)
        return torch.rand(call.key.shape[:3], generator=generator).to(call.key.device)
