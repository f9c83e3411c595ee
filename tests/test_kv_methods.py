"""KV-cache eviction and sparse-attention methods (streamingllm, snapkv, pyramidkv, knorm, random, quest)
on tiny random Llama and Qwen2 models."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model

from fidbench import attention, engine
from fidbench.attention import AttentionCall, Phase
from fidbench.methods import REGISTRY, build
from fidbench.methods.pyramidkv import pyramid
from fidbench.suite import load

P, N = 40, 10  # prompt and reference lengths
EVICTING = ["snapkv", "pyramidkv", "knorm", "random"]
SNAP = dict(window=4, kernel=3)  # SnapKV's defaults (32, 7) do not fit a 40-token prompt's small budgets
# Small budgets that evict, per method (12 of 40 prompt positions; Quest: 2 pages of 8).
EVICT = {
    "snapkv": dict(budget=12, **SNAP),
    "pyramidkv": dict(budget=12, **SNAP),
    "knorm": dict(budget=12),
    "random": dict(budget=12, seed=3),
    "streamingllm": dict(budget=12),
    "quest": dict(budget=16, page=8, dense_layers=0),
}


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
    # Windows that roll over generated tokens too: the budget must cover prompt and continuation.
    ("streamingllm", dict(budget=P + N - 1)),
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


@pytest.mark.parametrize("name,params,n", [
    ("snapkv", EVICT["snapkv"], 12),
    ("knorm", EVICT["knorm"], 12),
    ("random", EVICT["random"], 12),
    ("knorm", dict(ratio=0.3), 12),
    ("snapkv", dict(ratio=0.25, window=32), 10),  # ratio budget below the window: the 10 most recent
])
def test_evicting_keeps_the_budget_per_kv_head(tiny, ids, name, params, n):
    method = build(name, params)
    run(tiny, method, ids)
    for keep in method.keep.values():
        assert keep.shape == (1, 2, P)
        assert (keep.sum(-1) == n).all()
        assert keep[..., P - min(params.get("window", 0), n) :].all()  # the window counts inside the budget
    kept = method.kept()
    assert kept["kv_fraction"] == pytest.approx(n / P)
    assert kept["kv_fraction_per_layer"] == pytest.approx([n / P] * 2)


def test_pyramid_budgets():
    layers, n, window = 30, 100, 8
    budgets = pyramid(n, 1000, window, layers, beta=20)
    assert sum(budgets) == layers * n  # SnapKV's total at the same budget
    assert all(a >= b for a, b in zip(budgets, budgets[1:])) and budgets[0] > budgets[-1]
    assert min(budgets) >= window
    # A budget close to the prompt: the lowest layers are capped at the whole prompt, the total still holds.
    budgets = pyramid(90, 100, window, layers, beta=20)
    assert sum(budgets) == layers * 90 and max(budgets) == 100 and budgets[0] > budgets[-1]
    assert pyramid(5, 100, window, layers, beta=20) == [5] * layers  # the window fills the budget


def test_pyramidkv_layers_keep_their_budgets(ids):
    model = tiny_model("llama", num_hidden_layers=4)
    snap, pyr = build("snapkv", EVICT["snapkv"]), build("pyramidkv", EVICT["pyramidkv"])
    run(model, snap, ids)
    run(model, pyr, ids)
    counts = [int(pyr.keep[layer].sum(-1)[0, 0]) for layer in range(4)]
    assert counts == pyramid(12, P, 4, 4, 20.0)
    assert all((pyr.keep[layer].sum(-1) == counts[layer]).all() for layer in range(4))
    assert sum(counts) == sum(int(keep.sum(-1)[0, 0]) for keep in snap.keep.values()) == 4 * 12


def prefill(model, method, p_ids):
    """Only the prefill through ``method``: its last logits and the cache."""
    method.begin(len(p_ids))
    with torch.inference_mode(), method.apply(model) as m, attention.running(method, Phase("prefill", len(p_ids))):
        return engine.forward(m, torch.tensor([p_ids]), last_only=True)


def pruned_logits(model, method, ids):
    """Prefill through ``method``, physically drop what it evicted from the cache, decode plainly."""
    p_ids, g_ids = ids
    first, cache = prefill(model, method, p_ids)
    for layer, keep in method.keep.items():
        if keep is None:
            continue
        b, heads, _ = keep.shape
        index = keep.nonzero()[:, -1].view(b, heads, -1, 1)  # kept positions per KV head, ascending
        cached = cache.layers[layer]
        cached.keys = cached.keys.gather(2, index.expand(-1, -1, -1, cached.keys.shape[-1]))
        cached.values = cached.values.gather(2, index.expand(-1, -1, -1, cached.values.shape[-1]))
    rows = [first[-1:]]
    with torch.inference_mode():
        for t, token in enumerate(g_ids[:-1]):
            # Original positions: RoPE of the new token must not see the cache got shorter.
            out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[len(p_ids) + t]]),
                        use_cache=True, **{engine._cache_kwarg(model): cache})
            rows.append(out.logits[0].float())
    return torch.cat(rows)


@pytest.mark.parametrize("name", EVICTING)
def test_masking_equals_physical_removal(tiny, ids, name):
    method = build(name, EVICT[name])
    masked = run(tiny, method, ids)
    assert any(keep is not None for keep in method.keep.values())
    torch.testing.assert_close(masked, pruned_logits(tiny, build(name, EVICT[name]), ids), atol=1e-6, rtol=1e-5)


# Qwen2 with a full-attention layer 0 and a sliding-window layer 1 (which KV methods leave dense).
SLIDING = dict(use_sliding_window=True, sliding_window=16, max_window_layers=1)
ALL_SLIDING = dict(use_sliding_window=True, sliding_window=16, max_window_layers=0)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("qwen2", {}), ("qwen2", SLIDING)])
@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_snapkv_scores_match_full_attention(ids, name, family, overrides):
    """The window-only scoring picks what the full eager attention matrix says the window attends to;
    sliding-window layers are left to the model's window (no selection)."""
    method = build(name, EVICT[name])
    model = tiny_model(family, **overrides)
    prefill(model, method, ids[0])
    kinds = attention.layer_kinds(model.config)
    assert sorted(method.keep) == [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    eager = tiny_model(family, **overrides)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        probs = eager(input_ids=torch.tensor([ids[0]]), output_attentions=True).attentions
    w = SNAP["window"]
    for layer, keep in method.keep.items():
        n = int(keep.sum(-1)[0, 0])
        votes = probs[layer][:, :, -w:, : P - w].sum(-2)  # (1, heads, prefix)
        pooled = F.max_pool1d(votes, SNAP["kernel"], stride=1, padding=SNAP["kernel"] // 2)
        scores = pooled.view(1, 2, 2, P - w).mean(2)
        expected = torch.zeros(1, 2, P, dtype=torch.bool)
        expected[..., P - w :] = True
        expected[..., : P - w].scatter_(-1, scores.topk(n - w, dim=-1).indices, True)
        assert torch.equal(keep, expected)


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
            # <=: qwen3's QK-norm (untrained, unit weights) gives every key nearly the same norm; ties may go either way.
            assert norms[head][keep[0, head]].max() <= norms[head][~keep[0, head]].min()


def test_random_is_seeded_per_sample(tiny, ids):
    a, b, c = build("random", dict(budget=12, seed=1)), build("random", dict(budget=12, seed=1)), build("random", dict(budget=12, seed=2))
    for method in (a, b, c):
        run(tiny, method, ids)
    first = {layer: keep.clone() for layer, keep in a.keep.items()}
    run(tiny, a, ids)  # a second sample draws again from the seed
    assert all(torch.equal(first[layer], a.keep[layer]) and torch.equal(a.keep[layer], b.keep[layer]) for layer in first)
    assert not all(torch.equal(a.keep[layer], c.keep[layer]) for layer in first)
    assert not torch.equal(a.keep[0], a.keep[1])  # layers draw independently


def test_streamingllm_rolling_window(tiny, ids, masks):
    method = build("streamingllm", dict(budget=6, sink=2))
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


def test_streamingllm_small_ratio_budget_keeps_the_current_token(tiny, ids, masks):
    run(tiny, build("streamingllm", dict(ratio=0.03, sink=4)), ids)  # 1 token: sinks give way to the query itself
    decode = next(mask for phase, _, mask in masks if phase == "decode")[0, 0]
    assert decode.nonzero().tolist() == [[t, P + t] for t in range(N - 1)]


def test_quest_pages_per_kv_head(tiny, ids, masks):
    run(tiny, build("quest", EVICT["quest"]), ids)
    assert [layer for _, layer, _ in masks] == [0, 1]
    for phase, _, mask in masks:
        assert phase == "decode"
        assert torch.equal(mask[0, 0], mask[0, 1]) and torch.equal(mask[0, 2], mask[0, 3])  # chosen per KV head
        kv = mask.shape[-1]
        pages = F.pad(mask[0].int(), (0, -kv % 8)).view(4, N - 1, -1, 8).any(-1)  # (heads, queries, pages)
        assert (pages.sum(-1) == 2).all()  # 2 pages each, one of them the query's own
        own = torch.arange(P, P + N - 1) // 8
        assert pages[:, torch.arange(N - 1), own].all()


def test_quest_bound_by_hand():
    """Page bounds by hand: 2 query heads share 1 KV head, pages of 2, one page besides the query's own."""
    keys = torch.tensor([[1, 0], [0, 1], [-2, -2], [3, -2], [0.5, 0.5], [0.5, 0.5], [0, 0], [0, 0]])
    # head 0 (q=(1,1)) bounds pages 0,1,2 at 2, 1, 1; head 1 (q=(1,-1)) at 1, 5, 0: the mean picks page 1,
    # although head 0 alone would pick page 0 and page 1's mean key scores lowest for head 0.
    query = torch.tensor([[1.0, 1.0], [1.0, -1.0]])[None, :, None, :]
    module = torch.nn.Module()
    module.layer_idx = 0
    call = AttentionCall(module, query, keys[None, None], keys[None, None], None, Phase("decode", 6))
    call.dense = lambda mask=None: mask
    mask = build("quest", dict(budget=4, page=2, dense_layers=0)).attend(call)
    assert mask.shape == (1, 2, 1, 8)
    assert mask[0, :, 0].nonzero()[:, 1].tolist() == [2, 3, 6, 7] * 2


def test_quest_dense_layers(tiny, ids, masks):
    method = build("quest", dict(budget=16, page=8, dense_layers=1))
    run(tiny, method, ids)
    assert {layer for _, layer, _ in masks} == {1}
    assert method.kept()["kv_fraction_per_layer"][0] == 1.0 > method.kept()["kv_fraction_per_layer"][1]


def test_budget_parameters():
    assert build("snapkv", {}).ratio == 0.25  # neither given: the default ratio
    assert build("knorm", dict(ratio=0.1)).tokens(30) == 3
    assert build("knorm", dict(ratio=0.01)).tokens(30) == 1  # never an empty cache
    assert build("knorm", dict(budget=100)).tokens(30) == 100  # evicts nothing
    assert build("snapkv", dict(budget=32)).window == 32  # window == budget is allowed
    assert build("pyramidkv", dict(beta=10.0)).params() == dict(ratio=0.25, budget=None, window=32, kernel=7, beta=10.0)


@pytest.mark.parametrize("name,params,match", [
    *[(name, dict(budget=-1), "budget must") for name in sorted(EVICT)],
    *[(name, dict(budget=0), "budget must") for name in sorted(EVICT)],
    *[(name, dict(ratio=1.5), "ratio must") for name in sorted(EVICT)],
    *[(name, dict(ratio=0.0), "ratio must") for name in sorted(EVICT)],
    *[(name, dict(ratio=0.1, budget=100), "either ratio or budget") for name in sorted(EVICT)],
    ("snapkv", dict(budget=16), "window .32. must not exceed budget"),
    ("pyramidkv", dict(budget=8, window=16), "window .16. must not exceed"),
    ("snapkv", dict(kernel=4), "kernel must"),
    ("snapkv", dict(window=0), "window must"),
    ("pyramidkv", dict(beta=0.5), "beta must"),
    ("streamingllm", dict(budget=4, sink=4), "must exceed sink"),
    ("streamingllm", dict(sink=-1), "sink must"),
    ("quest", dict(budget=8, page=16), "at least one page"),
    ("quest", dict(page=0), "page must"),
    ("quest", dict(dense_layers=-1), "dense_layers must"),
    ("random", dict(ratio="half"), "ratio"),
])
def test_bad_parameters(name, params, match):
    with pytest.raises(ValueError, match=match):
        build(name, params)


def test_default_suite_runs_every_kv_method_at_two_budgets():
    suite = load(Path(__file__).parent.parent / "fidbench.yaml")
    for name in EVICT:
        # on the default datasets (a variant naming its datasets, e.g. ppl-snapkv-25 on the essays, is extra)
        ratios = sorted(v.params.get("ratio") for v in suite.variants if v.method == name and v.datasets is None)
        assert ratios == [0.1, 0.25], name
    assert set(EVICT) <= set(REGISTRY)
