"""Shared by the KV-cache methods: the token budget, and eviction as a mask over prompt positions.

Budget: a KV method takes either ``ratio`` (a fraction of the prompt) or ``budget`` (tokens), not
both; with neither it uses ``ratio = DEFAULT_RATIO``. A ratio budget is round(ratio × prompt length),
at least 1 token: a 30-token prompt at ratio 0.1 keeps 3 positions per KV head and layer. A budget
at or above the prompt length evicts nothing.

Eviction is masking: the cache keeps every key and decode queries do not attend to the evicted
prompt positions. This computes exactly what a physically pruned cache would (keys are cached after
RoPE, so a kept key's position is unchanged) and allows a different choice per KV head. Positions
generated after the prompt stay visible. ``record_mask`` counts, per layer, the prompt positions decode
queries attend to over those the dense model lets them see: ``kept()["kv_fraction"]``.

Sliding-window layers (Gemma 3's local layers, Mistral, Phi-3 with a window) are left to the model's
own window: every KV method here (eviction, quest, streamingllm, h2o, tova, kivi) compresses only
full-attention layers. A sliding layer's cache already holds at most ``sliding_window`` positions, it
drops old positions itself (so key index j is no longer position j), and the methods' papers budget
the full cache. Those layers are recorded as dense (what their decode queries attend is everything
their window shows), so ``kv_fraction`` stays the fraction of what the dense model attends. A model
with no full-attention layer is refused by ``Method.apply`` (the method would change nothing).
On full-attention layers key index j must be position j: a cache that drops positions there is
refused with an error.
"""

from __future__ import annotations

import math

import torch

from ..attention import AttentionCall
from .base import Method

DEFAULT_RATIO = 0.25


class KVMethod(Method):
    """A method with a KV budget: ``ratio`` of the prompt or ``budget`` tokens (not both)."""

    full_attention_only = True

    ratio: float | None = None
    budget: int | None = None

    def __post_init__(self):
        if self.ratio is None and self.budget is None:
            self.ratio = DEFAULT_RATIO
        super().__post_init__()

    def validate(self):
        if self.ratio is not None and self.budget is not None:
            raise ValueError(
                f"{self.name}: give either ratio or budget, not both (got ratio={self.ratio}, budget={self.budget})"
            )
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"{self.name}: ratio must be in (0, 1], got {self.ratio}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"{self.name}: budget must be a positive number of tokens, got {self.budget}")

    def tokens(self, prompt_len: int) -> int:
        """The token budget for a prompt of ``prompt_len`` tokens (may exceed it: then nothing is evicted)."""
        if self.budget is not None:
            return self.budget
        return max(1, math.floor(self.ratio * prompt_len + 0.5))


class Evicting(KVMethod):
    """Eviction decided once after the prefill: ``select`` picks the prompt positions each KV head keeps.

    The prefill itself stays dense; decode queries see only the kept prompt positions.
    """

    def begin(self, prompt_len: int) -> None:
        self.keep: dict[int, torch.Tensor | None] = {}  # layer -> (batch, kv_heads, prompt_len) bool, None = all

    def layer_budget(self, call: AttentionCall) -> int:
        """Prompt positions each KV head of this layer keeps."""
        return self.tokens(call.phase.prompt_len)

    def select(self, call: AttentionCall, n: int) -> torch.Tensor:
        """Bool (batch, kv_heads, prompt_len) with exactly ``n`` < prompt_len positions kept per KV head."""
        raise NotImplementedError

    def attend(self, call: AttentionCall):
        if leave_sliding(self, call):
            return None
        if call.phase.name == "prefill":
            n = self.layer_budget(call)
            self.keep[call.layer_idx] = None if n >= call.phase.prompt_len else self.select(call, n)
            return None
        require_every_position(self, call)
        keep = self.keep[call.layer_idx]
        visible = call.visible()
        if keep is None:
            self.record_mask(call)
            return None
        mask = visible.expand(*call.query.shape[:3], -1).clone()
        mask[..., : call.phase.prompt_len] &= keep.repeat_interleave(call.groups, dim=1)[:, :, None, :]
        self.record_mask(call, mask)
        return call.dense(mask=mask)


def leave_sliding(method: Method, call: AttentionCall) -> bool:
    """True on a sliding-window layer, which KV methods leave dense; decode calls are recorded as all kept."""
    if call.sliding_window is None:
        return False
    method.record_mask(call)
    return True


def require_every_position(method: Method, call: AttentionCall) -> None:
    """Refuse caches that drop positions (sliding-window layers): these methods read key index j as position j."""
    p, q, kv = call.phase.prompt_len, call.query.shape[2], call.key.shape[2]
    if call.phase.name == "decode" and kv < p + q:
        raise ValueError(
            f"{method.name}: layer {call.layer_idx} caches {kv} keys for a {p}-token prompt and {q} new tokens; "
            f"its cache drops positions, and KV methods need every position of a full-attention layer cached"
        )


def top_mask(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` largest entries along the last dimension."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, scores.topk(n, dim=-1).indices, True)


def last_rows_visible(call: AttentionCall, rows: int) -> torch.Tensor:
    """The model's (batch|1, 1, rows, kv) mask for the last ``rows`` queries, without building all rows."""
    mask = call.attention_mask
    if mask is not None:
        mask = mask[..., -rows:, :]
        return mask if mask.dtype == torch.bool else mask == 0  # an additive float mask
    kv = call.key.shape[2]
    q = torch.arange(kv - rows, kv, device=call.key.device)[:, None]
    return (torch.arange(kv, device=call.key.device)[None, :] <= q)[None, None]


def kv_head_probs(call: AttentionCall, query: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 attention probabilities of ``query`` rows (B, H, q, D) over the first K keys, averaged over
    the query heads of each KV head: (B, KVH, q, K). ``mask`` (B|1, KVH|1, q, K) is True where a key is seen."""
    scale = call.kwargs.get("scaling") or query.shape[-1] ** -0.5
    q = query.float().unflatten(1, (call.key.shape[1], call.groups))  # (B, KVH, G, q, D)
    key = call.key[:, :, : mask.shape[-1]].float()
    logits = (q @ key[:, :, None].transpose(-1, -2)) * scale
    return logits.masked_fill(~mask[:, :, None], -math.inf).softmax(-1).mean(2)
