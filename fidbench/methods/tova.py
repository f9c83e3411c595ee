"""``tova``: Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs").

A fixed-size cache: each KV head keeps at most ``budget`` positions. The prefill runs dense; at its
end each head keeps the prompt positions the last prompt query attends to most. Each decode query
attends to the kept positions plus itself; then, while the cache is over budget, the position it
attended to least is evicted for good. That may be the new token itself, as in the paper.

Budget: ``ratio`` of the prompt length, at least ``min_budget`` tokens (short prompts), or an
absolute ``budget`` that replaces the ratio (``min_budget`` does not apply to it).

Differs from the paper: TOVA averages the attention over all heads of a layer and drops the same
position from every head; here each KV head chooses by the mean over the query heads sharing it
(the issue's per-KV-head rule, like every eviction method of fidbench). Eviction is simulated by
masking, exact for what the model computes because keys are cached after RoPE.
"""

import math

import torch

from ..attention import AttentionCall
from ._kv import kv_head_probs, leave_sliding
from .base import Method, register


@register
class TOVA(Method):
    name = "tova"
    description = "fixed-size cache: each step evicts the position the current query attends to least (TOVA)"
    test_params = {"degenerate": {"budget": 1024}, "real": {"budget": 12}}
    parallel_exact = False  # which positions are kept depends on every earlier decode query
    full_attention_only = True  # sliding-window layers keep the model's own window (fidbench.methods._kv)
    ratio: float = 0.1
    budget: int | None = None
    min_budget: int = 8

    def validate(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"tova: ratio is a fraction of the prompt and must be in (0, 1], got {self.ratio}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"tova: budget must be >= 1 token, got {self.budget}")
        if self.min_budget < 1:
            raise ValueError(f"tova: min_budget must be >= 1, got {self.min_budget}")

    def begin(self, prompt_len: int) -> None:
        self.size = self.budget if self.budget is not None else max(
            math.floor(self.ratio * prompt_len + 0.5), self.min_budget
        )
        self.keep: dict[int, torch.Tensor] = {}  # layer -> (B, KVH, positions) bool: not evicted

    def attend(self, call: AttentionCall):
        if leave_sliding(self, call):
            return None
        layer, n = call.layer_idx, call.key.shape[2]
        visible = call.visible()
        if call.phase.name == "prefill":
            if call.query.shape[2] != n:
                raise ValueError("tova: the prompt must be prefilled in one forward")
            keep = call.key.new_ones(call.key.shape[:3], dtype=torch.bool)
            if n > self.size:
                last = kv_head_probs(call, call.query[:, :, -1:], visible[:, :, -1:])[:, :, 0]
                keep = torch.zeros_like(keep).scatter_(-1, last.topk(self.size, dim=-1).indices, True)
            self.keep[layer] = keep
            return None  # the prompt itself is attended densely, as in the paper
        if call.query.shape[2] != 1:
            raise ValueError("tova evicts after every generated token: decode one token per forward (stepwise)")
        keep = torch.cat([self.keep[layer], self.keep[layer].new_ones(*call.key.shape[:2], 1)], -1)
        mask = keep[:, :, None] & visible  # (B, KVH, 1, n)
        probs = kv_head_probs(call, call.query, mask)[:, :, 0]
        heads = mask.repeat_interleave(call.groups, dim=1)
        self.record(layer, heads.sum(), visible.expand_as(heads).sum())
        # Nothing evicted yet: the model's own attention, bit for bit.
        out = None if bool(keep.all()) else call.dense(mask=heads)
        over = keep.sum(-1, keepdim=True) > self.size  # at most one position over: one token came in
        victim = probs.masked_fill(~keep, math.inf).argmin(-1, keepdim=True)
        keep.scatter_(-1, victim, keep.gather(-1, victim) & ~over)
        self.keep[layer] = keep
        return out
