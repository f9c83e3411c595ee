"""``h2o``: Heavy-Hitter Oracle KV eviction (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models").

Each head keeps its most recent positions plus "heavy hitters", the positions with the largest
attention accumulated over every query so far. The prefill runs dense; at its end each head keeps the
``recent`` last prompt positions and the earlier ones whose columns of the prompt's causal attention
probabilities sum highest. Each decode query then attends to the kept positions plus itself, adds its
attention probabilities to the accumulated scores, and once the cache is over budget the lowest-scoring
position outside the recent window is evicted for good: one eviction per generated token. A forward of
several reference tokens (parallel teacher forcing) runs that loop query by query inside each layer, so it
computes exactly what the token-by-token decode does (``_kv.DecodeEvicting``).

Follows H2O's real-drop cache (FMInference/H2O ``h2o_hf/utils_real_drop/modify_llama.py``,
``H2OKVCache_LayerWise``): scores are attention probabilities summed over queries and accumulated over
steps; the cache keeps ``topk(heavy)`` outside the last ``recent`` entries. Budget: fidbench's one rule
(``_kv``: ``ratio``/``budget``, ``min_budget``), of which the fraction ``recent`` (rounded half up) is
the recent window and the rest heavy hitters; the paper's setting (heavy 0.1 + recent 0.1 of the
prompt) is ``ratio: 0.2, recent: 0.5``.

``granularity``: ``kv_head`` (default; a KV head's score is the mean of the probabilities of the query
heads sharing it, as kvpress's ObservedAttentionPress averages over the group) or ``query_head`` (every
query head keeps its own cache, as H2O's per-head scores do; H2O's code runs only multi-head models,
where both coincide). Differences: eviction is masking (exact, see ``_kv``); original positions are
kept (H2O's streaming variant re-numbers them).
"""

from typing import Literal

import torch

from ..attention import AttentionCall
from ._kv import DecodeEvicting, head_probs, round_half_up
from .base import register

# Prompt queries scored at once: a (chunk x prompt) block of probabilities, never prompt x prompt.
CHUNK = 256


@register
class H2O(DecodeEvicting):
    name = "h2o"
    description = "recent tokens plus heavy hitters by accumulated attention, evicted while decoding (H2O)"
    defaults_from = ("FMInference/H2O real-drop cache (heavy + recent); recent 0.5 splits fidbench's budget as the "
                     "paper's heavy 0.1 + recent 0.1; granularity kv_head: kvpress ObservedAttentionPress")
    test_params = {"degenerate": {"budget": 1024}, "real": {"budget": 12}}
    recent: float = 0.5
    granularity: Literal["kv_head", "query_head"] = "kv_head"
    per_sample = ("keep", "recent_tokens", "score")

    def validate(self):
        super().validate()
        if not 0 <= self.recent <= 1:
            raise ValueError(f"h2o: recent is the budget's share for recent tokens, in [0, 1], got {self.recent}")

    def begin(self, prompt_len: int) -> None:
        super().begin(prompt_len)
        self.recent_tokens = round_half_up(self.tokens(prompt_len) * self.recent)
        self.score: dict[int, torch.Tensor] = {}  # layer -> (B, heads, positions) float32: accumulated attention

    def prefill_keep(self, call: AttentionCall, size: int) -> torch.Tensor:
        n, recent = call.key.shape[2], self.recent_tokens
        # The column sums depend on the granularity only: on a shared prefill every budget reuses them.
        score = call.once(("h2o column sums", self.granularity), lambda c: column_sums(c, self.granularity)).clone()
        self.score[call.layer_idx] = score  # scored even when nothing is evicted yet: decode steps add to it
        keep = torch.ones_like(score, dtype=torch.bool)
        if n > size:
            keep[..., : n - recent] = False
            keep.scatter_(-1, score[..., : n - recent].topk(size - recent, dim=-1).indices, True)
        return keep

    def victim_scores(self, call: AttentionCall, probs: torch.Tensor, length: int) -> torch.Tensor:
        layer, keys = call.layer_idx, probs.shape[-1]
        score = self.score[layer]
        if score.shape[-1] < keys:  # a decode forward's first query: its new positions start at zero
            score = torch.cat([score, score.new_zeros(*score.shape[:2], keys - score.shape[-1])], -1)
        score = score + probs  # accumulated one query at a time, in order
        self.score[layer] = score
        recent = torch.arange(keys, device=score.device) >= length - self.recent_tokens
        return score.masked_fill(recent, float("inf"))  # the recent window is never evicted


def column_sums(call: AttentionCall, granularity: str) -> torch.Tensor:
    """(B, heads, prompt_len) float32: each prompt position's causal attention probabilities summed over
    every prompt query, per head of ``granularity``."""
    n, score = call.key.shape[2], None
    visible = call.visible()
    for start in range(0, n, CHUNK):
        # Causal: these queries see no key after the chunk's last one (the rest would only add zeros).
        end = min(start + CHUNK, n)
        probs = head_probs(call, call.query[:, :, start:end], visible[:, :, start:end, :end], granularity)
        if score is None:
            score = probs.new_zeros(*probs.shape[:2], n)
        score[..., :end] += probs.sum(2)
    return score
