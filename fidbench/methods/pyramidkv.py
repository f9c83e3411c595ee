"""``pyramidkv``: PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling").

SnapKV's score (``snapkv``: window, kernel, pooling, granularity) with a per-layer allocation that
shrinks linearly from the lowest layer to the highest. Follows KVCache-Factory's PyramidKVCluster
(Zefan-Cai/KVCache-Factory, ``pyramidkv_utils.py``) in integer arithmetic, with B the budget, w the
window, L the prompt length, beta 20 and layer i of ``num_hidden_layers``:

- ``L < B``: no compression;
- ``B <= L < 2 (B - w)``: uniform SnapKV, B per layer (the pyramid would need more than the prompt);
- otherwise ``min = (B - w) // beta``, ``max = 2 (B - w) - min``; if ``max >= L - w`` then ``max = L - w``
  and ``min = 2 (B - w) - max``; ``steps = (max - min) // (layers - 1)``; layer i keeps
  ``max - i * steps`` positions plus the window. Because ``steps`` is floored, the upper layers keep a
  little more than the linear schedule: the layers together keep up to ``(layers - 1) / 2`` positions
  per head and layer more than SnapKV's ``layers × B`` (as in the reference; ``kept()`` shows it). At
  small budgets, where ``max - min < layers - 1``, ``steps`` is 0 and every layer keeps ``2 B - w - min``:
  up to 1.5 B at fidbench's smallest budgets (B = 8, w = 4), so pyramidkv then runs above the nominal
  budget (``kept()["budget_per_head"]`` against ``kept()["budget"]``).

``allocation: kvpress`` sizes the pyramid as kvpress's PyramidKVPress does (``get_layer_budget``), in its float
arithmetic, with B the budget including the window: ``min = B / beta``, ``max = 2 B - min``; if ``max >= L - w``
then ``max = L - w`` and ``min = 2 B - max``; unless ``L >= max >= min >= w`` every layer keeps B (SnapKV), else
layer i keeps ``round(max - i (max - min) / (layers - 1))`` positions, window included, Python's rounding. The
layers keep B on average, where KVCache-Factory's rule above adds the window to every layer's share. kvpress's B is
``L × (1 - compression_ratio)``, a float: fidbench's is its integer budget, so ``budget: int(L × (1 -
compression_ratio))`` matches it when that product is whole (tests/test_kvpress.py checks both equal).

Differences: the window rule and budget rounding are snapkv's (see there). On models with
sliding-window layers (Gemma 3) only the full-attention layers are compressed (``_kv``), each with
its depth's budget in the pyramid over all layers, so their mean budget is not the nominal one.
"""

from typing import Literal

from ..attention import AttentionCall
from .base import register
from .snapkv import SnapKV


def pyramid_budget(budget: int, prompt_len: int, window: int, layers: int, beta: int, layer: int) -> int:
    """Prompt positions (window included) that ``layer`` of ``layers`` keeps per head: KVCache-Factory's rule."""
    if prompt_len < budget:
        return prompt_len
    if prompt_len < 2 * (budget - window) or layers == 1:
        return budget
    low = (budget - window) // beta
    high = 2 * (budget - window) - low
    if high >= prompt_len - window:
        high = prompt_len - window
        low = 2 * (budget - window) - high
    steps = (high - low) // (layers - 1)
    return high - layer * steps + window


def kvpress_budget(budget: int, prompt_len: int, window: int, layers: int, beta: int, layer: int) -> int:
    """Prompt positions (window included) that ``layer`` of ``layers`` keeps per head: kvpress's rule."""
    low = budget / beta
    high = 2 * budget - low
    if high >= prompt_len - window:
        high = prompt_len - window
        low = 2 * budget - high
    if layers == 1 or not prompt_len >= high >= low >= window:
        return budget
    return round(high - layer * (high - low) / (layers - 1))


@register
class PyramidKV(SnapKV):
    name = "pyramidkv"
    description = "SnapKV scoring with per-layer budgets shrinking linearly with depth (KVCache-Factory's or kvpress's)"
    defaults_from = "KVCache-Factory (PyramidKV's code) LongBench scripts: window 8, kernel 7, max pooling, beta 20"
    test_params = {"degenerate": {"budget": 1024}, "real": {"budget": 12, "window": 4, "kernel": 3}}
    window: int = 8  # KVCache-Factory's LongBench scripts (PyramidKV's own); snapkv's default is SnapKV's 32
    beta: int = 20
    allocation: Literal["kvcache_factory", "kvpress"] = "kvcache_factory"

    def validate(self):
        super().validate()
        if self.beta < 1:
            raise ValueError(f"{self.name}: beta must be >= 1 (the top layer keeps 1/beta of the budget), "
                             f"got {self.beta}")

    def layer_budget(self, call: AttentionCall) -> int:
        p = call.phase.prompt_len
        rule = pyramid_budget if self.allocation == "kvcache_factory" else kvpress_budget
        layers = call.module.config.num_hidden_layers
        return rule(self.tokens(p), p, self.window_for(p), layers, self.beta, call.layer_idx)
