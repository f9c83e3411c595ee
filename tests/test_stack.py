"""Stacks (fidbench/methods/stack.py): members compose by role, degenerate members change nothing bit for bit,
a cache member after a selection reads only the kept entries, and incompatible stacks are suite errors."""

import functools

import pytest
import torch
from helpers import ROOT, calibration, decode_calls, reference, tiny_model
from test_suite import write

from fidbench import engine, prefill
from fidbench.attention import AttentionCall
from fidbench.methods import REGISTRY, build
from fidbench.methods.base import ROLES
from fidbench.suite import SuiteError, load

DEGENERATE = {"rtn": {"bits": 16}, "snapkv": {"ratio": 1.0}, "kivi": {"bits": 16}}
REAL = {"rtn": {"bits": 3}, "snapkv": {"budget": 12, "window": 4, "kernel": 3},
        "kivi": {"bits": 2, "group": 4, "residual": 8}, "fp8-attention": {}}


@functools.cache
def _model_and_reference():
    model = tiny_model("llama")
    prompt = torch.randint(0, 283, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, reference(model, prompt)


def _force(method, mode=None):
    model, ref = _model_and_reference()
    with method.apply(model, calibration()) as m:
        return engine.teacher_force(m, method, ref.p_ids, ref.g_ids, mode or engine.resolve_mode(method, "auto")).logits


def _stack(*members):
    return build("stack", {"members": [{"method": name, **params} for name, params in members]})


def test_degenerate_members_equal_origin_bit_for_bit():
    stack = _stack(*DEGENERATE.items())
    assert torch.equal(_force(stack), _force(build("origin", {})))


@pytest.mark.parametrize("real", sorted(REAL))
def test_all_but_one_degenerate_equals_that_member_alone(real):
    others = [(name, params) for name, params in DEGENERATE.items() if name != real]
    stack = _stack((real, REAL[real]), *others)
    alone = build(real, REAL[real])
    assert engine.resolve_mode(stack, "auto") == engine.resolve_mode(alone, "auto")
    assert torch.equal(_force(stack), _force(alone)), f"{real} in a degenerate stack differs from {real} alone"


def test_members_compose():
    """A real selection and a real cache member both act: the stack is neither member alone."""
    both = _force(_stack(("snapkv", REAL["snapkv"]), ("kivi", REAL["kivi"])))
    for name in ("snapkv", "kivi"):
        assert not torch.allclose(both, _force(build(name, REAL[name])), atol=1e-4), f"the stack is {name} alone"


def test_kivi_after_snapkv_quantizes_exactly_the_kept_entries():
    """Decode queries of a 40-token prompt at residual 8 read every prompt key quantized: in the stack, the
    quantized keys they read are those kivi alone reads less exactly the entries snapkv evicts."""
    stack = _stack(("kivi", REAL["kivi"]), ("snapkv", REAL["snapkv"]))  # any order: select runs first
    _force(stack)
    snapkv, kivi = stack._attending
    assert (snapkv.name, kivi.name) == ("snapkv", "kivi")
    alone = build("kivi", REAL["kivi"])
    _force(alone)
    kept = sum(float(k) for k, _ in snapkv._kept.values())
    visible = sum(float(v) for _, v in snapkv._kept.values())
    assert 0 < kept < visible
    evicted = visible - kept
    assert float(kivi._counts[0]) == float(alone._counts[0]) - evicted  # keys
    assert float(kivi._counts[0]) > 0
    members = stack.kept()["members"]
    assert [m["method"] for m in members] == ["snapkv", "kivi"]
    assert members[0]["kept"]["kv_fraction"] == pytest.approx(kept / visible)
    assert stack.kept()["kv_fraction"] == members[0]["kept"]["kv_fraction"]
    assert members[1]["kept"]["keys_quantized"] > 0
    assert members[1]["params"] == build("kivi", REAL["kivi"]).params()


@pytest.mark.parametrize("members", [("snapkv", "kivi"), ("h2o", "kivi"), ("quest", "gear"), ("topk", "gear")])
def test_parallel_equals_stepwise_for_parallel_exact_members(members):
    stack = _stack(*((name, REGISTRY[name].test_params["real"]) for name in members))
    assert stack.parallel_exact and stack.base_prefill
    assert torch.allclose(_force(stack, "parallel"), _force(stack, "stepwise"), atol=1e-5, rtol=0)


@pytest.mark.parametrize("members", [("snapkv", "fp8-attention"), ("h2o", "kivi", "sage-attention"),
                                     ("quest", "gear", "fp8-attention")])
def test_a_kernel_behind_a_selection_and_a_cache_runs_parallel_as_stepwise(members, monkeypatch):
    """A kernel's decode statistics cover the keys each query sees (the kept entries), in both modes: each decode
    row of one forward is the kernel's one-query call with that row's mask over what the members hand on. Through
    the model the modes agree in argmax; their logits differ where the model's own layers, summing in another
    order, move an input across one of the kernel's rounding steps (up to 3e-3 here with gear's copies)."""
    stack = _stack(*((name, REGISTRY[name].test_params["real"] or {}) for name in members))
    assert stack.parallel_exact
    kernel = stack._attending[-1]
    parallel, calls, attend = decode_calls(monkeypatch, kernel, lambda: _force(stack, "parallel"))
    assert calls
    for call, out in calls:
        visible = call.visible()
        for row in range(call.query.shape[2]):
            step = AttentionCall(call.module, call.query[:, :, row : row + 1], call.key, call.value,
                                 visible[:, :, row : row + 1], call.phase, call.kwargs)
            torch.testing.assert_close(out[:, row : row + 1], attend(kernel, step), atol=1e-6, rtol=0)
    assert torch.equal(parallel.argmax(-1), _force(stack, "stepwise").argmax(-1))


def test_a_stepwise_member_makes_the_stack_stepwise_and_weights_a_live_prefill():
    stack = _stack(("rtn", REAL["rtn"]), ("snapkv", REAL["snapkv"]), ("sparge-attention", {"decode": "sparse"}))
    assert not stack.parallel_exact and not stack.base_prefill and stack.full_attention_only
    with pytest.raises(ValueError, match="parallel"):
        engine.resolve_mode(stack, "parallel")
    assert _stack(("snapkv", REAL["snapkv"]), ("fp8-attention", {})).parallel_exact


def test_weight_members_apply_in_order_and_restore():
    model, _ = _model_and_reference()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stack = _stack(("rtn", {"bits": 4}), ("magnitude", {"sparsity": 0.5}))
    with stack.apply(model, calibration()):
        weight = model.model.layers[0].self_attn.q_proj.weight
        assert (weight == 0).float().mean() >= 0.5  # magnitude pruned what rtn left
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


SUITE = """
models:
  tiny: {{path: some/dir}}
datasets:
  chat: chat.jsonl
methods:
  {name}: {spec}
"""


@pytest.mark.parametrize("spec, message", [
    ("{stack: [{method: snapkv, ratio: 0.25}, {method: h2o, ratio: 0.25}]}", "both play the role 'select'"),
    ("{stack: [{method: fp8-attention}, {method: sage-attention}]}", "both play the role 'kernel'"),
    ("{stack: [{method: origin}, {method: kivi}]}", "'origin' (kind 'none') does not compose"),
    ("{stack: [{method: snapkv}, {method: stack, members: []}]}", "stack member 2 (stack)"),
    ("{stack: [{method: snapkv, rate: 0.2}, {method: kivi}]}", "stack member 1 (snapkv): unknown parameter"),
    ("{stack: [{method: nope}, {method: kivi}]}", "unknown method 'nope'"),
    ("{stack: [{method: kivi}]}", "at least two methods"),
    ("{stack: [{method: kivi}, {method: sparge-attention, decode: sparse}]}", "does not compose with the cache"),
    ("{stack: [{method: kivi}, {method: snapkv}], method: topk}", "either stack"),
])
def test_incompatible_stacks_are_suite_errors_naming_the_variant(tmp_path, spec, message):
    with pytest.raises(SuiteError) as e:
        load(write(tmp_path, SUITE.format(name="deploy-1", spec=spec)))
    assert "methods.deploy-1" in str(e.value) and message in str(e.value), str(e.value)


def test_suite_stack_syntax(tmp_path):
    suite = load(write(tmp_path, SUITE.format(name="awq4+snapkv25", spec=(
        "{stack: [{method: rtn, bits: 4}, {method: snapkv, ratio: 0.25}], floors: {acc1: 0.5}}"))))
    variant = suite.variants[0]
    assert variant.method == "stack"
    assert variant.params == {"members": [{"method": "rtn", "bits": 4}, {"method": "snapkv", "ratio": 0.25}]}
    assert build(variant.method, variant.params).params() == variant.params


def test_a_base_prefill_stack_replays_a_shared_prefill_bit_for_bit():
    stack = _stack(("snapkv", REAL["snapkv"]), ("kivi", REAL["kivi"]))
    model, ref = _model_and_reference()
    recorded = prefill.record(model, ref.p_ids)
    with stack.apply(model) as m:
        live = engine.teacher_force(m, stack, ref.p_ids, ref.g_ids, "parallel").logits
        replayed = engine.teacher_force(m, stack, ref.p_ids, ref.g_ids, "parallel", recorded).logits
    assert torch.equal(live, replayed)


def test_every_attention_method_has_a_role_and_the_docs_table_lists_them():
    """A new attention method declares its role (or the stack refuses it); docs/suite.md's table is the registry's."""
    table = (ROOT / "docs" / "suite.md").read_text()
    for role in ROLES:
        names = ", ".join(f"`{n}`" for n, c in sorted(REGISTRY.items()) if c.role == role)
        assert f"| `{role}` |" in table and table.split(f"| `{role}` |")[1].split("\n")[0].endswith(f"| {names} |")
    assert [n for n, c in REGISTRY.items() if c.kind == "attention" and c.role is None] == ["stack"]
