"""topk sparse attention: keep = 1 is the base model, the budget is met exactly, prefill stays dense."""

import math

import pytest
import torch
from helpers import reference

from fidbench import attention, engine
from fidbench.methods import build


def force(model, method, ref, mode="parallel"):
    with method.apply(model) as m:
        return engine.teacher_force(m, method, ref.p_ids, ref.g_ids, mode).logits


def test_keep_one_equals_origin(tiny, prompt):
    ref = reference(tiny, prompt)
    base = force(tiny, build("origin", {}), ref)
    same = force(tiny, build("topk", {"keep": 1.0}), ref)
    # Every visible key is kept, so the mask equals the model's own and SDPA gets identical inputs.
    assert torch.equal(base, same)


def test_sparse_topk_changes_logits_and_parallel_equals_stepwise(tiny, prompt):
    ref = reference(tiny, prompt)
    base = force(tiny, build("origin", {}), ref)
    par = force(tiny, build("topk", {"keep": 0.1, "min_keep": 2}), ref)
    step = force(tiny, build("topk", {"keep": 0.1, "min_keep": 2}), ref, "stepwise")
    assert not torch.allclose(base[1:], par[1:], atol=1e-3)
    torch.testing.assert_close(par[0], base[0])  # the first token is predicted by the dense prefill
    assert (par.argmax(-1) == step.argmax(-1)).all()
    torch.testing.assert_close(par, step, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keep,min_keep", [(0.1, 8), (0.25, 1), (0.5, 3)])
def test_measured_kept_fraction_matches_parameter(tiny, prompt, keep, min_keep):
    ref = reference(tiny, prompt, n=16)
    method = build("topk", {"keep": keep, "min_keep": min_keep})
    force(tiny, method, ref)
    # Decode query t (t = 0..N-2) sees P + t + 1 keys (at most the window on sliding-window layers)
    # and keeps max(ceil(keep * n), min_keep), at most n.
    P, N, config = len(ref.p_ids), len(ref.g_ids), tiny.config
    window = getattr(config, "sliding_window", None)
    types = (getattr(config, "layer_types", None)
             or ["sliding_attention" if window else "full_attention"] * config.num_hidden_layers)
    expected = []
    for kind in types:
        visible = [P + t + 1 if kind == "full_attention" else min(P + t + 1, window) for t in range(N - 1)]
        kept = [min(n, max(math.ceil(keep * n), min_keep)) for n in visible]
        expected.append((sum(kept), sum(visible)))
    measured = method.kept()
    assert measured["kv_fraction_per_layer"] == pytest.approx([k / v for k, v in expected], rel=1e-12)
    assert measured["kv_fraction"] == pytest.approx(sum(k for k, _ in expected) / sum(v for _, v in expected),
                                                    rel=1e-12)


def test_attend_keeps_the_largest_scores_per_head():
    torch.manual_seed(0)
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups, module.is_causal = 0, 2, True
    q = torch.randn(1, 4, 1, 8)
    k = torch.randn(1, 2, 10, 8)
    v = torch.randn(1, 2, 10, 8)
    call = attention.AttentionCall(module, q, k, v, None, attention.Phase("decode", 9), {"scaling": 8**-0.5})
    out = build("topk", {"keep": 0.3, "min_keep": 1}).attend(call)
    for h in range(4):
        kh, vh = k[0, h // 2], v[0, h // 2]
        s = (q[0, h, 0] @ kh.T) * 8**-0.5
        top = s.topk(3).indices  # ceil(0.3 * 10) = 3
        expected = torch.softmax(s[top], -1) @ vh[top]
        torch.testing.assert_close(out[0, 0, h], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", [{"keep": 0}, {"keep": 1.5}, {"min_keep": 0}, {"keep": "0.1"}, {"keep_ratio": 0.1}])
def test_bad_parameters_are_clear_errors(params):
    with pytest.raises(ValueError, match="keep|topk"):
        build("topk", params)


@pytest.mark.parametrize("keep,min_keep", [(0.1, 1), (0.3, 4), (1.0, 1)])
def test_selection_equals_a_stable_descending_sort_with_ties(keep, min_keep):
    # Integer-valued queries and keys make exact score ties common, also at the budget's boundary.
    g = torch.Generator().manual_seed(3)
    module = torch.nn.Module()
    module.layer_idx, module.num_key_value_groups, module.is_causal = 0, 2, True
    q = torch.randint(-2, 3, (1, 4, 6, 8), generator=g).float()
    k = torch.randint(-1, 2, (1, 2, 30, 8), generator=g).float()
    call = attention.AttentionCall(module, q, k, k.clone(), None, attention.Phase("decode", 24), {"scaling": 8**-0.5})
    call.dense = lambda mask=None, **_: mask  # capture the mask the method hands to SDPA
    got = build("topk", {"keep": keep, "min_keep": min_keep}).attend(call)
    visible = call.visible()
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)).masked_fill(~visible, -math.inf)
    n = visible.sum(-1, keepdim=True)
    budget = torch.minimum(torch.clamp((n * keep).ceil(), min=min_keep), n)
    order = scores.argsort(dim=-1, descending=True, stable=True)  # ties: the lower position first
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(30).expand_as(order))
    assert (scores[..., None] == scores[..., None, :]).sum() > scores.numel()  # the data has ties
    assert torch.equal(got, ranks < budget)
