"""Every registered method on every tiny model family (conftest.FAMILIES), and the model's own masks
under fidbench's attention function: sliding-window layers stay sliding.

Each method needs an entry in ``PARAMS``: parameters that must reproduce ``origin`` ("degenerate"),
parameters that must change the logits ("real", None for origin itself), and optionally the families
it refuses ("unsupported": family -> why), which must fail with an error naming the method and family.
"""

import functools

import pytest
import torch

from conftest import FAMILIES, WINDOW, tiny_model
from fidbench import attention, engine
from fidbench.methods import REGISTRY, build
from test_engine import reference

PARAMS = {
    "origin": {"degenerate": {}, "real": None},
    "topk": {"degenerate": {"keep": 1.0}, "real": {"keep": 0.1, "min_keep": 2}},
}
SLIDING = ("gemma3_text", "mistral")
# Degenerate parameters must give origin's logits to fp32 round-off. Bit-identical is not always
# possible: where the model hands SDPA no mask (its is_causal fast path, e.g. one-token decode steps
# on full-attention layers), a method passing an all-True mask selects another SDPA kernel, whose
# summation order moves logits by ~1e-7 (measured 1.5e-7 on these models).
ATOL = 1e-5


def _spec(method: str) -> dict:
    if method not in PARAMS:
        pytest.fail(
            f"method {method!r} has no entry in tests/test_families.py PARAMS: add its degenerate parameters "
            f"(equal origin) and real parameters (change the logits)", pytrace=False,
        )
    return PARAMS[method]


