"""``quest``: query-aware page selection (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference").

Nothing is evicted. The cache is cut into pages of ``page`` consecutive positions; each page's
elementwise minimum and maximum key bound q·k for any of its keys by sum_d max(q_d·min_d, q_d·max_d).
At every decode step each query attends only to the ``budget // page`` pages (at least one) with the
highest bound, the page holding the query itself always among them. The prefill is dense.

Differences from the paper: with grouped-query attention the bounds are averaged over the query
heads sharing a KV head, so the pages chosen are per KV head. The query's own page is always taken
(its keys are the most recent, and its min/max would otherwise depend on keys the query may not see
under parallel teacher forcing). As in the paper's evaluation, the first ``dense_layers`` layers stay
dense. The budget is fixed from the prompt length; pages span generated positions as well.
"""

import math

import torch
import torch.nn.functional as F

from ..attention import AttentionCall
from ._kv import KVMethod, leave_sliding, require_every_position, top_mask
from .base import register


@register
class Quest(KVMethod):
    name = "quest"
    description = "each decode query attends only to its top pages of keys by a min/max bound on q·k"
    test_params = {"degenerate": {"budget": 1024, "page": 8, "dense_layers": 0}, "real": {"budget": 16, "page": 8, "dense_layers": 0}}
    page: int = 16
    dense_layers: int = 2

    def validate(self):
        super().validate()
        if self.page < 1:
            raise ValueError(f"{self.name}: page must be >= 1, got {self.page}")
        if self.dense_layers < 0:
            raise ValueError(f"{self.name}: dense_layers must be >= 0, got {self.dense_layers}")
        if self.budget is not None and self.budget < self.page:
            raise ValueError(f"{self.name}: budget ({self.budget}) must hold at least one page ({self.page} tokens)")

    def attend(self, call: AttentionCall):
        if leave_sliding(self, call):
            return None
        if call.phase.name != "decode":
            return None
        require_every_position(self, call)
        b, kv_heads, kv, d = call.key.shape
        q, pages = call.query.shape[2], math.ceil(kv / self.page)
        chosen = max(1, self.tokens(call.phase.prompt_len) // self.page)
        visible = call.visible()
        if call.layer_idx < self.dense_layers or chosen >= pages:
            self.record_mask(call)
            return None
        # Page-wise key extremes; padding of the last page never wins a min or max.
        pad = (0, 0, 0, pages * self.page - kv)
        key = call.key.float()
        kmax = F.pad(key, pad, value=float("-inf")).reshape(b, kv_heads, pages, self.page, d).amax(3)
        kmin = F.pad(key, pad, value=float("inf")).reshape(b, kv_heads, pages, self.page, d).amin(3)
        query = call.query.float().reshape(b, kv_heads, call.groups, q, d)
        # max(q·min, q·max) per dimension = q+ · max + q- · min, summed over dimensions as one matmul each.
        bound = query.clamp(min=0) @ kmax[:, :, None].transpose(-1, -2) + query.clamp(max=0) @ kmin[:, :, None].transpose(-1, -2)
        bound = bound.mean(2)  # (b, kv_heads, q, pages)
        own = torch.arange(kv - q, kv, device=call.key.device)[:, None] // self.page
        index = torch.arange(pages, device=call.key.device)[None, :]
        bound = bound.masked_fill(index > own, float("-inf")).masked_fill(index == own, float("inf"))
        keep = top_mask(bound, chosen).repeat_interleave(self.page, dim=-1)[..., :kv]
        mask = visible & keep.repeat_interleave(call.groups, dim=1)
        self.record_mask(call, mask)
        return call.dense(mask=mask)
