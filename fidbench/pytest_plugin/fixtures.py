"""The fixtures the fidelity test (``fidbench.cases.test_fidelity``) takes: the harness, the case's model,
method, record sender and timer."""

from __future__ import annotations

import pytest

from .. import cases, report
from ..harness import Bench, SetupError
from ..methods import build
from . import collection, junit, suite_file
from .reporter import RECORD

# What a model's setup raises for a bad model, tokenizer, device or dataset: a one-line error, no traceback.
SETUP_ERRORS = (OSError, ValueError, RuntimeError, AssertionError, ImportError)


@pytest.fixture(scope="session")
def fidbench_bench(request):
    """Per-process harness state: the suite, and the model currently loaded with its references."""
    config = request.config
    progress = config.pluginmanager.get_plugin("fidbench-progress")
    return Bench(
        suite_file.get_or_fail(config),
        limit=config.getoption("fidbench_limit"),
        max_new_tokens=config.getoption("fidbench_max_new_tokens"),
        decode=config.getoption("fidbench_decode"),
        progress=None if config.getoption("fidbench_quiet") else progress,
        batch_size=config.getoption("fidbench_batch_size"),
        worker=progress.worker,  # gw0, gw1, ... in an xdist worker
        devices=config.getoption("fidbench_devices"),
        free_run=config.getoption("fidbench_free_run"),
    )


@pytest.fixture
def fidbench_model(request, fidbench_case, fidbench_bench):
    """The case's model with its prompts and references, loaded once per model per worker.

    A model that cannot be set up fails its first case with the reason, and its other cases at once
    with a line that points there (never a reload and a traceback per case); one whose type could not be
    read at collection (a missing directory) errors each of its cases with that reason."""
    model = fidbench_case.model
    if model.name in request.config.stash.get(collection.MODEL_ERRORS, {}):
        pytest.fail(request.config.stash[collection.MODEL_ERRORS][model.name], pytrace=False)
    try:
        return fidbench_bench.load(model, fidbench_case.id)
    except SetupError as e:
        pytest.fail(f"fidbench: {e}", pytrace=False)
    except SETUP_ERRORS as e:
        pytest.fail(f"fidbench: {fidbench_bench.suite.path}: models.{model.name} could not be set up: "
                    f"{type(e).__name__}: {e}", pytrace=False)


@pytest.fixture
def fidbench_method(fidbench_case):
    return build(fidbench_case.variant.method, fidbench_case.variant.params)


@pytest.fixture
def fidbench_record(request):
    """Call with a case record to send it to the report (on the controller, also under xdist) and its figures
    to the item's properties."""
    def send(record):
        request.node.user_properties.append((RECORD, record))
        request.node.user_properties.extend(junit.properties(report.finite(record)))
    return send


@pytest.fixture
def fidbench_timer(request):
    """A ``cases.DecodeTimer`` on pytest-benchmark's fixture while it times this session, else None: under
    ``--benchmark-skip`` or ``--benchmark-disable``, under xdist (where pytest-benchmark is off), or without
    pytest-benchmark, fidelity cases still run and gate, untimed. pytest-benchmark's fixture is requested by
    name only when timing is on, because it skips every test that lists ``benchmark`` among its fixtures."""
    config = request.config
    if not config.pluginmanager.has_plugin("benchmark"):
        return None
    if config.getoption("benchmark_skip") and not config.getoption("benchmark_only"):
        return None
    benchmark = request.getfixturevalue("benchmark")
    if not benchmark.enabled:
        benchmark.pedantic(lambda: None)  # disabled, it runs this once: the fixture counts as used, nothing is timed
        return None
    return cases.DecodeTimer(benchmark, config.getoption("benchmark_min_rounds"))
