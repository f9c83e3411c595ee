"""Every registered method on every tiny model family (tests/helpers.py FAMILIES), and the model's own masks
under fidbench's attention function: sliding-window layers stay sliding.

Each method declares its matrix parameters on its class (``Method.test_params``): parameters that must
reproduce ``origin`` ("degenerate"; None with a "why" where no setting is lossless), parameters that
must change the logits ("real"; None for origin itself), or "covered_by": the test that runs it on
every family when it needs inputs the matrix cannot build (another checkpoint directory, a Modifier
file). A method without them fails ``test_every_method_declares_matrix_parameters``.

KV-cache methods (``full_attention_only``) compress full-attention layers only and leave sliding-window
layers to the model's window (fidbench/methods/_kv.py): on gemma3_text they act on its full-attention
layer, and a model whose every layer slides (the tiny mistral) is refused with an error naming the
method and the family.
"""

import functools
import textwrap

import pytest
import torch
from helpers import FAMILIES, ROOT, WINDOW, calibration, reference, tiny_model

from fidbench import attention, engine
from fidbench.methods import REGISTRY, build

SLIDING = ("gemma3_text", "mistral")
# Degenerate parameters must give origin's logits to fp32 round-off. Bit-identical is not always
# possible: where the model hands SDPA no mask (its is_causal fast path, e.g. one-token decode steps
# on full-attention layers), a method passing an all-True mask selects another SDPA kernel, whose
# summation order moves logits by ~1e-7 (measured 1.5e-7 on these models).
ATOL = 1e-5


def _spec(method: str) -> dict:
    spec = REGISTRY[method].test_params
    if not spec or not ({"degenerate", "real"} <= set(spec) or "covered_by" in spec):
        pytest.fail(
            f"method {method!r} declares no test_params: give its class degenerate parameters (equal origin) "
            f"and real parameters (change the logits), see fidbench/methods/base.py", pytrace=False,
        )
    return spec


