"""H2O and TOVA: decode-time KV eviction as masks over absolute positions (one decode-time eviction step,
a victim rule each). Masking equals a physical cache over 20 decode steps: tests/test_physical.py."""

import math

import pytest
import torch
from helpers import FULL, tiny_model

from fidbench import attention, engine
from fidbench.attention import AttentionCall, Phase
from fidbench.methods import build, h2o

# Variants whose budget is below a 40-token prompt, so both prefill and decode evict.
EVICTING = {
    "h2o": {"budget": 10, "recent": 0.4},  # 6 heavy + 4 recent
    "h2o-ratio": {"ratio": 0.25},  # 5 + 5 of a 40-token prompt
    "h2o-query": {"budget": 10, "granularity": "query_head"},
    "tova": {"budget": 10},
    "tova-ratio": {"ratio": 0.25},  # 10 of a 40-token prompt
}
# Choices per layer on the tiny models (4 query heads, 2 KV heads).
HEADS = {"h2o": 2, "h2o-ratio": 2, "h2o-query": 4, "tova": 1, "tova-ratio": 1}


def variant(name):
    return build(name.split("-")[0], EVICTING[name])


def reference(n=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n,), generator=g).tolist()


@pytest.mark.parametrize("family", FULL)
@pytest.mark.parametrize("method,params", [
    ("h2o", {"budget": 48}),  # 48 = prompt 40 + reference 8
    ("h2o", {"ratio": 1.0, "min_budget": 48}),
    ("h2o", {"budget": 48, "granularity": "query_head"}),
    ("tova", {"budget": 48}),
    ("tova", {"ratio": 1.0, "min_budget": 48}),
])
@pytest.mark.parametrize("mode", ["stepwise", "parallel"])
def test_budget_covering_everything_equals_origin(family, method, params, mode, prompt):
    # A cache that never exceeds its budget evicts nothing, and the hook then hands every call back to
    # the model's own attention: the logits are bit for bit those of origin in the same mode, so we test equality.
    model, g_ids = tiny_model(family), reference()
    base = engine.teacher_force(model, build("origin", {}), prompt, g_ids, mode).logits
    m = build(method, params)
    with m.apply(model) as applied:
        forced = engine.teacher_force(applied, m, prompt, g_ids, mode).logits
    assert torch.equal(forced, base)
    assert m.kept()["kv_fraction"] == 1.0


@pytest.mark.parametrize("family", FULL)
@pytest.mark.parametrize("name", sorted(EVICTING))
def test_kept_count_per_head_is_the_budget(family, name, prompt):
    model, m = tiny_model(family), variant(name)
    counts = []

    def checked(call, hook=m.attend):
        out = hook(call)
        counts.append(m.keep[call.layer_idx].sum(-1))  # (B, KVH) after this call's eviction
        return out

    m.attend = checked
    with m.apply(model) as applied:
        forced = engine.teacher_force(applied, m, prompt, reference(), "stepwise").logits
    assert counts and all(c.shape == (1, HEADS[name]) and bool((c == 10).all()) for c in counts)
    assert torch.isfinite(forced).all()
    # Every decode query saw the 10 kept positions plus itself, out of all it could see.
    layers = model.config.num_hidden_layers
    visible = sum(len(prompt) + 1 + t for t in range(len(reference()) - 1))
    assert m.kept()["kv_fraction"] == pytest.approx(11 * (len(reference()) - 1) / visible)
    assert len(m.kept()["kv_fraction_per_layer"]) == layers
    assert m.kept()["budget"] == m.kept()["budget_per_head"] == 10


@pytest.mark.parametrize("family", FULL)
@pytest.mark.parametrize("method,params,budget", [
    ("h2o", {"ratio": 0.2}, 8),  # 20 % of 12 tokens is 2: raised to min_budget 8
    ("tova", {"ratio": 0.1}, 8),
    ("tova", {"ratio": 0.1, "min_budget": 3}, 3),
])
def test_short_prompt_gets_min_budget(family, method, params, budget):
    model, m = tiny_model(family), build(method, params)
    with m.apply(model) as applied:
        engine.teacher_force(applied, m, list(range(12)), reference(), "stepwise")
    assert all(bool((k.sum(-1) == budget).all()) for k in m.keep.values())


