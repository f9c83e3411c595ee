"""``adakv``: Ada-KV's adaptive budget allocation across the heads of a layer (Feng et al. 2024, "Ada-KV:
Optimizing KV Cache Eviction by Adaptive Budget Allocation"), around any eviction method's score.

The ``scorer`` (a registered eviction method: snapkv by default, as in the paper's Ada-SnapKV, or
knorm, random, streamingllm, pyramidkv) scores the prompt positions of every head at its own
granularity; instead of the top ``n`` of every head, the layer shares its ``heads × n`` positions by
the (head, position) pairs' scores, so heads whose attention is concentrated give room to heads whose
attention is spread, each head keeping a safeguard share. Forced positions (SnapKV's window,
StreamingLLM's sinks) score inf and are always kept. ``allocation``:
- ``"adakv"`` (default): Ada-KV's own code (FFY0/AdaKV ``adaptive_snapkv/monkeypatch/snapkv_utils.py``,
  ``AdaptiveSnapKVCluster``), which its paper's LongBench scripts run (``GQA_eval_longbench.sh``, floor
  alpha 0.2): the forced positions (the window, w) stay outside the adaptive part; of the rest,
  ``B = n - w`` per head, the layer's ``heads × B`` best (head, position) pairs give head h a count
  c_h, and head h keeps its own best ``round((1 - alpha) · c_h + int(alpha · B))`` positions plus the
  window (so the layer keeps ``heads × n`` up to rounding);
- ``"kvpress"``: kvpress's AdaKVPress (NVIDIA/kvpress ``presses/adakv_press.py``): each head's top
  ``int(n × alpha_safeguard)`` scores are raised to the dtype's maximum, then the ``heads × (L - n)``
  lowest scores of the layer are evicted; forced positions count in the safeguard (kvpress's max + 1
  scores), so at small budgets where the window fills ``alpha × n``, no other position is safeguarded.
The budget ``n`` (``ratio``/``budget``) is this method's and drives the scorer too (kvpress: the wrapped
press's compression ratio); a pyramidkv scorer keeps its per-layer budget, shared adaptively among the
heads of each layer. Heads are those of the scorer's granularity: snapkv's default chooses per query head
(as Ada-KV's own code and KVCache-Factory's AdaKV do); ``allocation: kvpress, scorer_params:
{granularity: kv_head, pooling: avg, window: 64, kernel: 5}`` is kvpress's ``AdaKVPress(SnapKVPress())``
under fidbench's budget and window rules.

Why a wrapper method and not a parameter of every eviction method: the allocation is one idea with its
own parameter (the safeguard), applied on top of a score, as kvpress composes presses; a wrapper keeps
that parameter out of the methods that do not use it and names the combination in the suite
(``{method: adakv, scorer: knorm}``). ``scorer_params`` are the scorer's own parameters.

Differences: fidbench's budget rule (``_kv``; kvpress floors ``k_len × (1 - ratio)``); Ada-KV's code
stores each head's positions in a flattened cache for its varlen kernel, fidbench masks evicted keys
(kvpress masks them with a key that draws no attention); Ada-KV's ``normalize`` option (off in its
scripts) and ``skip`` layers (0) are not provided.
"""

import dataclasses
from typing import Literal

import torch

from ..attention import AttentionCall
from ._kv import Evicting
from .base import REGISTRY, build, register

BUDGET = ("ratio", "budget", "min_budget")


