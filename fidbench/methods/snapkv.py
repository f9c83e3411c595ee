"""``snapkv``: SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

After the dense prefill, each head keeps the last ``w`` prompt positions (the observation window) plus
the ``budget - w`` earlier ones the window's queries attend to most: softmax over every prompt key
(causal inside the window), summed over the window's queries, pooled over ``kernel`` neighbouring
positions (``pooling``: max or avg, zero padding counted in the average), top ``budget - w``. Only
the window's queries are scored, never the n × n matrix. A prompt no longer than the budget is kept
whole.

Follows KVCache-Factory's SnapKVCluster (Zefan-Cai/KVCache-Factory, the code behind PyramidKV and
Ada-KV), the window inside the budget. Defaults: window 32, kernel 7, max pooling, SnapKV's own evaluation
setting (FasterDecoding/SnapKV ``experiments/LongBench/config/ablation_c*_w32_k7_maxpool.json``, run by
``scripts/run_longbench.sh``), which Ada-KV's scripts use too (FFY0/AdaKV ``GQA_eval_longbench.sh``:
``c{128..1024}_w32_k7_maxpool.json``); KVCache-Factory's LongBench scripts use window 8 (``window: 8``).
``granularity``: ``query_head`` (default; SnapKV's and KVCache-Factory's code apply ``repeat_kv`` before
selecting, so every query head chooses its own positions and the cache is stored per query head) or
``kv_head`` (kvpress's SnapKVPress: pooled scores averaged over the query heads sharing a KV head).

Differences: both references assert ``budget > window``; fidbench's explicit rule is that the window
never exceeds half the budget, ``w = max(1, min(window, budget // 2))`` (``kept()["window"]`` is the
mean window used), which leaves every published setting unchanged. The budget comes from fidbench's
one rule (``_kv``; KVCache-Factory rounds a ratio budget with Python's round). Kept positions are
masked, not gathered (the same attention, see ``_kv``); ties in the top-k may break differently.
"""

from typing import Literal

import torch
import torch.nn.functional as F

from ..attention import AttentionCall
from ._kv import Evicting, last_rows_visible
from .base import register


@register
class SnapKV(Evicting):
    name = "snapkv"
    description = "after prefill, keep per head the window plus the positions the window's queries attend to most"
    defaults_from = ("FasterDecoding/SnapKV experiments/LongBench/config/ablation_c*_w32_k7_maxpool.json: window 32, "
                     "kernel 7, max pooling; granularity query_head as its code; budget: fidbench's rule (_kv)")
    test_params = {"degenerate": {"ratio": 1.0}, "real": {"budget": 12, "window": 4, "kernel": 3}}
    window: int = 32
    kernel: int = 7
    pooling: Literal["max", "avg"] = "max"
    granularity: Literal["query_head", "kv_head"] = "query_head"

    def validate(self):
        super().validate()
        if self.window < 1:
            raise ValueError(f"{self.name}: window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be a positive odd number (pooling keeps the length), "
                             f"got {self.kernel}")

    def __post_init__(self):
        super().__post_init__()
        self._windows = 0  # windows used, summed over samples

    def window_for(self, prompt_len: int) -> int:
        """The observation window at this prompt's budget: ``window``, at most half the budget."""
        return max(1, min(self.window, self.tokens(prompt_len) // 2))

    def begin(self, prompt_len: int) -> None:
        super().begin(prompt_len)
        self._windows += self.window_for(prompt_len)

    def score(self, call: AttentionCall) -> torch.Tensor:
        """(batch, query heads, prompt_len): pooled votes of the window's queries; the window itself inf."""
        b, kv_heads, p, d = call.key.shape
        w, g = self.window_for(p), call.groups
        # Queries grouped by the KV head they share: (b, kv_heads, groups * w, d), no copies of the keys.
        query = call.query[:, :, -w:].float().reshape(b, kv_heads, g * w, d)
        logits = query @ call.key.float().transpose(-1, -2) * call.kwargs.get("scaling", d**-0.5)
        visible = last_rows_visible(call, w).repeat(1, 1, g, 1)
        # Softmax in float32, then the model's dtype, as both references do before summing the votes.
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1).to(call.query.dtype)
        votes = probs.reshape(b * kv_heads * g, w, p)[..., : p - w].sum(1)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(votes[:, None], self.kernel, stride=1, padding=self.kernel // 2).reshape(b, kv_heads * g, p - w)
        return torch.cat([pooled, pooled.new_full((b, kv_heads * g, w), float("inf"))], dim=-1)

    def kept(self) -> dict:
        kept = super().kept()
        if self._budgets[1]:
            kept["window"] = self._windows / self._budgets[1]
        return kept
