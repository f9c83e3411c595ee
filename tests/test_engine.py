"""Engine equivalences on tiny random models: origin reproduces the reference, parallel == stepwise."""

import torch
from helpers import reference

from fidbench import engine, metrics
from fidbench.methods import build


def scores(model, method, ref, mode):
    forced = engine.teacher_force(model, method, ref.p_ids, ref.g_ids, mode)
    return forced, metrics.score(forced.logits, ref)


def test_origin_stepwise_reproduces_reference_exactly(tiny, prompt):
    ref = reference(tiny, prompt)
    forced, s = scores(tiny, build("origin", {}), ref, "stepwise")
    summary = s.summary()
    assert summary["acc1"] == 1.0 and summary["first_divergence"] == len(ref.g_ids)
    assert summary["kl_max"] == 0.0  # the very same computation as the greedy generation
    assert summary["nll"] == summary["nll_base"]


def test_parallel_agrees_with_stepwise(tiny, prompt):
    ref = reference(tiny, prompt, n=48)
    origin = build("origin", {})
    par, s_par = scores(tiny, origin, ref, "parallel")
    step, _ = scores(tiny, origin, ref, "stepwise")
    assert par.logits.shape == step.logits.shape == (48, tiny.config.vocab_size)
    agree = (par.logits.argmax(-1) == step.logits.argmax(-1)).double().mean().item()
    assert agree >= 0.995
    # fp32: one N-token forward and N one-token forwards differ only by summation order.
    torch.testing.assert_close(par.logits, step.logits, atol=1e-4, rtol=1e-4)
    assert s_par.summary()["kl_mean"] < 1e-6


def test_first_logit_comes_from_prefill(tiny, prompt):
    ref = reference(tiny, prompt, n=5)
    forced = engine.teacher_force(tiny, build("origin", {}), ref.p_ids, ref.g_ids, "parallel")
    full = tiny(torch.tensor([prompt + ref.g_ids[:-1]])).logits[0, len(prompt) - 1 :]
    torch.testing.assert_close(forced.logits, full, atol=1e-4, rtol=1e-4)
    assert forced.prefill_s > 0 and forced.decode_s > 0


def test_parallel_refused_for_methods_not_exact_in_parallel():
    method = build("origin", {})
    type(method).parallel_exact = False
    try:
        assert engine.resolve_mode(method, "auto") == "stepwise"
        try:
            engine.resolve_mode(method, "parallel")
        except ValueError as e:
            assert "not exact under parallel" in str(e)
        else:
            raise AssertionError("parallel mode was accepted")
    finally:
        type(method).parallel_exact = True
    assert engine.resolve_mode(method, "auto") == "parallel"
