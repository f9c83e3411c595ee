"""KV-cache eviction and sparse-attention methods (streamingllm, snapkv, pyramidkv, knorm, random, adakv, quest)
on tiny random models: budgets, allocations, granularities and each reference's rules. Masking equals a
physically pruned cache: tests/test_physical.py."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from fidbench import attention, engine
from fidbench.attention import AttentionCall, Phase
from fidbench.methods import REGISTRY, build
from fidbench.methods._kv import KVMethod
from fidbench.methods.pyramidkv import pyramid_budget
from fidbench.suite import load

P, N = 40, 10  # prompt and reference lengths
SNAP = dict(window=4, kernel=3)  # small windows for a 40-token prompt
# Small budgets that evict, per method (12 of 40 prompt positions; Quest: 3 pages of 4).
EVICT = {
    "snapkv": dict(budget=12, **SNAP),
    "pyramidkv": dict(budget=12, **SNAP),
    "knorm": dict(budget=12),
    "random": dict(budget=12, seed=3),
    "adakv": dict(budget=12, scorer_params=SNAP),
    "streamingllm": dict(budget=12),
    "quest": dict(budget=12, page=4, dense_layers=0),
}
KV = sorted(name for name, cls in REGISTRY.items() if issubclass(cls, KVMethod))


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (P,), generator=g).tolist(), torch.randint(0, 128, (N,), generator=g).tolist()


@pytest.fixture
def masks(monkeypatch):
    """Every explicit mask a method hands to SDPA: (phase, layer, mask)."""
    seen = []
    dense = AttentionCall.dense

    def spy(self, mask=None, **kwargs):
        if mask is not None:
            seen.append((self.phase.name, self.layer_idx, mask))
        return dense(self, mask=mask, **kwargs)

    monkeypatch.setattr(AttentionCall, "dense", spy)
    return seen


def run(model, method, ids, mode="parallel"):
    with method.apply(model) as m:
        return engine.teacher_force(m, method, *ids, mode).logits


@pytest.mark.parametrize("name,params", [
    ("snapkv", dict(budget=P, **SNAP)),
    ("snapkv", dict(ratio=1.0, **SNAP)),
    ("pyramidkv", dict(budget=P + 5, **SNAP)),
    ("knorm", dict(budget=P)),
    ("random", dict(ratio=1.0)),
    ("adakv", dict(ratio=1.0, scorer="knorm")),
    ("streamingllm", dict(budget=P)),  # dense prefill, then a cut to the budget: the prompt fits
    # A window that rolls over generated tokens too: the budget must cover prompt and continuation.
    ("streamingllm", dict(budget=P + N - 1, prefill="windowed")),
    ("quest", dict(budget=56, page=8, dense_layers=0)),  # 7 pages cover the 49 positions
])
def test_budget_covering_everything_equals_origin(tiny, ids, name, params):
    # Exact (torch.equal): a method that evicts nothing hands every call back to the same SDPA call.
    origin = run(tiny, build("origin", {}), ids)
    method = build(name, params)
    assert torch.equal(run(tiny, method, ids), origin)
    assert method.kept()["kv_fraction"] == 1.0  # the hook ran and reported that it kept everything


@pytest.mark.parametrize("name", sorted(EVICT))
def test_parallel_equals_stepwise(tiny, ids, name):
    method = build(name, EVICT[name])
    assert method.parallel_exact
    parallel, stepwise = run(tiny, method, ids, "parallel"), run(tiny, method, ids, "stepwise")
    assert torch.equal(parallel.argmax(-1), stepwise.argmax(-1))
    torch.testing.assert_close(parallel, stepwise, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(parallel, run(tiny, build("origin", {}), ids), atol=1e-3)  # it did evict


@pytest.mark.parametrize("name,params,heads,n,window", [
    ("snapkv", EVICT["snapkv"], 4, 12, 4),  # per query head, as SnapKV's and KVCache-Factory's code
    ("snapkv", dict(EVICT["snapkv"], granularity="kv_head"), 2, 12, 4),  # kvpress: the group's mean
    ("snapkv", dict(budget=12), 4, 12, 6),  # window 32 shrinks to half the budget
    ("snapkv", dict(ratio=0.1), 4, 8, 4),  # 4 tokens by ratio, raised to the minimum of 8
    ("knorm", EVICT["knorm"], 2, 12, 0),
    ("knorm", dict(ratio=0.3), 2, 12, 0),
    ("random", EVICT["random"], 2, 12, 0),
    ("streamingllm", EVICT["streamingllm"], 1, 12, 8),  # one choice for every head; the recent part
])
def test_evicting_keeps_the_budget_per_head(tiny, ids, name, params, heads, n, window):
    method = build(name, params)
    run(tiny, method, ids)
    for keep in method.keep.values():
        assert keep.shape == (1, heads, P)
        assert (keep.sum(-1) == n).all()
        assert keep[..., P - window :].all()  # the window counts inside the budget
    kept = method.kept()
    assert kept["kv_fraction"] == pytest.approx(n / P)
    assert kept["kv_fraction_per_layer"] == pytest.approx([n / P] * 2)
    assert kept["budget"] == kept["budget_per_head"] == n and kept["budget_per_head_range"] == [n, n]
    assert kept.get("window", 0) == (window if name == "snapkv" else 0)


def test_snapkv_window_never_exceeds_half_the_budget():
    snap = build("snapkv", {})
    assert snap.window == 32 and snap.kernel == 7 and snap.pooling == "max"  # SnapKV's and Ada-KV's scripts
    assert [snap.window_for(p) for p in (20, 40, 64, 100, 1000)] == [4, 5, 8, 12, 32]  # budgets 8, 10, 16, 25, 250
    assert build("snapkv", dict(budget=1)).window_for(100) == 1
    assert build("pyramidkv", {}).window == 8  # KVCache-Factory's LongBench setting
    assert build("adakv", {})._scorer.window == 32


def test_pyramid_budget_follows_kvcache_factory():
    # B = 100, w = 8, 30 layers, beta 20: min = 92 // 20 = 4, max = 184 - 4 = 180, steps = 176 // 29 = 6.
    budgets = [pyramid_budget(100, 1000, 8, 30, 20, i) for i in range(30)]
    assert budgets[0] == 188 and budgets[-1] == 180 - 29 * 6 + 8 == 14
    assert all(a - b == 6 for a, b in zip(budgets, budgets[1:]))
    assert sum(budgets) == 3030  # floored steps leave the upper layers a little more than SnapKV's 30 x 100
    assert pyramid_budget(100, 90, 8, 30, 20, 0) == 90  # L < B: no compression
    assert pyramid_budget(100, 150, 8, 30, 20, 5) == 100  # B <= L < 2 (B - w): uniform SnapKV
    # L = 186: max 180 >= L - w = 178, so max = 178, min = 184 - 178 = 6, steps = 172 // 29 = 5.
    assert [pyramid_budget(100, 186, 8, 30, 20, i) for i in (0, 29)] == [186, 178 - 29 * 5 + 8]
    assert pyramid_budget(100, 1000, 8, 1, 20, 0) == 100


def test_pyramidkv_layers_keep_their_budgets(ids):
    model = tiny_model("llama", num_hidden_layers=4)
    params = dict(budget=14, window=2, kernel=3, beta=4)  # 40 >= 2 (14 - 2): the pyramid regime
    pyr = build("pyramidkv", params)
    run(model, pyr, ids)
    counts = [int(pyr.keep[layer].sum(-1)[0, 0]) for layer in range(4)]
    assert counts == [pyramid_budget(14, P, 2, 4, 4, i) for i in range(4)] == [23, 17, 11, 5]
    assert all((pyr.keep[layer].sum(-1) == counts[layer]).all() for layer in range(4))
    assert pyr.kept()["budget_per_head"] == sum(counts) / 4


def prefill(model, method, p_ids):
    """Only the prefill through ``method``: its last logits and the cache."""
    method.begin(len(p_ids))
    with torch.inference_mode(), method.apply(model) as m, attention.running(method, Phase("prefill", len(p_ids), 0)):
        return engine.forward(m, torch.tensor([p_ids]), last_only=True)


# Qwen2 with a full-attention layer 0 and a sliding-window layer 1 (which KV methods leave dense).
SLIDING = dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)
ALL_SLIDING = dict(use_sliding_window=True, sliding_window=16, max_window_layers=0)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("qwen2", {}), ("qwen2", SLIDING)])
@pytest.mark.parametrize("granularity", ["query_head", "kv_head"])
@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_scores_match_full_attention(ids, family, overrides, granularity, pooling):
    """The window-only scoring picks what the full eager attention matrix says the window attends to, per
    query head or per KV head (the group's mean after pooling); sliding-window layers are left to the model."""
    method = build("snapkv", dict(EVICT["snapkv"], granularity=granularity, pooling=pooling))
    model = tiny_model(family, **overrides)
    prefill(model, method, ids[0])
    kinds = attention.layer_kinds(model.config)
    assert sorted(method.keep) == [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    eager = tiny_model(family, **overrides)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        probs = eager(input_ids=torch.tensor([ids[0]]), output_attentions=True).attentions
    w, k = SNAP["window"], SNAP["kernel"]
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    for layer, keep in method.keep.items():
        votes = probs[layer][:, :, -w:, : P - w].sum(-2)  # (1, heads, prefix)
        scores = pool(votes, k, stride=1, padding=k // 2)
        if granularity == "kv_head":
            scores = scores.view(1, 2, 2, P - w).mean(2)
        assert keep.shape[1] == scores.shape[1] and keep[..., P - w :].all()
        chosen, rest = keep[..., : P - w], ~keep[..., : P - w]
        assert (chosen.sum(-1) == 12 - w).all()
        # The kept prefix positions score at least as high as every evicted one (ties may go either way).
        lowest = scores.masked_fill(~chosen, float("inf")).amin(-1)
        highest = scores.masked_fill(~rest, -float("inf")).amax(-1)
        assert (lowest >= highest - 1e-6).all()


@pytest.mark.parametrize("name", sorted(EVICT))
def test_models_without_a_full_attention_layer_are_refused(ids, name):
    with pytest.raises(ValueError, match=f"method '{name}' cannot run on qwen2: every attention layer"):
        run(tiny_model("qwen2", **ALL_SLIDING), build(name, EVICT[name]), ids)


def test_knorm_keeps_the_smallest_keys(tiny, ids):
    method = build("knorm", EVICT["knorm"])
    run(tiny, method, ids)
    with torch.inference_mode():
        _, cache = engine.forward(tiny, torch.tensor([ids[0]]))
    for layer, keep in method.keep.items():
        norms = cache.layers[layer].keys.norm(dim=-1)[0]  # (kv_heads, prompt)
        for head in range(norms.shape[0]):
            # <=: qwen3's QK-norm (untrained, unit weights) gives every key nearly the same norm; ties may go either
            # way.
            assert norms[head][keep[0, head]].max() <= norms[head][~keep[0, head]].min()


def test_random_is_seeded_per_sample(tiny, ids):
    a, b, c = (build("random", dict(budget=12, seed=seed)) for seed in (1, 1, 2))
    for method in (a, b, c):
        run(tiny, method, ids)
    first = {layer: keep.clone() for layer, keep in a.keep.items()}
    run(tiny, a, ids)  # a second sample draws again from the seed
    assert all(torch.equal(first[layer], a.keep[layer]) and torch.equal(a.keep[layer], b.keep[layer])
               for layer in first)
    assert not all(torch.equal(a.keep[layer], c.keep[layer]) for layer in first)
    assert not torch.equal(a.keep[0], a.keep[1])  # layers draw independently


def test_adakv_allocation_by_hand():
    """kvpress's AdaKVPress: each head's top int(n * alpha) are safe, then the layer's lowest scores go."""
    method = build("adakv", dict(budget=3, scorer="knorm", alpha_safeguard=0.34, allocation="kvpress"))
    scores = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 5.0, 4.0],  # a head with high scores everywhere
                            [0.5, 0.1, 0.2, 0.3, 0.0, 0.4]]])
    keep = method.allocate(scores, 3)  # 6 of 12 (head, position) pairs; 1 safe per head
    assert keep.tolist() == [[[True, True, True, True, True, False], [True, False, False, False, False, False]]]
    # Without the safeguard the second head would keep nothing; with alpha 1 every head keeps its own top 3.
    kvpress = dict(budget=3, scorer="knorm", allocation="kvpress")
    assert build("adakv", dict(kvpress, alpha_safeguard=0.0)).allocate(scores, 3)[0, 1].sum() == 0
    uniform = build("adakv", dict(kvpress, alpha_safeguard=1.0)).allocate(scores, 3)
    assert torch.equal(uniform, build("knorm", dict(budget=3)).allocate(scores, 3))


