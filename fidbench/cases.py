"""The fidelity test: one function, parametrized by the plugin with one case per model × method variant.

It lives in the installed package, so a suite file the plugin collects (``pytest my-suite.yaml`` in any
project) and this project's ``tests/methods/test_fidelity.py`` (which re-exports it) run the same code.
Select with -k or -m by model family and method: ``pytest my-suite.yaml -k "llama and topk"``.
"""

from __future__ import annotations

import statistics

import pytest

from .engine import Stepper
from .metric_table import names
from .report import finite

SCALARS = names(junit=True)  # the scores a case carries as JUnit properties and pytest-benchmark extra_info
TIMED_TOKENS = 16  # decode steps per timing round


def test_fidelity(fidbench_case, fidbench_model, fidbench_method, fidbench_bench, fidbench_record, fidbench_timer):
    # Gated always; timed by pytest-benchmark when it is on, apart from the evaluation (see DecodeTimer).
    record = fidbench_bench.run(fidbench_case, fidbench_method, fidbench_timer)
    fidbench_record(record)  # first: the report keeps the case whatever happens next
    if fidbench_timer is not None:
        extra = fidbench_timer.benchmark.extra_info
        extra.update({k: v for k, v in record["timing"].items() if k != "timed"})
        extra.update(record["timing"].get("timed") or {})
        extra.update({k: finite(record["scores"].get(k)) for k in SCALARS})  # None: not measured or not finite
        extra["kept"] = record["kept"]
    if record["failures"]:
        pytest.fail(f"{fidbench_case.id}: " + "; ".join(record["failures"]), pytrace=False)


class DecodeTimer:
    """A case's pytest-benchmark measurement: seconds per decode token, decoding one token per forward as a
    deployment does, over the first scored prompt of the suite and up to ``TIMED_TOKENS`` tokens of its
    reference, for ``rounds`` rounds after one warm-up. Each round starts from a fresh prefill, timed apart
    (``prefill_ms_per_1k_tokens``, the median over rounds): a live one, or with a shared base prefill
    (``timed_prefill: replayed``) the method's own work on the recorded calls, without the model's forward.
    A legacy method with its own loop is timed per sample instead. The figures are the method as fidbench
    runs it: a masked or fake-quantized method pays for the full computation plus its own, not its
    deployment speed."""

    def __init__(self, benchmark, rounds: int):
        self.benchmark, self.rounds = benchmark, rounds

    def __call__(self, model, method, ref, recorded=None) -> dict:
        if method.kind == "own_loop":
            self.benchmark.pedantic(method.score_sample, args=(model, ref), rounds=self.rounds, warmup_rounds=1)
            return {"timed_unit": "s per sample", "timed_rounds": self.rounds}
        tokens = min(TIMED_TOKENS, len(ref.g_ids))
        stepper = Stepper(model, method, ref.p_ids, ref.g_ids[:tokens], recorded)
        prefills: list[float] = []

        def restart():  # after every round, untimed: the next round decodes from a fresh prefill
            prefills.append(stepper.prefill())

        restart()
        # iterations=tokens: pytest-benchmark divides each round's time by it, so its stats are per token.
        self.benchmark.pedantic(stepper.step, iterations=tokens, rounds=self.rounds, warmup_rounds=1, teardown=restart)
        return {
            "timed_unit": "s per decode token",
            "timed_rounds": self.rounds,
            "timed_prompt_tokens": len(ref.p_ids),
            "timed_decode_tokens": tokens,
            "prefill_ms_per_1k_tokens": statistics.median(prefills[1:]) * 1e6 / len(ref.p_ids),  # [0]: cold
            "timed_prefill": "replayed" if recorded is not None else "live",
            "decode_ms_per_token": self.benchmark.stats["median"] * 1e3,
        }