@register
class AdaKV(Evicting):
    name = "adakv"
    description = "Ada-KV: a layer keeps its best (head, position) pairs by any scorer, each head >= alpha of its share"
    defaults_from = ("FFY0/AdaKV experiments/LongBench/GQA_eval_longbench.sh (--floor_alpha 0.2, "
                     "c*_w32_k7_maxpool.json, its own allocation; scorer snapkv: Ada-SnapKV); budget: fidbench's "
                     "rule (_kv)")
    test_params = {"degenerate": {"ratio": 1.0}, "real": {"budget": 12, "scorer_params": {"window": 4, "kernel": 3}}}
    scorer: str = "snapkv"
    scorer_params: dict = dataclasses.field(default_factory=dict)
    alpha_safeguard: float = 0.2
    allocation: Literal["adakv", "kvpress"] = "adakv"

    def validate(self):
        super().validate()
        if not 0 <= self.alpha_safeguard <= 1:
            raise ValueError(f"adakv: alpha_safeguard must be in [0, 1], got {self.alpha_safeguard}")
        cls = REGISTRY.get(self.scorer)
        if cls is None or not issubclass(cls, Evicting) or issubclass(cls, AdaKV):
            scorers = sorted(n for n, c in REGISTRY.items() if issubclass(c, Evicting) and not issubclass(c, AdaKV))
            raise ValueError(f"adakv: scorer must be an eviction method ({', '.join(scorers)}), got {self.scorer!r}")
        given = sorted(set(BUDGET) & set(self.scorer_params))
        if given:
            raise ValueError(f"adakv: give the budget ({', '.join(given)}) on adakv itself, not in scorer_params")

    def __post_init__(self):
        super().__post_init__()
        budget = {"ratio": self.ratio, "budget": self.budget, "min_budget": self.min_budget}
        self._scorer = build(self.scorer, {**self.scorer_params, **budget}, f"adakv scorer {self.scorer!r}")

    @property
    def granularity(self) -> str:
        return self._scorer.granularity

    def begin(self, prompt_len: int) -> None:
        super().begin(prompt_len)
        self._scorer.begin(prompt_len)

    def parts(self) -> list:
        return [self._scorer]

    def score(self, call: AttentionCall) -> torch.Tensor:
        return self._scorer.score(call)

    def layer_budget(self, call: AttentionCall) -> int:
        return self._scorer.layer_budget(call)

    def allocate(self, scores: torch.Tensor, n: int) -> torch.Tensor:
        if self.allocation == "adakv":
            return adakv_allocation(scores, n, self.alpha_safeguard)
        b, heads, p = scores.shape
        safe = int(n * self.alpha_safeguard)
        scores = scores.scatter(-1, scores.topk(safe, dim=-1).indices, torch.finfo(scores.dtype).max)
        evicted = (-scores.reshape(b, heads * p)).topk(heads * (p - n), dim=-1).indices
        keep = torch.ones(b, heads * p, dtype=torch.bool, device=scores.device)
        return keep.scatter_(-1, evicted, False).view(b, heads, p)

    def kept(self) -> dict:
        kept = super().kept()
        scorer = self._scorer.kept()
        if "window" in scorer:
            kept["window"] = scorer["window"]
        return kept


def adakv_allocation(scores: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    """Ada-KV's own allocation of (batch, heads, positions) ``scores`` at ``n`` positions per head: the
    inf-scored (forced) positions kept, and head h its best ``round((1 - alpha) · c_h + int(alpha · B))``
    others, c_h its share of the layer's ``heads × B`` best pairs, ``B = n`` minus the forced count."""
    b, heads, p = scores.shape
    forced = scores == torch.inf
    # Every scorer forces the same positions in every head. B stays a tensor (the host never waits for the
    # device): the layer's best heads × n pairs are taken, and the first heads × B of them counted.
    base = n - forced[:, :1].sum(-1)  # (b, 1)
    free = scores.masked_fill(forced, -torch.inf)
    k = heads * min(n, p)
    best = free.reshape(b, heads * p).topk(k, dim=-1)
    counted = torch.arange(k, device=scores.device) < heads * base
    counts = torch.zeros(b, heads, device=scores.device)
    counts.scatter_add_(-1, best.indices // p, counted.to(counts.dtype))
    floor = (base.double() * alpha).floor().to(counts.dtype)  # int(alpha · B)
    capacity = torch.round(counts * (1 - alpha) + floor)
    rank = free.argsort(-1, descending=True).argsort(-1)  # each position's rank in its head
    return forced | (rank < capacity[..., None])
