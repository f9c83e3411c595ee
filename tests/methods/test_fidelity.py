"""The fidelity suite: one case per model × method variant of the suite file (see fidbench.yaml).

Select with -k by model family and method: ``pytest tests/methods -k "llama and topk"``.
"""

import pytest

from fidbench.report import finite

SCALARS = ("acc1", "acc5", "kl_mean", "kl_p99", "nll", "nll_ratio", "first_divergence", "exact_match")


def test_fidelity(fidbench_case, fidbench_model, fidbench_method, fidbench_bench, fidbench_record, fidbench_benchmark):
    # Timed by pytest-benchmark when it is on; untimed under --benchmark-skip, gated either way.
    if fidbench_benchmark is None:
        record = fidbench_bench.run(fidbench_case, fidbench_method)
    else:
        record = fidbench_benchmark.pedantic(fidbench_bench.run, args=(fidbench_case, fidbench_method), rounds=1, iterations=1)
    fidbench_record(record)  # first: the report keeps the case whatever happens next
    if fidbench_benchmark is not None:
        fidbench_benchmark.extra_info.update(record["timing"])
        fidbench_benchmark.extra_info.update({k: finite(record["scores"].get(k)) for k in SCALARS})  # None: not measured or not finite
        fidbench_benchmark.extra_info["kept"] = record["kept"]
    if record["failures"]:
        pytest.fail(f"{fidbench_case.id}: " + "; ".join(record["failures"]), pytrace=False)