INF = float("inf")
WINDOWED = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, INF, INF],  # the last two: a scorer's window
                          [0.5, 0.1, 0.2, 0.3, 0.0, 0.4, INF, INF]]])


@pytest.mark.parametrize("alpha, expected", [
    # n = 5, window 2: B = 3 per head outside the window; head 0 holds all 6 of the layer's best 6 pairs.
    # alpha 0.2: floor int(0.6) = 0; head 0 round(0.8 * 6) = 5, head 1 round(0) = 0.
    (0.2, [[1, 1, 1, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]),
    # alpha 0.5: floor int(1.5) = 1; head 0 round(0.5 * 6 + 1) = 4, head 1 round(0 + 1) = 1 (its best, 0.5).
    (0.5, [[1, 1, 1, 1, 0, 0, 1, 1], [1, 0, 0, 0, 0, 0, 1, 1]]),
    # alpha 1: every head its own top B = 3, SnapKV's uniform allocation.
    (1.0, [[1, 1, 1, 0, 0, 0, 1, 1], [1, 0, 0, 1, 0, 1, 1, 1]]),
])
def test_adakv_own_allocation_by_hand(alpha, expected):
    """FFY0/AdaKV's AdaptiveSnapKVCluster: the window outside the adaptive part, head h keeps its best
    round((1 - alpha) c_h + int(alpha (n - w))) positions, c_h its share of the layer's best heads x (n - w)."""
    method = build("adakv", dict(budget=5, scorer="knorm", alpha_safeguard=alpha))
    assert method.allocation == "adakv"
    assert method.allocate(WINDOWED, 5).int().tolist() == [expected]


def test_adakv_kvpress_counts_the_window_in_the_safeguard():
    """The same scores under kvpress's rule: the safeguard's int(0.5 * 5) = 2 are the window's two inf scores,
    so head 1 keeps nothing beyond its window, where Ada-KV's own rule keeps its best position."""
    method = build("adakv", dict(budget=5, scorer="knorm", alpha_safeguard=0.5, allocation="kvpress"))
    keep = method.allocate(WINDOWED, 5)
    assert keep.int().tolist() == [[[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1]]]


@pytest.mark.parametrize("scorer", ["snapkv", "knorm", "random", "streamingllm", "pyramidkv"])
def test_adakv_wraps_any_scorer(tiny, ids, scorer):
    params = SNAP if scorer in ("snapkv", "pyramidkv") else {}
    method = build("adakv", dict(budget=12, scorer=scorer, scorer_params=params, alpha_safeguard=0.25,
                                 allocation="kvpress"))
    run(tiny, method, ids)
    for layer, keep in method.keep.items():
        n = pyramid_budget(12, P, 4, 2, 20, layer) if scorer == "pyramidkv" else 12  # 20 and 4 in the pyramid
        per_head = keep.sum(-1)
        assert per_head.sum() == n * keep.shape[1]  # the layer's total is the uniform allocation's
        assert (per_head >= n // 4).all()  # int(n * 0.25) safe per head
    kept = method.kept()
    assert kept["budget_per_head"] == 12 and kept["granularity"] == method._scorer.granularity
    if scorer == "snapkv":  # the scorer's window is kept whatever the allocation
        assert all(keep[..., P - 4 :].all() for keep in method.keep.values()) and kept["window"] == 4


def test_adakv_own_allocation_end_to_end(tiny, ids):
    """Ada-SnapKV with Ada-KV's own allocation on a model: every head keeps the window plus at least its floor
    int(0.25 (12 - 4)) = 2, and the layer about its uniform total (each head's share is rounded)."""
    method = build("adakv", dict(budget=12, scorer_params=SNAP, alpha_safeguard=0.25))
    run(tiny, method, ids)
    for keep in method.keep.values():
        assert keep[..., P - 4 :].all() and (keep.sum(-1) >= 4 + 2).all()
        assert abs(keep.sum().item() - 12 * keep.shape[1]) <= keep.shape[1] / 2


def test_streamingllm_dense_prefill_then_sinks_and_recent(tiny, ids, masks):
    method = build("streamingllm", dict(budget=10, sink=3))
    run(tiny, method, ids)
    assert not [m for phase, _, m in masks if phase == "prefill"]  # the prompt is attended densely
    for keep in method.keep.values():
        assert keep[0, 0].nonzero()[:, 0].tolist() == [0, 1, 2] + list(range(P - 7, P))
    decode = next(mask for phase, _, mask in masks if phase == "decode")[0, 0]  # queries at P .. P+N-2
    assert decode[-1].nonzero()[:, 0].tolist() == [0, 1, 2] + list(range(P - 7, P + N - 1))  # generated ones appended


def test_streamingllm_windowed_rolling_window(tiny, ids, masks):
    method = build("streamingllm", dict(budget=6, sink=2, prefill="windowed"))
    run(tiny, method, ids)
    prefill = next(mask for phase, _, mask in masks if phase == "prefill")[0, 0]
    assert prefill[3].nonzero()[:, 0].tolist() == [0, 1, 2, 3]
    assert prefill[20].nonzero()[:, 0].tolist() == [0, 1, 17, 18, 19, 20]
    decode = next(mask for phase, _, mask in masks if phase == "decode")[0, 0]  # queries at P .. P+N-2
    assert decode[-1].nonzero()[:, 0].tolist() == [0, 1] + list(range(P + N - 5, P + N - 1))
    assert (decode.sum(-1) == 6).all()
    # Prompt positions still visible to decode queries: the sinks plus what the window still reaches.
    expected = sum(2 + max(0, P - (P + t - 3)) for t in range(N - 1)) / ((N - 1) * P)
    assert method.kept()["kv_fraction"] == pytest.approx(expected)


def test_streamingllm_small_budget_keeps_the_current_token(tiny, ids, masks):
    run(tiny, build("streamingllm", dict(ratio=0.03, min_budget=1, sink=4, prefill="windowed")), ids)  # 1 token
    decode = next(mask for phase, _, mask in masks if phase == "decode")[0, 0]
    assert decode.nonzero().tolist() == [[t, P + t] for t in range(N - 1)]


def test_quest_pages_per_query_head(tiny, ids, masks):
    method = build("quest", EVICT["quest"])
    run(tiny, method, ids)
    assert [layer for _, layer, _ in masks] == [0, 1]
    chosen_differently = False
    for phase, _, mask in masks:
        assert phase == "decode"
        kv = mask.shape[-1]
        pages = F.pad(mask[0].int(), (0, -kv % 4)).view(4, N - 1, -1, 4).any(-1)  # (heads, queries, pages)
        assert (pages.sum(-1) == 3).all()  # 12 // 4 = 3 pages each
        chosen_differently |= not torch.equal(mask[0, 0], mask[0, 1])  # heads sharing a KV head choose apart
    assert chosen_differently
    assert method.kept()["budget_per_head"] == 12


def test_quest_takes_at_least_three_pages(tiny, ids, masks):
    run(tiny, build("quest", dict(budget=8, page=4, dense_layers=0)), ids)  # 8 // 4 = 2, raised to 3
    for _, _, mask in masks:
        pages = F.pad(mask[0].int(), (0, -mask.shape[-1] % 4)).view(4, N - 1, -1, 4).any(-1)
        assert (pages.sum(-1) == 3).all()


def test_quest_bound_by_hand():
    """Page bounds by hand: 2 query heads share 1 KV head, pages of 2, budget 6 = 3 pages out of 4.

    Query at position 6, keys 0..6, bound = sum_d max(q_d max_d, q_d min_d): head 0 (q=(1,1)) bounds pages
    0..3 at 2, 1, 1, 0 and keeps pages 0-2, not its own page 3 (Quest does not force it); head 1 (q=(-1,-1))
    at 0, 4, -1, 0 and keeps 1, 0 and its own page 3 (ties go to the lower page). The group's mean bounds
    (1, 2.5, 0, 0) would give both heads pages 1, 0, 2."""
    keys = torch.tensor([[1, 0], [0, 1], [-2, -2], [3, -2], [0.5, 0.5], [0.5, 0.5], [0, 0]])
    query = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])[None, :, None, :]
    module = torch.nn.Module()
    module.layer_idx = 0
    call = AttentionCall(module, query, keys[None, None], keys[None, None], None, Phase("decode", 6, 6))
    call.dense = lambda mask=None: mask
    mask = build("quest", dict(budget=6, page=2, dense_layers=0)).attend(call)
    assert mask.shape == (1, 2, 1, 7)
    assert mask[0, 0, 0].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 4, 5]  # pages 0, 1, 2
    assert mask[0, 1, 0].nonzero()[:, 0].tolist() == [0, 1, 2, 3, 6]  # pages 0, 1, 3


