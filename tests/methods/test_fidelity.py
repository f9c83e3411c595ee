"""The fidelity suite: one case per model × method variant of the suite file (see fidbench.yaml).

Select with -k by model family and method: ``pytest tests/methods -k "llama and topk"``.
"""

import pytest

SCALARS = ("acc1", "acc5", "kl_mean", "kl_p99", "nll", "nll_ratio", "first_divergence", "exact_match")


def test_fidelity(fidbench_case, fidbench_model, fidbench_method, fidbench_bench, fidbench_record, benchmark):
    record = benchmark.pedantic(fidbench_bench.run, args=(fidbench_case, fidbench_method), rounds=1, iterations=1)
    benchmark.extra_info.update(record["timing"])
    benchmark.extra_info.update({k: record["scores"][k] for k in SCALARS})
    benchmark.extra_info["kept"] = record["kept"]
    fidbench_record(record)
    if record["failures"]:
        pytest.fail(f"{fidbench_case.id}: " + "; ".join(record["failures"]), pytrace=False)
