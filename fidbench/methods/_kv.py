"""Shared by the KV-cache methods: one budget rule, eviction as a score plus an allocation, and the
decode-time eviction loop of H2O and TOVA (exact in one forward over the reference too).

Budget (every KV method): either ``ratio`` (a fraction of the prompt) or ``budget`` (tokens), not
both; with neither, ``ratio = DEFAULT_RATIO``. A ratio budget is ``round_half_up(ratio × prompt
length)``, at least ``min_budget`` tokens (default ``MIN_BUDGET``); an explicit ``budget`` is taken
as given. A budget at or above the prompt length evicts nothing (as in every reference). ``kept()``
reports the nominal budget (``budget``, mean tokens per sample) next to what each head really kept
(``budget_per_head``: mean, min and max over samples, compressed layers and heads), so methods run
at the same ratio can be seen to run at the same budget.

Eviction after the prefill (``Evicting``, like kvpress's ``ScorerPress``): a method only scores
prompt positions per head (``score``), and an allocation turns scores into kept positions: by
default the same number per head (``allocate``: the top ``n``), per layer (``layer_budget``:
PyramidKV), or adaptively across the heads of a layer (``adakv``, which wraps any scorer). Heads are
those of the method's ``granularity``: ``query_head`` (a choice per query head, the cache stored per
query head, as SnapKV's and KVCache-Factory's code do after ``repeat_kv``), ``kv_head`` (scores
averaged over the query heads sharing a KV head, as kvpress does), or ``layer`` (one choice for every
head, as TOVA does).

Eviction is masking: the cache keeps every key and decode queries do not attend to evicted prompt
positions. This computes exactly what a physically pruned cache would (keys are cached after RoPE,
so a kept key's position is unchanged; tests/test_physical.py checks every KV method against a
physically pruned cache over 20 decode steps). Positions generated after the prompt stay visible.
``record_mask`` counts, per layer, the prompt positions decode queries attend to over those the dense
model lets them see: ``kept()["kv_fraction"]``.

Sliding-window layers (Gemma 3's local layers, Mistral, Phi-3 with a window) are left to the model's
own window: every KV method compresses only full-attention layers. A sliding layer's cache already
holds at most ``sliding_window`` positions, it drops old positions itself (so key index j is no
longer position j), and the methods' papers budget the full cache. Those layers are recorded as dense,
so ``kv_fraction`` stays the fraction of what the dense model attends. A model with no full-attention
layer is refused by ``Method.apply``. On full-attention layers key index j must be position j: a cache
that drops positions there is refused with an error.

No hook reads a tensor's value on the host: sizes come from shapes and ``Phase``, counters stay tensors.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from ..attention import AttentionCall
from .base import Method

DEFAULT_RATIO = 0.25
MIN_BUDGET = 8  # the one minimum of every KV method's ratio budget (H2O's and TOVA's earlier min_budget)


def round_half_up(x: float) -> int:
    """The one rounding rule of KV budgets: halves round up (Python's round() would round them to even)."""
    return math.floor(x + 0.5)


class KVMethod(Method):
    """A method with a KV budget: ``ratio`` of the prompt or ``budget`` tokens (not both), see the module doc."""

    full_attention_only = True
    role = "select"  # eviction and page selection decide which keys a query sees
    base_prefill = True  # every KV method scores or masks what the dense prefill cached (StreamingLLM: see there)
    granularity: ClassVar[str] = "kv_head"  # overridden, or made a parameter, where references disagree

    ratio: float | None = None
    budget: int | None = None
    min_budget: int = MIN_BUDGET
    per_sample = ()  # begin only adds to the budget totals

    def __post_init__(self):
        if self.ratio is None and self.budget is None:
            self.ratio = DEFAULT_RATIO
        super().__post_init__()
        self._budgets = [0, 0]  # nominal budget tokens summed over samples, samples
        self._heads = None  # [sum of per-layer means, layers, min, max] of the entries each head kept

    def validate(self):
        if self.ratio is not None and self.budget is not None:
            raise ValueError(
                f"{self.name}: give either ratio or budget, not both (got ratio={self.ratio}, budget={self.budget})"
            )
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"{self.name}: ratio must be in (0, 1], got {self.ratio}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"{self.name}: budget must be a positive number of tokens, got {self.budget}")
        if self.min_budget < 1:
            raise ValueError(f"{self.name}: min_budget must be >= 1, got {self.min_budget}")

    def tokens(self, prompt_len: int) -> int:
        """The token budget for a prompt of ``prompt_len`` tokens (may exceed it: then nothing is evicted)."""
        if self.budget is not None:
            return self.budget
        return max(self.min_budget, round_half_up(self.ratio * prompt_len))

    def begin(self, prompt_len: int) -> None:
        self._budgets[0] += self.tokens(prompt_len)
        self._budgets[1] += 1

    def note_heads(self, per_head) -> None:
        """Record the entries each head of a layer keeps: a (batch, heads) tensor, or an int for every head.

        Each (sample, layer) counts once, with the mean over its heads; tensors stay where they are."""
        if isinstance(per_head, torch.Tensor):
            per_head = per_head.float()
            mean, low, high = per_head.mean(), per_head.min(), per_head.max()
        else:
            mean = low = high = per_head
        if self._heads is None:
            self._heads = [mean, 1, low, high]
            return
        total, count, lowest, highest = self._heads
        self._heads = [total + mean, count + 1, _extreme(min, lowest, low), _extreme(max, highest, high)]

    def kept(self) -> dict:
        kept = super().kept()
        total, samples = self._budgets
        if samples:
            kept["budget"] = total / samples
        if self._heads is not None:
            total, count, low, high = self._heads
            kept["budget_per_head"] = float(total) / count
            kept["budget_per_head_range"] = [float(low), float(high)]
        kept["granularity"] = self.granularity
        return kept


class Evicting(KVMethod):
    """Eviction decided once after the dense prefill: ``score`` ranks prompt positions per head, the
    allocation keeps the best ``layer_budget`` of them per head (``allocate``). Decode queries see the
    kept prompt positions and every generated one."""

    per_sample = ("keep",)

    def begin(self, prompt_len: int) -> None:
        super().begin(prompt_len)
        self.keep: dict[int, torch.Tensor | None] = {}  # layer -> (batch, heads, prompt_len) bool, None = all

    def score(self, call: AttentionCall) -> torch.Tensor:
        """(batch, query or KV heads, prompt_len) float: higher is kept first, ``inf`` is always kept."""
        raise NotImplementedError

    def layer_budget(self, call: AttentionCall) -> int:
        """Prompt positions each head of this layer keeps (on average, for an adaptive allocation)."""
        return self.tokens(call.phase.prompt_len)

    def allocate(self, scores: torch.Tensor, n: int) -> torch.Tensor:
        """Bool (batch, heads, prompt_len): the ``n`` best positions of every head."""
        return top_mask(scores, n)

    def attend(self, call: AttentionCall):
        if leave_sliding(self, call):
            return None
        p = call.phase.prompt_len
        if call.phase.name == "prefill":
            n = self.layer_budget(call)
            if n >= p:
                self.keep[call.layer_idx] = None
                self.note_heads(p)
            else:
                keep = self.allocate(by_granularity(self.score(call), call, self.granularity), n)
                self.keep[call.layer_idx] = keep
                self.note_heads(keep.sum(-1))
            return None
        require_every_position(self, call)
        keep = self.keep[call.layer_idx]
        if keep is None:
            self.record_mask(call)
            return None
        mask = call.visible().expand(*call.query.shape[:3], -1).clone()
        mask[..., :p] &= per_query_head(keep, call)[:, :, None, :]
        self.record_mask(call, mask)
        return call.dense(mask=mask)


class DecodeEvicting(KVMethod):
    """A cache of at most ``tokens(prompt_len)`` entries per head, evicting while decoding (H2O, TOVA).

    The prefill runs dense and ends with a one-shot cut to the budget (``prefill_keep``). Each decode
    query attends to the kept positions plus itself; its probabilities update the eviction scores
    (``victim_scores``), then, if the cache holds one entry over budget, the eligible entry with the
    lowest score is evicted for good. The number of entries follows from shapes: after the prefill
    min(prompt, budget), then one more per query until the budget is full.

    A forward of q decode queries (parallel teacher forcing) runs that sequence row by row inside each
    layer: row i attends to the keep-set left by rows < i plus its own position, then evicts as above;
    the q masks go to one dense attention call. This is exactly the references' token-by-token loop:
    a layer's eviction after query t depends only on its queries at positions <= t and its keys, and
    a layer's input at position t only on earlier layers' outputs at positions <= t, so every row
    sees what it would see one token per forward. A one-token forward is the same loop with one row.
    """

    parallel_exact = True  # the row-by-row loop above (tests/test_h2o_tova.py compares both modes)
    per_sample = ("keep",)

    def begin(self, prompt_len: int) -> None:
        super().begin(prompt_len)
        self.keep: dict[int, torch.Tensor] = {}  # layer -> (batch, heads, positions) bool: not evicted

    def prefill_keep(self, call: AttentionCall, size: int) -> torch.Tensor:
        """Bool (batch, heads, prompt_len): ``min(prompt_len, size)`` positions kept per head."""
        raise NotImplementedError

    def victim_scores(self, call: AttentionCall, probs: torch.Tensor, length: int) -> torch.Tensor:
        """(batch, heads, keys): one query's ``probs`` over the layer's keys (zero past the query's own
        position) turned into eviction scores, while the cache holds positions ``0 .. length - 1``; the
        lowest among those still kept goes (``inf`` = not eligible). Called once per query, in order."""
        raise NotImplementedError

    def attend(self, call: AttentionCall):
        if leave_sliding(self, call):
            return None
        layer, q, n = call.layer_idx, call.query.shape[2], call.key.shape[2]
        size = self.tokens(call.phase.prompt_len)
        if call.phase.name == "prefill":
            if q != n:
                raise ValueError(f"{self.name}: the prompt must be prefilled in one forward")
            self.keep[layer] = self.prefill_keep(call, size)
            self.note_heads(min(n, size))
            return None  # the prompt itself is attended densely, as in the papers
        previous = self.keep[layer]
        keep = torch.cat([previous, previous.new_ones(*previous.shape[:2], q)], -1)  # the q new positions too
        visible = call.visible()  # (B|1, 1, q, n): each row sees no later position
        positions = torch.arange(n, device=keep.device)
        logits = head_logits(call, call.query, n)  # every row's at once: only the masks depend on earlier rows
        rows = []
        for i in range(q):
            length = n - q + i + 1  # positions cached up to row i's own
            row = per_query_head(keep, call) & visible[:, :, i]  # (B, H, n)
            rows.append(row)
            query = call.query[:, :, i : i + 1]
            probs = head_probs(call, query, row[:, :, None], self.granularity, logits[..., i : i + 1, :])[:, :, 0]
            scores = self.victim_scores(call, probs, length)
            if length > size:  # one entry over budget: row i's token came in
                eligible = keep & (positions < length)
                keep = keep.scatter(-1, scores.masked_fill(~eligible, math.inf).argmin(-1, keepdim=True), False)
        self.keep[layer] = keep
        mask = torch.stack(rows, 2)  # (B, H, q, n)
        self.record(layer, mask.sum(), visible.expand_as(mask).sum())
        # No row had anything evicted before it (the cache never held more than the budget): the model's own attention.
        return None if n - 1 <= size else call.dense(mask=mask)


def _extreme(pick, a, b):
    """min or max (``pick``) of two numbers or tensors, without reading a tensor on the host."""
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return pick(a, b)
    if not isinstance(a, torch.Tensor):
        a, b = b, a
    if isinstance(b, torch.Tensor):
        return torch.minimum(a, b) if pick is min else torch.maximum(a, b)
    return a.clamp(max=b) if pick is min else a.clamp(min=b)


def heads_of(call: AttentionCall, granularity: str) -> int:
    """How many independent choices a layer makes at ``granularity``."""
    return {"query_head": call.query.shape[1], "kv_head": call.key.shape[1], "layer": 1}[granularity]


def by_granularity(scores: torch.Tensor, call: AttentionCall, granularity: str) -> torch.Tensor:
    """Scores (batch, query or KV heads, n) reduced to ``granularity``: the mean over the query heads
    sharing a KV head (``kv_head``) or over every head (``layer``)."""
    h_q, h_kv = call.query.shape[1], call.key.shape[1]
    if scores.shape[1] == heads_of(call, granularity):
        return scores
    if granularity == "layer":
        return scores.mean(1, keepdim=True)
    if granularity == "kv_head" and scores.shape[1] == h_q:
        return scores.unflatten(1, (h_kv, h_q // h_kv)).mean(2)
    raise ValueError(f"scores with {scores.shape[1]} heads cannot be chosen per {granularity} ({h_q} query heads)")


def per_query_head(keep: torch.Tensor, call: AttentionCall) -> torch.Tensor:
    """A (batch, heads, ...) choice made per query head, KV head or layer, for every query head."""
    h_q = call.query.shape[1]
    if keep.shape[1] == h_q:
        return keep
    if keep.shape[1] == 1:
        return keep.expand(-1, h_q, *keep.shape[2:])
    return keep.repeat_interleave(h_q // keep.shape[1], dim=1)


def head_logits(call: AttentionCall, query: torch.Tensor, keys: int) -> torch.Tensor:
    """Float32 scaled attention logits of ``query`` rows (B, H, q, D) over the first ``keys`` keys,
    grouped by KV head: (B, KVH, G, q, keys)."""
    scale = call.kwargs.get("scaling") or query.shape[-1] ** -0.5
    q = query.float().unflatten(1, (call.key.shape[1], call.groups))  # (B, KVH, G, q, D)
    key = call.key[:, :, :keys].float()
    return (q @ key[:, :, None].transpose(-1, -2)) * scale


def head_probs(call: AttentionCall, query: torch.Tensor, mask: torch.Tensor, granularity: str,
               logits: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 attention probabilities of ``query`` rows (B, H, q, D) over the first K keys, reduced to
    ``granularity``: (B, heads, q, K). ``mask`` (B|1, 1|KVH|H, q, K) is True where a key is seen;
    ``logits``: the rows' ``head_logits``, where already computed."""
    h_kv = call.key.shape[1]
    if logits is None:
        logits = head_logits(call, query, mask.shape[-1])
    grouped = mask.unflatten(1, (h_kv, call.groups)) if mask.shape[1] == query.shape[1] != h_kv else mask[:, :, None]
    probs = logits.masked_fill(~grouped, -math.inf).softmax(-1)
    if granularity == "kv_head":
        return probs.mean(2)
    probs = probs.flatten(1, 2)
    return probs if granularity == "query_head" else probs.mean(1, keepdim=True)


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