@functools.cache
def _model_and_reference(family: str):
    model = tiny_model(family)
    prompt = torch.randint(0, 283, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    return model, reference(model, prompt)  # 40 + 24 tokens: longer than the sliding window


def _force(model, method, ref, mode=None):
    mode = mode or engine.resolve_mode(method, "auto")
    with method.apply(model, calibration()) as m:  # calibration prompts for gptq / wanda
        return engine.teacher_force(m, method, ref.p_ids, ref.g_ids, mode).logits


def _run_or_refusal(method_name: str, family: str, params: dict, mode=None):
    """The method's logits on ``family``, or None after checking the refusal names method and family."""
    model, ref = _model_and_reference(family)
    method = build(method_name, params)
    if not method.runs_on(model.config):  # KV methods on a model whose every layer slides
        with pytest.raises(ValueError) as e:
            _force(model, method, ref, mode)
        assert f"method {method_name!r} cannot run on {family}" in str(e.value), f"unclear refusal: {e.value}"
        return None, method
    return _force(model, method, ref, mode), method


def test_every_method_declares_matrix_parameters():
    for method in REGISTRY:
        spec = _spec(method)
        for kind in ("degenerate", "real"):
            if kind in spec and spec[kind] is None:
                assert spec.get("why") or method == "origin", f"{method}: {kind} is None without a why"


def _cases(kind: str):
    """(method, family) pairs of the matrix with ``kind`` parameters; methods without an entry are kept so that they
    fail."""
    names = [m for m in sorted(REGISTRY)
             if REGISTRY[m].test_params.get(kind, {}) is not None and "covered_by" not in REGISTRY[m].test_params]
    return [pytest.param(m, f, id=f"{m}-{f}") for m in names for f in sorted(FAMILIES)]


def check_degenerate(method: str, family: str) -> None:
    """The method's degenerate parameters give origin's logits on ``family`` (or its documented refusal)."""
    logits, m = _run_or_refusal(method, family, _spec(method)["degenerate"])
    if logits is None:
        return
    model, ref = _model_and_reference(family)
    base = _force(model, build("origin", {}), ref, engine.resolve_mode(m, "auto"))
    assert torch.equal(logits.argmax(-1), base.argmax(-1))
    torch.testing.assert_close(logits, base, atol=ATOL, rtol=0)


def check_real(method: str, family: str) -> dict:
    """The method's real parameters change the logits on ``family``, report what they kept, and (when the
    method claims it) give the same logits in parallel as stepwise. Returns what it measured."""
    logits, m = _run_or_refusal(method, family, _spec(method)["real"])
    if logits is None:
        return {}
    model, ref = _model_and_reference(family)
    base = _force(model, build("origin", {}), ref)
    assert logits.shape == base.shape and torch.isfinite(logits).all()
    change = (logits - base).abs().max().item()
    assert change > 1e-3, f"{method} {_spec(method)['real']} left {family}'s logits unchanged (max |Δ| {change:.2g})"
    kept = m.kept()
    assert kept, f"{method} on {family}: kept() reports nothing; record() what it keeps or override kept()"
    if m.parallel_exact:  # the claim that lets the engine run it in one forward
        step = _force(model, build(method, _spec(method)["real"]), ref, "stepwise")
        assert torch.equal(step.argmax(-1), logits.argmax(-1))
        # A low-precision kernel turns the model's own summation-order differences into whole rounding steps
        # now and then (tests/test_lowbit_attention.py checks it call by call, to 1e-6).
        tol = 1e-3 if m.role == "kernel" else 1e-4
        torch.testing.assert_close(step, logits, atol=tol, rtol=1e-4)
    return {"kept": kept, "max_abs_logit_change": change}


@pytest.mark.parametrize("method, family", _cases("degenerate"))
def test_degenerate_parameters_equal_origin(method, family):
    check_degenerate(method, family)


@pytest.mark.parametrize("method, family", _cases("real"))
def test_real_parameters_change_logits_and_report_what_they_kept(method, family, record_property):
    for name, value in check_real(method, family).items():
        record_property(name, value)


def test_readme_example_method_passes_the_matrix_unchanged():
    """The README's "Adding a method" example, exactly as printed, on every family."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adding a method"):]
    code = section[section.index("```python") + len("```python"):]
    code = textwrap.dedent(code[: code.index("```")])
    before = set(REGISTRY)
    try:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
        (name,) = set(REGISTRY) - before
        for family in sorted(FAMILIES):
            check_degenerate(name, family)
            check_real(name, family)
    finally:
        for added in set(REGISTRY) - before:  # registered for this test only
            del REGISTRY[added]


# `is True`: a stack's property decides per instance, from its members (tests/test_stack.py)
KV = sorted(m for m, cls in REGISTRY.items() if cls.full_attention_only is True)


@pytest.mark.parametrize("method", KV)
def test_kv_methods_leave_sliding_layers_to_the_window(method, monkeypatch):
    """On gemma3_text (layer 0 sliding, layer 1 full) a KV method hands every sliding-layer call back to
    the model's attention and compresses the full-attention layer."""
    model, ref = _model_and_reference("gemma3_text")
    m = build(method, _spec(method)["real"])
    results = []  # (sliding?, phase, method's output is None)
    real_attend = type(m).attend

    def attend(self, call):
        out = real_attend(self, call)
        results.append((call.sliding_window is not None, call.phase.name, out is None))
        return out

    monkeypatch.setattr(type(m), "attend", attend)
    _force(model, m, ref)
    sliding = [r for r in results if r[0]]
    full_decode = [r for r in results if not r[0] and r[1] == "decode"]
    assert sliding and all(untouched for *_, untouched in sliding)
    assert full_decode and not all(untouched for *_, untouched in full_decode)
    kept = m.kept()
    if "kv_fraction_per_layer" in kept:  # eviction: the sliding layer attends all its window shows
        assert kept["kv_fraction_per_layer"][0] == 1.0 and kept["kv_fraction_per_layer"][1] < 1.0
    else:  # kivi: the sliding layer's entries count as visible and unquantized
        assert 0 < kept["kv_quantized"] < 1


@pytest.mark.parametrize("method", KV)
def test_kv_methods_refuse_models_whose_every_layer_slides(method):
    model, ref = _model_and_reference("mistral")
    assert set(attention.layer_kinds(model.config)) == {"sliding_attention"}
    with pytest.raises(ValueError, match=f"method '{method}' cannot run on mistral: every attention layer"):
        _force(model, build(method, _spec(method)["degenerate"]), ref)
    # The same family without a window runs.
    wide = tiny_model("mistral", sliding_window=None)
    assert torch.isfinite(_force(wide, build(method, _spec(method)["real"]), ref)).all()


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


PAD = 10  # left padding of the shorter row


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_padding_stays_masked_under_fidbench_attention(family):
    """A left-padded batch through a method's hook gives each row what the row alone gives: the hook
    sees the model's padding mask (and, on gemma3/mistral, its window) and never attends to padding."""
    model, _ = _model_and_reference(family)
    g = torch.Generator().manual_seed(5)
    short, long = (torch.randint(3, 283, (n,), generator=g) for n in (24, 24 + PAD))
    pad = PAD
    ids = torch.cat([torch.zeros(pad, dtype=torch.long), short])[None].repeat(2, 1)
    ids[1] = long
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # RoPE positions of the real tokens start at 0
    method = Padded(keep=0.3, min_keep=2)
    method.begin(0)
    with method.apply(model), torch.no_grad(), attention.running(method, attention.Phase("decode", 0)):
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        alone = model(input_ids=short[None]).logits
    assert method.rows_checked > 0
    torch.testing.assert_close(batched[0, pad:], alone[0], atol=1e-4, rtol=1e-4)


class Padded(REGISTRY["topk"]):
    """topk (a real selection: 30 % of the keys) that checks the padded row's queries see no padding key."""

    def begin(self, prompt_len):
        self.rows_checked = 0

    def attend(self, call):
        visible = call.visible()
        if visible.shape[0] == 2:  # the padded batch, not the row alone
            real = visible[0, :, PAD:]  # queries of real tokens in the padded row
            assert not real[..., :PAD].any(), "a real token's query may see padding"
            assert real.any(-1).all()
            self.rows_checked += 1
        return super().attend(call)
