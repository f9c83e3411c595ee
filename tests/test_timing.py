"""pytest-benchmark's figure of a case: seconds per decode token over repeated rounds of a fixed prompt, so that
--benchmark-compare-fail can gate on it. Speed is planted here, never measured: pytest-benchmark reads a planted
clock (``--benchmark-timer helpers.planted_clock``) that every forward of the model advances by a planted time, so
a busy machine cannot change a figure; a short real sleep per forward keeps fidbench's own wall-clock figures above
a bound that load can only raise."""

import json
import time

import helpers
import pytest
from helpers import ROOT, save_tiny
from transformers import LlamaForCausalLM

from fidbench import engine

SUITE = f"""
generation: {{max_new_tokens: 4}}
models:
  tiny: {{path: tiny, max_length: 256}}
datasets:
  chat: chat.jsonl
methods:
  topk: {{keep: 0.5, min_keep: 2}}
  legacy-origin: {{method: legacy, module: {ROOT / "tests" / "legacy_modifier.py"}, cls: Origin}}
"""


@pytest.fixture
def project(pytester, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FIDBENCH_CACHE", str(pytester.path / "cache"))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # else pytest-benchmark, seeing xdist, switches itself off
    save_tiny(pytester.path / "tiny", "llama")
    (pytester.path / "chat.jsonl").write_text((ROOT / "data" / "chat.jsonl").read_text().splitlines()[0] + "\n")
    (pytester.path / "suite.yaml").write_text(SUITE)
    return pytester


# Planted seconds per forward on the planted clock: exact, whatever the machine's load.
BASE_S, SLOW_S, FAIL = 0.1, 0.6, "median:150%"
REAL_S = 0.005  # real seconds per forward: a lower bound of fidbench's own (wall-clock) prefill figure
TIMER = ("--benchmark-timer", "helpers.planted_clock")


def plant(monkeypatch, seconds: float) -> None:
    """Every forward of the tiny model (prefill, decode step, a legacy Modifier's own calls) advances the planted
    clock by ``seconds`` and takes ``REAL_S`` of real time."""
    real = LlamaForCausalLM.forward

    def slow(self, *args, **kwargs):
        time.sleep(REAL_S)
        helpers.PLANTED[0] += seconds
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", slow)


def test_the_benchmark_is_decode_time_per_token_and_gates_a_planted_slowdown(project, monkeypatch):
    args = ("suite.yaml", "--fidbench-quiet", "-p", "no:cacheprovider", *TIMER)
    with monkeypatch.context() as m:
        plant(m, BASE_S)
        project.runpytest(*args, "--benchmark-save", "base").assert_outcomes(passed=2)
    saved = next((project.path / ".benchmarks").glob("*/0001_base.json"))
    runs = {b["name"]: b for b in json.loads(saved.read_text())["benchmarks"]}
    topk, legacy = runs["test_fidelity[tiny-topk]"], runs["test_fidelity[tiny-legacy-origin]"]
    extra, stats = topk["extra_info"], topk["stats"]
    # 5 rounds (--benchmark-min-rounds) of the reference's 4 tokens, one forward each: stats per token
    assert stats["rounds"] == 5 and stats["iterations"] == extra["timed_decode_tokens"] == 4
    assert stats["min"] == pytest.approx(BASE_S) == stats["max"] and extra["timed_unit"] == "s per decode token"
    assert extra["decode_ms_per_token"] == stats["median"] * 1e3
    assert extra["prefill_ms_per_1k_tokens"] >= REAL_S * 1e6 / extra["timed_prompt_tokens"]
    assert {"acc1", "kl_mean", "prefill_s", "decode_s"} <= set(extra)
    assert legacy["extra_info"]["timed_unit"] == "s per sample" and legacy["stats"]["rounds"] == 5
    assert legacy["stats"]["min"] > 0
    compare = ("--benchmark-compare", "0001", "--benchmark-compare-fail", FAIL)
    with monkeypatch.context() as m:  # 6 times slower per forward: the compare fails the session
        plant(m, SLOW_S)
        result = project.runpytest(*args, *compare)
    assert result.ret != pytest.ExitCode.OK  # pytest-benchmark says so on stderr (with a traceback of its own)
    result.stderr.fnmatch_lines(["Performance has regressed:",
                                 "*test_fidelity[[]tiny-topk[]] (0001_base) - Field 'median' has failed*"])
    with monkeypatch.context() as m:  # the same speed again: it passes
        plant(m, BASE_S)
        project.runpytest(*args, *compare).assert_outcomes(passed=2)


def test_no_timing_rounds_when_pytest_benchmark_is_off(project, monkeypatch):
    calls = []
    real = engine.Stepper.step
    monkeypatch.setattr(engine.Stepper, "step", lambda self: calls.append(1) or real(self))
    result = project.runpytest("suite.yaml", "--fidbench-quiet", "--benchmark-disable",
                               # pytest-benchmark's own warning only: an in-process run under the `pytest` script
                               # also warns that fidbench, imported by the outer session, cannot be rewritten
                               "-W", "error::pytest_benchmark.logger.PytestBenchmarkWarning")
    result.assert_outcomes(passed=2)
    assert calls == [] and "not used at all" not in result.stdout.str()
