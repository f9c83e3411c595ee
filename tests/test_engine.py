"""Engine equivalences on tiny random models: origin reproduces the reference, parallel == stepwise."""

import pytest
import torch
from helpers import random_ids, reference

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["parallel", "stepwise"])
def test_logits_are_bitwise_the_model_calls_the_engine_makes(tiny, prompt, dtype, mode):
    """The engine adds no arithmetic: its logits are exactly a prefill's last position, then one decode
    forward (parallel) or one forward per token (stepwise), in float32; so are the scores."""
    model = tiny.to(dtype)
    g_ids = random_ids(12, seed=3, high=283)
    with torch.inference_mode():
        logits, cache = engine.call_model(model, None, input_ids=torch.tensor([prompt]), logits_to_keep=1)
        rows = [logits[0].float()]
        steps = [g_ids[:-1]] if mode == "parallel" else [[t] for t in g_ids[:-1]]
        for ids in steps:
            logits, cache = engine.call_model(model, cache, input_ids=torch.tensor([ids]))
            rows.append(logits[0].float())
    expected = torch.cat(rows)
    forced = engine.teacher_force(model, build("origin", {}), prompt, g_ids, mode)
    assert torch.equal(forced.logits, expected)
    ref = reference(model, prompt, n=12)
    a, b = metrics.score(forced.logits, ref).summary(), metrics.score(expected, ref).summary()
    assert a == b


class FakeEvent:
    """A CUDA event stand-in: the time it was recorded at, and whether anything waited for it."""

    now = 0.0

    def __init__(self, enable_timing):
        assert enable_timing
        self.at = self.waited = None

    def record(self, stream):
        FakeEvent.now += 0.25
        self.at = FakeEvent.now

    def synchronize(self):
        self.waited = True

    def elapsed_time(self, end):  # milliseconds, like torch.cuda.Event
        return 1e3 * (end.at - self.at)


def test_gpu_phases_are_timed_with_events_read_once_after_the_sample(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda *a: pytest.fail("the host waited for the GPU inside a sample"))
    clock = engine.Clock(torch.device("cuda"))
    for _ in range(3):
        clock.mark()
    assert not any(e.waited for e in clock.marks)
    forced = engine.Forced(torch.zeros(2, 3), clock)
    assert (forced.prefill_s, forced.decode_s) == (0.25, 0.25)
    assert clock.marks[-1].waited


def test_warm_up_shapes_runs_each_distinct_prompt_and_reference_length_once(tiny):
    samples = [reference(tiny, random_ids(p, seed), n) for p, n, seed in [(5, 3, 1), (7, 1, 2), (5, 3, 3), (5, 4, 4)]]
    calls = []
    tiny.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                   with_kwargs=True)
    engine.warm_up_shapes(tiny, samples)
    assert calls == [5, 2, 7, 5, 3]  # (5, 3) once; a one-token reference needs no decode
    assert engine.plans_per_shape(torch.device("cuda")) and not engine.plans_per_shape(torch.device("cpu"))


def test_warm_up_runs_a_prefill_a_decode_and_a_step(tiny):
    calls = []
    tiny.register_forward_pre_hook(lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                   with_kwargs=True)
    engine.warm_up(tiny)
    assert calls == [engine.WARM_UP_TOKENS, 4, 1]
