"""``quest``: query-aware page selection (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference").

Nothing is evicted. The cache is cut into pages of ``page`` consecutive positions (aligned to position
0); each page's elementwise key maximum and minimum bound q·k for any of its keys by
``sum_d max(q_d · max_d, q_d · min_d)``. A decode query at position t attends only to the
``min(max(3, budget // page), pages)`` pages with the highest bound, ``pages`` being those holding
positions up to t: at least three, all of them while the cache holds no more. The prefill and the first
``dense_layers`` layers stay dense.

Follows Quest's accuracy-evaluation code (mit-han-lab/Quest ``evaluation/quest_attention.py``, the code
behind its LongBench and passkey numbers): keys are repeated to the query heads before scoring, so
every query head chooses its own pages (granularity ``query_head``); the page holding the query is not
forced but competes, its bound computed over the keys up to the query; pages of 16 and the first two
layers dense, as in its scripts. Quest's budget is in tokens; here it is fidbench's one rule (``_kv``).

Differences: Quest's code takes ``min(t + 1, budget) // page`` pages, which leaves out the partial last
page when the budget holds the whole cache; fidbench attends to every key then (a budget covering the
cache equals dense attention; it never happens at the suite's ratio budgets). The bound is computed as
``q⁺ · max + q⁻ · min`` (two products, the same sum as Quest's ``|q| · max(sign(q) · k)`` up to float
rounding). The evaluation code counts layers with a global counter that is right only for 32-layer
models; ``dense_layers`` counts from the model's first layer. Under parallel teacher forcing each query
sees the page bounds of the keys up to its own position, exactly what a token-by-token decode computes.
"""

import math

import torch
import torch.nn.functional as F

from ..attention import AttentionCall
from ._kv import KVMethod, leave_sliding, require_every_position
from .base import register

MIN_PAGES = 3  # Quest's evaluation code: min(max(3, budget // page), pages)


@register
class Quest(KVMethod):
    name = "quest"
    description = "each decode query head attends only to its top pages of keys by a min/max bound on q·k"
    defaults_from = ("mit-han-lab/Quest evaluation scripts: pages of 16, the first 2 layers dense; budget: "
                     "fidbench's rule (_kv)")
    test_params = {"degenerate": {"budget": 1024, "page": 8, "dense_layers": 0},
                   "real": {"budget": 16, "page": 4, "dense_layers": 0}}
    granularity = "query_head"
    page: int = 16
    dense_layers: int = 2

    def validate(self):
        super().validate()
        if self.page < 1:
            raise ValueError(f"{self.name}: page must be >= 1, got {self.page}")
        if self.dense_layers < 0:
            raise ValueError(f"{self.name}: dense_layers must be >= 0, got {self.dense_layers}")

    def pages_for(self, position: int, budget: int) -> int:
        """Pages the query at ``position`` attends to: Quest's rule, capped by the pages it can see; all of
        them when the budget holds every key it can see."""
        pages = position // self.page + 1
        return pages if budget > position else min(max(MIN_PAGES, budget // self.page), pages)

    def attend(self, call: AttentionCall):
        if leave_sliding(self, call):
            return None
        if call.phase.name != "decode":
            return None
        require_every_position(self, call)
        b, kv_heads, kv, d = call.key.shape
        q, start, budget = call.query.shape[2], call.query_start(), self.tokens(call.phase.prompt_len)
        rows = range(start, start + q)  # the queries' positions
        chosen = [self.pages_for(t, budget) for t in rows]
        if call.layer_idx < self.dense_layers or all(c == t // self.page + 1 for c, t in zip(chosen, rows)):
            self.record_mask(call)
            return None
        self.note_heads(sum(min(c * self.page, t + 1) for c, t in zip(chosen, rows)) / q)
        pages, device = math.ceil(kv / self.page), call.key.device
        # Running extremes inside each page: entry j holds max / min over its page's keys up to j.
        pad = (0, 0, 0, pages * self.page - kv)
        key = call.key.float()
        run_max = F.pad(key, pad, value=-math.inf).unflatten(2, (pages, self.page)).cummax(3).values
        run_min = F.pad(key, pad, value=math.inf).unflatten(2, (pages, self.page)).cummin(3).values
        query = call.query.float().unflatten(1, (kv_heads, call.groups))  # (b, kv_heads, groups, q, d)
        plus, minus = query.clamp(min=0), query.clamp(max=0)
        # Pages before the query's own are complete: their bound is one product per sign.
        page_max, page_min = run_max[:, :, None, :, -1], run_min[:, :, None, :, -1]  # (b, kv_heads, 1, pages, d)
        bound = plus @ page_max.transpose(-1, -2) + minus @ page_min.transpose(-1, -2)
        # The query's own page: extremes over its keys up to the query (what a token-by-token decode holds).
        positions = torch.arange(start, start + q, device=device)
        own_max = run_max.flatten(2, 3)[:, :, None, positions]  # (b, kv_heads, 1, q, d)
        own_min = run_min.flatten(2, 3)[:, :, None, positions]
        own = (plus * own_max + minus * own_min).sum(-1, keepdim=True)
        page_of = positions[:, None] // self.page
        index = torch.arange(pages, device=device)[None, :]
        bound = bound.scatter(-1, page_of.expand_as(own), own).masked_fill(index > page_of, -math.inf)
        # Each query row keeps its own number of pages: those ranked above it (a stable sort breaks ties).
        rank = bound.sort(dim=-1, descending=True, stable=True).indices.argsort(-1)
        count = torch.where(positions[:, None] < budget, page_of + 1, max(MIN_PAGES, budget // self.page))
        keep = rank < torch.minimum(count, page_of + 1)  # pages_for, per row, on the device
        keep = keep.repeat_interleave(self.page, dim=-1)[..., :kv].flatten(1, 2)  # (b, heads, q, kv)
        mask = call.visible() & keep
        self.record_mask(call, mask)
        return call.dense(mask=mask)