def test_quest_dense_layers(tiny, ids, masks):
    method = build("quest", dict(budget=12, page=4, dense_layers=1))
    run(tiny, method, ids)
    assert {layer for _, layer, _ in masks} == {1}
    assert method.kept()["kv_fraction_per_layer"][0] == 1.0 > method.kept()["kv_fraction_per_layer"][1]


def test_one_budget_rule_for_every_kv_method():
    for name in KV:
        method = build(name, {"ratio": 0.1})
        assert [method.tokens(n) for n in (46, 95, 105, 1000)] == [8, 10, 11, 100], name  # min 8, halves round up
        assert build(name, {"budget": 5}).tokens(1000) == 5
    assert build("knorm", dict(ratio=0.25)).tokens(30) == 8
    assert build("knorm", dict(ratio=0.01, min_budget=1)).tokens(30) == 1  # never an empty cache
    assert build("knorm", dict(budget=100)).tokens(30) == 100  # evicts nothing
    assert build("snapkv", {}).ratio == 0.25  # neither given: the default ratio


def test_equal_budgets_are_visible_in_kept(ids):
    """At the same ratio every KV method reports the same nominal budget; evicting methods keep it per head."""
    model = tiny_model("llama")
    p_ids, g_ids = ids
    budgets = {}
    for name in KV:
        method = build(name, {"ratio": 0.25} if name != "quest" else {"ratio": 0.25, "page": 2, "dense_layers": 0})
        with method.apply(model) as m:
            engine.teacher_force(m, method, p_ids, g_ids, engine.resolve_mode(method, "auto"))
        budgets[name] = method.kept()
    assert {k["budget"] for k in budgets.values()} == {10}
    for name, kept in budgets.items():
        assert kept["budget_per_head"] == 10, name


