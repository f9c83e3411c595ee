"""``topk``: top-k sparse attention during decoding (the original fidbench method).

Each query head attends only to the ``keep`` fraction of the keys it may see with the largest q·k,
never fewer than ``min_keep``. The prefill stays dense. The original config ``mask_out: 0.9,
min_remain: 8`` is ``keep: 0.1, min_keep: 8``.
"""

import math

import torch

from ..attention import AttentionCall
from .base import Method, register


@register
class TopK(Method):
    name = "topk"
    description = "decode queries attend only to their top `keep` fraction of keys by q·k (>= min_keep)"
    defaults_from = "no reference setting: fidbench's oracle top-k (keep 10 %, at least 8 keys)"
    test_params = {"degenerate": {"keep": 1.0}, "real": {"keep": 0.1, "min_keep": 2}}
    role = "select"
    base_prefill = True  # decode queries only
    keep: float = 0.1
    min_keep: int = 8

    def validate(self):
        if not 0 < self.keep <= 1:
            raise ValueError(f"topk: keep must be in (0, 1], got {self.keep}")
        if self.min_keep < 1:
            raise ValueError(f"topk: min_keep must be >= 1, got {self.min_keep}")

    def attend(self, call: AttentionCall):
        if call.phase.name != "decode":
            return None
        visible = call.visible()
        key = call.key.repeat_interleave(call.groups, dim=1)
        scores = (call.query @ key.transpose(-1, -2)).masked_fill(~visible, -math.inf)
        n_visible = visible.sum(-1, keepdim=True)  # (b|1, 1, q, 1)
        budget = torch.clamp((n_visible * self.keep).ceil(), min=self.min_keep)
        budget = torch.minimum(budget, n_visible).expand(*scores.shape[:-1], 1)
        # Keep exactly `budget` keys per query head: those above the budget-th largest score, then the
        # keys equal to it, lowest positions first (a stable descending sort's order). torch.topk up to
        # the largest possible budget (from shapes: a query sees at most every key) instead of sorting
        # every key: the sort was most of the decode's time. A query that sees no key at all (a padding
        # row of a left-padded batch) has budget 0: its index is clamped, and `& visible` keeps its row
        # as empty as the model's mask made it. Ties are resolved on the device, without asking the host
        # whether there are any: with no surplus of ties this keeps every key at or above the threshold.
        kv = scores.shape[-1]
        most = min(kv, max(math.ceil(kv * self.keep) + 1, self.min_keep))  # + 1: float32 ceil may round up
        threshold = scores.topk(most, dim=-1).values.gather(-1, budget.long().clamp(min=1) - 1)
        above = scores > threshold
        ties = (scores == threshold) & visible
        keep = above | (ties & (ties.cumsum(-1) <= budget - above.sum(-1, keepdim=True)))
        self.record(call.layer_idx, budget.sum(), n_visible.expand_as(budget).sum())
        return call.dense(mask=keep)
