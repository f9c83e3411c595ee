"""The pytest plugin: options, one parametrized case per model × method variant, the score report.

pytest-benchmark keeps its numbers only in its own JSON and switches itself off under xdist, so
fidbench carries each case's record to the controller in ``user_properties`` and writes its own
report there, rewritten after every case so an interrupted run keeps what it measured.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from . import report
from .engine import MODES
from .harness import Bench
from .methods import build
from .models import model_type
from .suite import SuiteError, load

_suite_key = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("fidbench", "fidbench: fidelity of compressed LLMs")
    group.addoption("--fidbench-config", metavar="PATH", help="suite YAML file (default: fidbench.yaml in the rootdir)")
    group.addoption("--fidbench-limit", type=int, metavar="N", help="score only the first N prompts of each dataset")
    group.addoption("--fidbench-max-new-tokens", type=int, metavar="N", help="reference length (default: the suite's, 64)")
    group.addoption("--fidbench-decode", choices=MODES, help="teacher forcing: parallel, stepwise, or auto (per method)")
    group.addoption("--fidbench-report", metavar="PATH", help="write fidbench's JSON report (scores, timing, samples)")
    group.addoption("--fidbench-batch-size", type=int, default=1, metavar="N",
                    help="generate base references N prompts at a time (default 1; >1 keeps its own references)")
    group.addoption("--fidbench-quiet", action="store_true", help="no progress bars")


def pytest_configure(config):
    config.addinivalue_line("markers", "fidbench: a fidelity case (model × method variant)")
    if not hasattr(config, "workerinput"):  # xdist workers send their records to the controller
        config.pluginmanager.register(Reporter(config), "fidbench-reporter")


def _suite(config):
    if _suite_key not in config.stash:
        path = config.getoption("fidbench_config") or Path(config.rootpath) / "fidbench.yaml"
        limit = config.getoption("fidbench_limit")
        if limit is not None and limit < 1:
            raise pytest.UsageError("--fidbench-limit must be a positive integer")
        if config.getoption("fidbench_batch_size") < 1:
            raise pytest.UsageError("--fidbench-batch-size must be a positive integer")
        try:
            suite, error = load(path), None
        except SuiteError as e:
            error = str(e)
        if error:  # a collection error with the message alone, no traceback
            pytest.fail(f"fidbench: {error}", pytrace=False)
        config.stash[_suite_key] = suite
    return config.stash[_suite_key]


def _mark(config, name: str):
    config.addinivalue_line("markers", f"{name}: fidbench model family, method or variant tag")
    return getattr(pytest.mark, name)


def pytest_generate_tests(metafunc):
    if "fidbench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    suite = _suite(config)
    types = {}
    params = []
    for case in suite.cases():
        if case.model.name not in types:
            try:
                types[case.model.name], error = model_type(case.model.path), None
            except (OSError, ValueError) as e:
                error = f"fidbench: {suite.path}: models.{case.model.name}: {e}"
            if error:
                pytest.fail(error, pytrace=False)
        marks = [pytest.mark.fidbench, _mark(config, types[case.model.name]), _mark(config, case.variant.method),
                 *(_mark(config, tag) for tag in case.variant.tags)]
        params.append(pytest.param(case, id=case.id, marks=marks))
    metafunc.parametrize("fidbench_case", params)


@pytest.fixture(scope="session")
def fidbench_bench(request):
    """Per-process harness state: the suite, and the model currently loaded with its references."""
    config = request.config
    return Bench(
        _suite(config),
        limit=config.getoption("fidbench_limit"),
        max_new_tokens=config.getoption("fidbench_max_new_tokens"),
        decode=config.getoption("fidbench_decode"),
        progress=not config.getoption("fidbench_quiet"),
        batch_size=config.getoption("fidbench_batch_size"),
    )


@pytest.fixture
def fidbench_model(fidbench_case, fidbench_bench):
    """The case's model with its prompts and references, loaded once per model per worker."""
    return fidbench_bench.load(fidbench_case.model)


@pytest.fixture
def fidbench_method(fidbench_case):
    return build(fidbench_case.variant.method, fidbench_case.variant.params)


@pytest.fixture
def fidbench_record(request):
    """Call with a case record to send it to the report (on the controller, also under xdist)."""
    return lambda record: request.node.user_properties.append(("fidbench", record))


def _workers(config) -> int:
    """Processes that run cases at once: pytest-xdist's workers (each sees PYTEST_XDIST_WORKER_COUNT), else 1."""
    if config.getoption("dist", "no") != "no" and config.getoption("tx", None):
        return len(config.getoption("tx"))
    return 1


class Reporter:
    """Collects case records on the controller into the report; prints the table at the end."""

    def __init__(self, config):
        self.config = config
        self._report = None
        # at session start: the code that ran, not the tree at the end
        self.environment = report.environment(workers=_workers(config))

    @property
    def report(self) -> report.Report:
        if self._report is None:  # the suite is read on first use, after pytest has parsed the options
            opt, suite = self.config.getoption, _suite(self.config)
            settings = {
                "suite": str(suite.path),
                "limit": opt("fidbench_limit"),
                "max_new_tokens": opt("fidbench_max_new_tokens") or suite.max_new_tokens,
                "decode": opt("fidbench_decode") or suite.decode,
                "batch_size": opt("fidbench_batch_size"),
            }
            self._report = report.Report(opt("fidbench_report"), settings, [c.id for c in suite.cases()], self.environment)
        return self._report

    def pytest_runtest_logreport(self, report):
        if report.when != "call":
            return
        for name, value in report.user_properties:
            if name == "fidbench":
                self.report.add(value)

    def pytest_terminal_summary(self, terminalreporter):
        records = self.report.ordered() if self._report is not None else []
        if records:
            terminalreporter.write_sep("=", "fidbench results")
            terminalreporter.write_line(report.table(records))
            if self.config.getoption("fidbench_report"):
                terminalreporter.write_line(f"fidbench report: {self.config.getoption('fidbench_report')}")