def test_h2o_recent_share_of_the_budget():
    m = build("h2o", {"ratio": 0.2, "recent": 0.25})
    m.begin(100)
    assert (m.tokens(100), m.recent_tokens) == (20, 5)  # 15 heavy hitters
    m.begin(10)  # 2 tokens by ratio, raised to min_budget 8, a quarter recent
    assert (m.tokens(10), m.recent_tokens) == (8, 2)
    m.begin(30)  # 6 tokens: 1.5 recent rounds half up
    assert (m.tokens(30), m.recent_tokens) == (8, 2)


@pytest.mark.parametrize("family", FULL)
@pytest.mark.parametrize("granularity", ["kv_head", "query_head"])
def test_h2o_prefill_scores_are_column_sums_in_chunks(family, granularity, prompt, monkeypatch):
    # H2O's prefill score of a key is the sum over prompt queries of its attention probability, per query
    # head or averaged over the query heads of its KV head: compare with the eager attention's own
    # probabilities, with chunks of 7 queries so that chunk boundaries fall inside the 40-token prompt.
    model = tiny_model(family)
    ids = torch.tensor([prompt])
    model.set_attn_implementation("eager")
    probs = model(input_ids=ids, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    monkeypatch.setattr(h2o, "CHUNK", 7)
    m = build("h2o", {"granularity": granularity})
    with m.apply(model) as applied:
        m.begin(len(prompt))
        with attention.running(m, Phase("prefill", len(prompt), 0)):
            engine.forward(applied, ids)
    for layer, p in enumerate(probs):
        b, h, n, _ = p.shape
        expected = p.sum(2).view(b, -1, h // m.score[layer].shape[1], n).mean(2)
        assert m.score[layer].shape[1] == (h if granularity == "query_head" else h // 2)
        torch.testing.assert_close(m.score[layer], expected, rtol=1e-5, atol=1e-5)


class Layer(torch.nn.Module):
    """The attributes SDPA and the hook read from an attention module."""
    layer_idx = 0
    is_causal = True


def call(query, key, phase):
    """A one-layer attention call on hand-made (B=1, heads, seq, D=1) tensors, unit scaling."""
    q = torch.tensor(query, dtype=torch.float32).view(1, -1, len(query[0]), 1)
    k = torch.tensor(key, dtype=torch.float32).view(1, -1, len(key[0]), 1)
    v = torch.arange(k.numel(), dtype=torch.float32).view_as(k)
    return AttentionCall(Layer(), q, k, v, None, Phase(phase, 4), {"scaling": 1.0})


def test_h2o_hand_computed_eviction():
    m = build("h2o", {"budget": 3, "recent": 0.3})  # 1 recent, 2 heavy
    m.begin(4)
    # Prefill: zero queries attend uniformly, so the causal column sums are
    # pos 0: 1 + 1/2 + 1/3 + 1/4 = 2.083, pos 1: 1.083, pos 2: 0.583, pos 3: 0.25.
    # Recent keeps pos 3, heavy keeps the top 2 of pos 0..2: pos 0 and 1; pos 2 is evicted.
    c = 57.0
    assert m.attend(call([[0, 0, 0, 0]], [[0, 0, 0, math.log(c)]], "prefill")) is None
    torch.testing.assert_close(m.score[0][0, 0], torch.tensor([25 / 12, 13 / 12, 7 / 12, 1 / 4]))
    assert m.keep[0].tolist() == [[[True, True, False, True]]]
    # Decode pos 4 with query 1: weights exp(q.k) over kept pos 0, 1, 3, 4 are 1, 1, 57, 1 (pos 2 masked),
    # probabilities 1/60, 1/60, 57/60, 1/60. Accumulated: pos 0: 2.100, pos 1: 1.100, pos 3: 1.200,
    # pos 4: 0.017. 4 kept > budget 3; pos 4 is the recent window, so the lowest of pos 0, 1, 3 goes:
    # pos 1, although pos 3 had the lowest score before this step.
    decode = call([[1]], [[0, 0, 0, math.log(c), 0]], "decode")
    out = m.attend(decode)
    assert m.keep[0].tolist() == [[[True, False, False, True, True]]]
    torch.testing.assert_close(m.score[0][0, 0], torch.tensor([25 / 12 + 1 / 60, 13 / 12 + 1 / 60, 7 / 12,
                                                                1 / 4 + 57 / 60, 1 / 60]))
    # The query attended to pos 0, 1, 3, 4 (values 0, 1, 3, 4): output = (0 + 1 + 57*3 + 4) / 60.
    assert out.flatten().item() == pytest.approx(176 / 60)
    # Next step: pos 1 never comes back; pos 4 leaves the window and competes with pos 0 and 3.
    m.attend(call([[0]], [[0, 0, 0, math.log(c), 0, 0]], "decode"))  # uniform 1/4 over pos 0, 3, 4, 5
    assert m.keep[0].tolist() == [[[True, False, False, True, False, True]]]


def test_tova_hand_computed_eviction():
    m = build("tova", {"budget": 3})
    m.begin(4)
    # Prefill: the last query (1) weighs pos 0..3 by exp(k) = e^0.5, e^2, e^1, e^0: the most recent
    # position is the least attended and is evicted.
    m.attend(call([[0, 0, 0, 1]], [[0.5, 2, 1, 0]], "prefill"))
    assert m.keep[0].tolist() == [[[True, True, True, False]]]
    # Decode pos 4 (key 1.5): weights over kept pos 0, 1, 2, 4 are e^0.5, e^2, e^1, e^1.5: pos 0 goes.
    m.attend(call([[1]], [[0.5, 2, 1, 0, 1.5]], "decode"))
    assert m.keep[0].tolist() == [[[False, True, True, False, True]]]
    # Decode pos 5 with key -1, the least attended of pos 1, 2, 4, 5: the new token itself goes.
    m.attend(call([[1]], [[0.5, 2, 1, 0, 1.5, -1]], "decode"))
    assert m.keep[0].tolist() == [[[False, True, True, False, True, False]]]


def test_tova_chooses_once_per_layer():
    m = build("tova", {"budget": 2})
    m.begin(3)
    # Two KV heads with one query head each. Head 0 (q=1) weighs keys 0, ln 3, ln 2 as 1:3:2 and would
    # keep pos 1 and 2; head 1 (q=-1) as 1:1/3:1/2 and would keep pos 0 and 2. The layer's mean, pos 0:
    # 0.356, pos 1: 0.341, pos 2: 0.303, drops pos 2 from both heads (TOVA's code: one choice per layer).
    k = [0, math.log(3), math.log(2)]
    m.attend(call([[0, 0, 1], [0, 0, -1]], [k, k], "prefill"))
    assert m.keep[0].tolist() == [[[True, True, False]]]
    assert m.kept()["budget_per_head"] == 2


def test_tova_grouped_heads_choose_by_their_mean():
    m = build("tova", {"budget": 2})
    m.begin(3)
    # Two query heads share one KV head. Head 0 (q=1) weighs keys 0, ln 3, ln 2 as 1:3:2,
    # head 1 (q=-1) as 1:1/3:1/2. Means: pos 0: (1/6 + 6/11)/2 = 0.356, pos 1: (1/2 + 2/11)/2 = 0.341,
    # pos 2: (1/3 + 3/11)/2 = 0.303. Head 0 alone would keep pos 1 and 2; the mean keeps 0 and 1.
    m.attend(call([[0, 0, 1], [0, 0, -1]], [[0, math.log(3), math.log(2)]], "prefill"))
    assert m.keep[0].tolist() == [[[True, True, False]]]


@pytest.mark.parametrize("method,params,match", [
    ("h2o", {"recent": -0.1}, "recent"),
    ("h2o", {"recent": 1.5}, "recent"),
    ("h2o", {"heavy": 0.1}, "unknown parameter"),
    ("h2o", {"ratio": 1.5}, "ratio"),
    ("h2o", {"budget": 0}, "budget"),
    ("h2o", {"granularity": "layer"}, "granularity"),
    ("h2o", {"min_budget": 0}, "min_budget"),
    ("tova", {"ratio": 1.5}, "ratio"),
    ("tova", {"ratio": 0.0}, "ratio"),
    ("tova", {"budget": -3}, "budget"),
    ("tova", {"budget": 0}, "budget"),
    ("tova", {"min_budget": 0}, "min_budget"),
    ("tova", {"window": 4}, "unknown parameter"),
    ("h2o", {"budget": 2.5}, "budget"),
    ("tova", {"granularity": "kv_head"}, "unknown parameter"),
])
def test_bad_parameter_is_a_clear_error(method, params, match):
    with pytest.raises(ValueError, match=match):
        build(method, params)


def both_modes(model, params, prompt, g_ids):
    """Teacher-force ``g_ids`` stepwise and in parallel: per mode the logits, the final keep masks, h2o's
    accumulated scores (else None) and what kept() reports."""
    out = {}
    for mode in ("stepwise", "parallel"):
        m = build(*params)
        with m.apply(model) as applied:
            logits = engine.teacher_force(applied, m, prompt, g_ids, mode).logits
        out[mode] = logits, m.keep, getattr(m, "score", None), m.kept()
    return out["stepwise"], out["parallel"]


def assert_same_decode(step, par):
    """Parallel teacher forcing computed what the token-by-token loop computes: the same entries kept in
    every layer, the same counts, the same argmax, and logits (and h2o's scores) up to the last bits. One
    forward of 8 query rows and 8 forwards of one row run matmuls and softmaxes of other shapes, which may
    sum in another order: measured on the tiny models, logits differ by at most 3e-7 and h2o's scores (sums
    of up to 48 probabilities) by at most 1e-6; the tolerance is 1e-5."""
    (s_logits, s_keep, s_score, s_kept), (p_logits, p_keep, p_score, p_kept) = step, par
    assert s_keep.keys() == p_keep.keys()
    for layer in s_keep:
        assert torch.equal(s_keep[layer], p_keep[layer]), f"layer {layer} kept other entries"
    if s_score is not None:
        for layer in s_score:
            torch.testing.assert_close(p_score[layer], s_score[layer], rtol=1e-5, atol=1e-5)
    assert p_kept == s_kept
    assert torch.equal(p_logits.argmax(-1), s_logits.argmax(-1))
    torch.testing.assert_close(p_logits, s_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FULL)
@pytest.mark.parametrize("name", sorted(EVICTING))
def test_parallel_equals_stepwise_when_every_row_evicts(family, name, prompt):
    # 40-token prompt over a budget of 10: the prefill cuts, and every decode row evicts one entry.
    m = variant(name)
    assert engine.resolve_mode(m, "auto") == "parallel"
    model, params = tiny_model(family), (name.split("-")[0], EVICTING[name])
    step, par = both_modes(model, params, prompt, reference())
    assert_same_decode(step, par)
    # Decode rows did evict: some generated position is gone from some layer's cache.
    assert any(not bool(k[..., len(prompt):].all()) for k in par[1].values())


@pytest.mark.parametrize("family", FULL)
@pytest.mark.parametrize("method,params", [
    ("h2o", {"budget": 44}),
    ("h2o", {"budget": 44, "recent": 0.1, "granularity": "query_head"}),
    ("tova", {"budget": 44}),
])
def test_parallel_equals_stepwise_when_the_budget_fills_during_decode(family, method, params, prompt):
    # A 40-token prompt under a budget of 44: nothing is cut at the prefill, decode rows 0-3 fill the cache,
    # rows 4-11 evict; stepwise the first steps run the model's own attention, in parallel one masked call.
    model, g_ids = tiny_model(family), reference(12)
    step, par = both_modes(model, (method, params), prompt, g_ids)
    assert_same_decode(step, par)
    assert all(bool((k.sum(-1) == 44).all()) for k in par[1].values())
    assert par[3]["kv_fraction"] < 1.0


def test_h2o_hand_computed_eviction_in_one_forward():
    # test_h2o_hand_computed_eviction's two decode steps as the two rows of one decode forward: row 0 evicts
    # pos 1 before row 1 attends, and the same entries are kept, with the same scores.
    m = build("h2o", {"budget": 3, "recent": 0.3})
    m.begin(4)
    c = 57.0
    m.attend(call([[0, 0, 0, 0]], [[0, 0, 0, math.log(c)]], "prefill"))
    out = m.attend(call([[1, 0]], [[0, 0, 0, math.log(c), 0, 0]], "decode"))
    assert m.keep[0].tolist() == [[[True, False, False, True, False, True]]]
    torch.testing.assert_close(m.score[0][0, 0], torch.tensor([25 / 12 + 1 / 60 + 1 / 4, 13 / 12 + 1 / 60, 7 / 12,
                                                                1 / 4 + 57 / 60 + 1 / 4, 1 / 60 + 1 / 4, 1 / 4]))
    # Row 0 attended to pos 0, 1, 3, 4 as before; row 1 uniformly to pos 0, 3, 4, 5 (values 0, 3, 4, 5).
    assert out.flatten().tolist() == pytest.approx([176 / 60, 12 / 4])


def test_tova_hand_computed_eviction_in_one_forward():
    # test_tova_hand_computed_eviction's two decode steps in one forward: row 0 evicts pos 0, row 1 itself.
    m = build("tova", {"budget": 3})
    m.begin(4)
    m.attend(call([[0, 0, 0, 1]], [[0.5, 2, 1, 0]], "prefill"))
    m.attend(call([[1, 1]], [[0.5, 2, 1, 0, 1.5, -1]], "decode"))
    assert m.keep[0].tolist() == [[[False, True, True, False, True, False]]]
