"""``snapkv``: SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

After the prefill, each KV head keeps the last ``window`` prompt positions (the observation window)
plus the earlier prompt positions that the window's queries attend to most: attention probabilities
of the window's queries, summed over those queries, max-pooled over ``kernel`` neighbouring positions
(the paper's clustering), top ``budget - window``. Only the window's queries are scored against the
keys, never the n × n matrix.

Differences from the paper: with grouped-query attention the pooled scores are averaged over the
query heads sharing a KV head (the paper's models have one query head per KV head), so the choice is
one a real cache could make. The window counts inside the budget; a ratio budget below ``window``
(short prompts) keeps just the most recent ``budget`` positions, and an explicit ``budget`` below
``window`` is an error.
"""

import torch
import torch.nn.functional as F

from ..attention import AttentionCall
from ._kv import Evicting, last_rows_visible, top_mask
from .base import register


@register
class SnapKV(Evicting):
    name = "snapkv"
    description = "after prefill, keep per KV head the window plus the positions the window's queries attend to most"
    test_params = {"degenerate": {"ratio": 1.0}, "real": {"budget": 12, "window": 4, "kernel": 3}}
    window: int = 32
    kernel: int = 7

    def validate(self):
        super().validate()
        if self.window < 1:
            raise ValueError(f"{self.name}: window must be >= 1, got {self.window}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel must be a positive odd number (pooling keeps the length), got {self.kernel}")
        if self.budget is not None and self.window > self.budget:
            raise ValueError(f"{self.name}: window ({self.window}) must not exceed budget ({self.budget})")

    def scores(self, call: AttentionCall) -> torch.Tensor:
        """(batch, kv_heads, prompt_len - window): pooled attention of the window's queries to earlier positions."""
        b, kv_heads, p, d = call.key.shape
        w, g = self.window, call.groups
        # Queries grouped by the KV head they share: (b, kv_heads, groups * w, d), no copies of the keys.
        query = call.query[:, :, -w:].float().reshape(b, kv_heads, g * w, d)
        logits = query @ call.key.float().transpose(-1, -2) * call.kwargs.get("scaling", d**-0.5)
        visible = last_rows_visible(call, w).repeat(1, 1, g, 1)
        probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
        votes = probs.reshape(b * kv_heads * g, w, p)[..., : p - w].sum(1)
        pooled = F.max_pool1d(votes[:, None], self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.reshape(b, kv_heads, g, p - w).mean(2)

    def select(self, call: AttentionCall, n: int) -> torch.Tensor:
        p = call.phase.prompt_len
        b, kv_heads = call.key.shape[:2]
        if n <= self.window:  # the window alone fills the budget: keep the most recent positions
            keep = torch.zeros(b, kv_heads, p, dtype=torch.bool, device=call.key.device)
            keep[..., p - n :] = True
            return keep
        recent = torch.ones(b, kv_heads, self.window, dtype=torch.bool, device=call.key.device)
        return torch.cat([top_mask(self.scores(call), n - self.window), recent], dim=-1)