@functools.cache
def _model_and_reference(family: str):
    model = tiny_model(family)
    prompt = torch.randint(0, 283, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, reference(model, prompt)  # 40 + 24 tokens: longer than the sliding window


def _force(model, method, ref, mode=None):
    mode = mode or engine.resolve_mode(method, "auto")
    with method.apply(model) as m:
        return engine.teacher_force(m, method, ref.p_ids, ref.g_ids, mode).logits


def _run_or_refusal(method_name: str, family: str, params: dict, mode=None):
    """The method's logits on ``family``, or None after checking the refusal a family in ``unsupported`` must give."""
    model, ref = _model_and_reference(family)
    method = build(method_name, params)
    if family in _spec(method_name).get("unsupported", {}):
        with pytest.raises((ValueError, RuntimeError)) as e:
            _force(model, method, ref, mode)
        assert method_name in str(e.value) and family in str(e.value), f"unclear refusal: {e.value}"
        return None, method
    return _force(model, method, ref, mode), method


def test_every_method_has_matrix_parameters():
    missing = sorted(set(REGISTRY) - set(PARAMS))
    assert not missing, f"add {', '.join(missing)} to tests/test_families.py PARAMS (degenerate and real parameters)"
    assert set(PARAMS) <= set(REGISTRY), f"PARAMS names unregistered methods: {sorted(set(PARAMS) - set(REGISTRY))}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_degenerate_parameters_equal_origin(method, family):
    logits, m = _run_or_refusal(method, family, _spec(method)["degenerate"])
    if logits is None:
        return
    model, ref = _model_and_reference(family)
    base = _force(model, build("origin", {}), ref, engine.resolve_mode(m, "auto"))
    assert torch.equal(logits.argmax(-1), base.argmax(-1))
    torch.testing.assert_close(logits, base, atol=ATOL, rtol=0)


# Methods without an entry are kept so that they fail; origin has no real parameters.
_REAL = [m for m in sorted(REGISTRY) if m not in PARAMS or PARAMS[m]["real"] is not None]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", _REAL)
def test_real_parameters_change_logits_and_report_what_they_kept(method, family, record_property):
    logits, m = _run_or_refusal(method, family, _spec(method)["real"])
    if logits is None:
        return
    model, ref = _model_and_reference(family)
    base = _force(model, build("origin", {}), ref)
    assert logits.shape == base.shape and torch.isfinite(logits).all()
    change = (logits - base).abs().max().item()
    assert change > 1e-3, f"{method} {_spec(method)['real']} left {family}'s logits unchanged (max |Δ| {change:.2g})"
    kept = m.kept()
    assert kept, f"{method} on {family}: kept() reports nothing; record() what it keeps or override kept()"
    record_property("kept", kept)
    record_property("max_abs_logit_change", change)
    if m.parallel_exact:  # the claim that lets the engine run it in one forward
        step = _force(model, build(method, _spec(method)["real"]), ref, "stepwise")
        assert torch.equal(step.argmax(-1), logits.argmax(-1))
        torch.testing.assert_close(step, logits, atol=1e-4, rtol=1e-4)


def test_models_that_bypass_the_attention_registry_are_refused(monkeypatch):
    model, ref = _model_and_reference("llama")
    # For a model whose attention code does not use the registry, transformers logs a warning and keeps
    # the implementation it had.
    monkeypatch.setattr(type(model), "set_attn_implementation", lambda self, name: None)
    with pytest.raises(ValueError, match=r"method 'topk' cannot run on llama \(LlamaForCausalLM\)"):
        _force(model, build("topk", {"keep": 0.5}), ref)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_changes_these_models(family):
    # Otherwise the window tests below could not fail: the same weights with a window covering every position.
    model, ref = _model_and_reference(family)
    wide = tiny_model(family, sliding_window=1024)
    origin = build("origin", {})
    assert not torch.allclose(_force(model, origin, ref), _force(wide, origin, ref), atol=1e-3)


class Spy(REGISTRY["topk"]):
    """topk that also checks every call's mask against absolute positions and keeps what it saw."""

    def begin(self, prompt_len):
        self.calls = []

    def attend(self, call):
        kpos, qpos = call.key_positions(), call.query_positions()
        rule = kpos[None, :] <= qpos[:, None]
        if call.sliding_window is not None:
            rule &= qpos[:, None] - kpos[None, :] < call.sliding_window
        torch.testing.assert_close(call.visible()[0, 0], rule, rtol=0, atol=0)  # the model's own mask, by position
        out = super().attend(call)
        self.calls.append((call.phase.name, call.sliding_window, kpos, qpos))
        return out


@pytest.mark.parametrize("mode", ["parallel", "stepwise"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_key_positions_match_the_models_mask(family, mode):
    model, ref = _model_and_reference(family)
    spy = Spy(keep=1.0)
    _force(model, spy, ref, mode)
    P, N = len(ref.p_ids), len(ref.g_ids)
    decode = [c for c in spy.calls if c[0] == "decode"]
    assert decode[-1][3][-1] == P + N - 2  # the last query is the last fed reference token
    sliding = [c for c in decode if c[1] is not None]
    assert bool(sliding) == (family in SLIDING)
    for _, window, kpos, _ in decode:
        if window is None:
            assert kpos[0] == 0  # full-attention layers keep every position
        else:
            assert window == WINDOW and kpos[0] > 0  # the sliding cache dropped the oldest keys


@pytest.mark.parametrize("family", SLIDING)
def test_topk_never_selects_keys_outside_the_window(family, monkeypatch):
    model, ref = _model_and_reference(family)
    selected = []

    def dense(self, mask=None, **kw):
        if mask is not None:
            kpos, qpos = self.key_positions(), self.query_positions()
            for q, k in (mask[0].any(0)).nonzero().tolist():
                selected.append((self.sliding_window, int(qpos[q]), int(kpos[k])))
        return real_dense(self, mask=mask, **kw)

    real_dense = attention.AttentionCall.dense
    monkeypatch.setattr(attention.AttentionCall, "dense", dense)
    for mode in ("parallel", "stepwise"):
        _force(model, build("topk", {"keep": 0.1, "min_keep": 2}), ref, mode)
    windowed = [(q, k) for w, q, k in selected if w is not None]
    assert windowed and all(0 <= q - k < WINDOW for q, k in windowed)
    if family == "gemma3_text":  # its full-attention layer does reach further back
        assert any(q - k >= WINDOW for w, q, k in selected if w is None)
