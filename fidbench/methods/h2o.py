"""``h2o``: Heavy-Hitter Oracle KV eviction (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models").

Each KV head keeps its most recent positions plus "heavy hitters", the positions with the largest
attention accumulated over every query so far. The prefill runs dense; at its end each head keeps
the ``recent`` last prompt positions and the ``heavy`` earlier ones whose columns of the prompt's
causal attention probabilities sum highest. Each decode query then attends to the kept positions
plus itself, adds its attention probabilities to the accumulated scores, and while the cache is
over budget the lowest-scoring position outside the recent window is evicted for good: one
eviction per generated token, as in the paper's cache policy.

Budgets: ``heavy`` and ``recent`` are fractions of the prompt length (the original config: 0.1
and 0.1); their total is at least ``min_budget`` tokens (short prompts), split in the same
proportion. ``heavy_budget`` and ``recent_budget``, set together, are absolute token counts that
replace the fractions (``min_budget`` does not apply to them).

Differs from the paper: with grouped-query attention a KV head's score is the mean of the
probabilities of the query heads sharing it (the paper's models have one query head per KV head),
since only a per-KV-head choice is a cache that could really shrink. Eviction is simulated by
masking, exact for what the model computes because keys are cached after RoPE.
"""

import math

import torch

from ..attention import AttentionCall
from ._kv import kv_head_probs, leave_sliding
from .base import Method, register

# Prompt queries scored at once: a (chunk x prompt) block of probabilities, never prompt x prompt.
CHUNK = 256


@register
class H2O(Method):
    name = "h2o"
    description = "recent tokens plus heavy hitters by accumulated attention, evicted while decoding (H2O)"
    test_params = {"degenerate": {"heavy_budget": 1024, "recent_budget": 1024}, "real": {"heavy_budget": 6, "recent_budget": 6}}
    parallel_exact = False  # which positions are kept depends on every earlier decode query
    full_attention_only = True  # sliding-window layers keep the model's own window (fidbench.methods._kv)
    heavy: float = 0.1
    recent: float = 0.1
    heavy_budget: int | None = None
    recent_budget: int | None = None
    min_budget: int = 8

    def validate(self):
        for name in ("heavy", "recent"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"h2o: {name} is a fraction of the prompt and must be in [0, 1], got {value}")
        if not 0 < self.heavy + self.recent <= 1:
            raise ValueError(f"h2o: heavy + recent must be in (0, 1], got {self.heavy} + {self.recent}")
        if (self.heavy_budget is None) != (self.recent_budget is None):
            raise ValueError(
                "h2o: heavy_budget and recent_budget (absolute token counts) must be set together, "
                f"got heavy_budget={self.heavy_budget}, recent_budget={self.recent_budget}"
            )
        if self.heavy_budget is not None:
            for name in ("heavy_budget", "recent_budget"):
                if getattr(self, name) < 0:
                    raise ValueError(f"h2o: {name} must be >= 0, got {getattr(self, name)}")
            if self.heavy_budget + self.recent_budget < 1:
                raise ValueError("h2o: heavy_budget + recent_budget must be >= 1")
        if self.min_budget < 1:
            raise ValueError(f"h2o: min_budget must be >= 1, got {self.min_budget}")

    def begin(self, prompt_len: int) -> None:
        if self.heavy_budget is not None:
            self.budgets = (self.heavy_budget, self.recent_budget)
        else:
            share = self.heavy + self.recent
            total = max(math.floor(share * prompt_len + 0.5), self.min_budget)
            recent = math.floor(total * self.recent / share + 0.5)
            self.budgets = (total - recent, recent)
        self.keep: dict[int, torch.Tensor] = {}  # layer -> (B, KVH, positions) bool: not evicted
        self.score: dict[int, torch.Tensor] = {}  # layer -> (B, KVH, positions) float32: accumulated attention

    def attend(self, call: AttentionCall):
        if leave_sliding(self, call):
            return None
        layer, n = call.layer_idx, call.key.shape[2]
        heavy, recent = self.budgets
        visible = call.visible()
        if call.phase.name == "prefill":
            if call.query.shape[2] != n:
                raise ValueError("h2o: the prompt must be prefilled in one forward")
            score = torch.zeros(call.key.shape[:3], device=call.key.device)
            for start in range(0, n, CHUNK):
                rows = visible[:, :, start : start + CHUNK]
                # Keys after the last one these queries see (the causal future) would only add zeros.
                end = int(rows.reshape(-1, n).any(0).nonzero().max()) + 1
                probs = kv_head_probs(call, call.query[:, :, start : start + CHUNK], rows[..., :end])
                score[..., :end] += probs.sum(2)
            keep = torch.ones_like(score, dtype=torch.bool)
            if n > heavy + recent:
                keep[..., : n - recent] = False
                keep.scatter_(-1, score[..., : n - recent].topk(heavy, dim=-1).indices, True)
            self.keep[layer], self.score[layer] = keep, score
            return None  # the prompt itself is attended densely, as in the paper
        if call.query.shape[2] != 1:
            raise ValueError("h2o evicts after every generated token: decode one token per forward (stepwise)")
        keep = torch.cat([self.keep[layer], self.keep[layer].new_ones(*call.key.shape[:2], 1)], -1)
        mask = keep[:, :, None] & visible  # (B, KVH, 1, n)
        probs = kv_head_probs(call, call.query, mask)[:, :, 0]
        score = torch.cat([self.score[layer], probs.new_zeros(*call.key.shape[:2], 1)], -1) + probs
        heads = mask.repeat_interleave(call.groups, dim=1)
        self.record(layer, heads.sum(), visible.expand_as(heads).sum())
        # Nothing evicted yet: the model's own attention, bit for bit.
        out = None if bool(keep.all()) else call.dense(mask=heads)
        over = keep.sum(-1, keepdim=True) > heavy + recent  # at most one position over: one token came in
        old = keep.clone()
        old[..., max(n - recent, 0) :] = False
        victim = score.masked_fill(~old, math.inf).argmin(-1, keepdim=True)
        keep.scatter_(-1, victim, keep.gather(-1, victim) & ~over)
        self.keep[layer], self.score[layer] = keep, score
        return out