@pytest.mark.parametrize("name,params,match", [
    *[(name, dict(budget=-1), "budget must") for name in KV],
    *[(name, dict(budget=0), "budget must") for name in KV],
    *[(name, dict(ratio=1.5), "ratio must") for name in KV],
    *[(name, dict(ratio=0.0), "ratio must") for name in KV],
    *[(name, dict(min_budget=0), "min_budget must") for name in KV],
    *[(name, dict(ratio=0.1, budget=100), "either ratio or budget") for name in KV],
    ("snapkv", dict(kernel=4), "kernel must"),
    ("snapkv", dict(window=0), "window must"),
    ("snapkv", dict(granularity="layer"), "granularity"),
    ("snapkv", dict(pooling="mean"), "pooling"),
    ("pyramidkv", dict(beta=0), "beta must"),
    ("pyramidkv", dict(beta=2.5), "beta"),
    ("streamingllm", dict(budget=4, sink=4), "must exceed sink"),
    ("streamingllm", dict(sink=-1), "sink must"),
    ("streamingllm", dict(prefill="lazy"), "prefill"),
    ("quest", dict(page=0), "page must"),
    ("quest", dict(dense_layers=-1), "dense_layers must"),
    ("random", dict(ratio="half"), "ratio"),
    ("adakv", dict(scorer="quest"), "scorer must be an eviction method"),
    ("adakv", dict(scorer="adakv"), "scorer must be an eviction method"),
    ("adakv", dict(scorer="nope"), "scorer must be an eviction method"),
    ("adakv", dict(scorer_params={"ratio": 0.1}), "give the budget .ratio. on adakv"),
    ("adakv", dict(scorer_params={"windw": 4}), "adakv scorer 'snapkv': unknown parameter"),
    ("adakv", dict(alpha_safeguard=1.5), "alpha_safeguard"),
    ("h2o", dict(recent=1.5), "recent"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        build(name, params)


def test_default_suite_runs_every_kv_method_at_two_budgets():
    suite = load(Path(__file__).parent.parent / "fidbench.yaml")
    for name in KV:
        # on the default datasets (a variant naming its datasets, e.g. ppl-snapkv-25 on the essays, is extra)
        ratios = sorted(v.params.get("ratio") for v in suite.variants if v.method == name and v.datasets is None)
        assert ratios == [0.1, 0.25], name
