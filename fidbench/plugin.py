"""The pytest plugin: options, one parametrized case per model × method variant, the score report.

pytest-benchmark keeps its numbers only in its own JSON and switches itself off under xdist, so
fidbench carries each case's record to the controller in ``user_properties`` and writes its own
report there, rewritten after every case so an interrupted run keeps what it measured. Every
selected case gets an outcome in it (passed, failed, error, skipped), also one that errored in
setup, raised, or whose xdist worker crashed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from . import report
from .engine import MODES
from .harness import Bench, SetupError
from .methods import build
from .models import model_type
from .reference import lock_timeout
from .suite import Case, SuiteError, load

_suite_key = pytest.StashKey()
CASE = "fidbench_case"  # user property naming an item's case, attached at collection: every phase's report carries it
# What a model's setup raises for a bad model, tokenizer, device or dataset: a one-line error, no traceback.
SETUP_ERRORS = (OSError, ValueError, RuntimeError, AssertionError, ImportError)


def _positive(value: str) -> int:
    """The count options' type: a positive integer, checked when pytest parses the command line."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return n


def pytest_addoption(parser):
    group = parser.getgroup("fidbench", "fidbench: fidelity of compressed LLMs")
    group.addoption("--fidbench-config", metavar="PATH", help="suite YAML file (default: fidbench.yaml in the rootdir)")
    group.addoption("--fidbench-limit", type=_positive, metavar="N", help="score only the first N prompts of each dataset")
    group.addoption("--fidbench-max-new-tokens", type=_positive, metavar="N",
                    help="reference length (default: the suite's, 64)")
    group.addoption("--fidbench-decode", choices=MODES, help="teacher forcing: parallel, stepwise, or auto (per method)")
    group.addoption("--fidbench-report", metavar="PATH", help="write fidbench's JSON report (scores, timing, samples)")
    group.addoption("--fidbench-batch-size", type=_positive, default=1, metavar="N",
                    help="generate base references N prompts at a time (default 1; >1 keeps its own references)")
    group.addoption("--fidbench-quiet", action="store_true", help="no progress bars")


def pytest_configure(config):
    config.addinivalue_line("markers", "fidbench: a fidelity case (model × method variant)")
    try:
        lock_timeout()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if not hasattr(config, "workerinput"):  # xdist workers send their records to the controller
        path = config.getoption("fidbench_report")
        if path:  # before any case runs, not after the first one
            try:
                report.check_writable(path)
            except OSError as e:
                raise pytest.UsageError(f"--fidbench-report {path}: cannot write the report there ({e.strerror or e})") from None
        config.pluginmanager.register(Reporter(config), "fidbench-reporter")


def _suite(config):
    if _suite_key not in config.stash:
        path = config.getoption("fidbench_config") or Path(config.rootpath) / "fidbench.yaml"
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


def _item_case(item) -> Case | None:
    """The fidelity case an item runs (its ``fidbench_case`` parameter), or None for any other test."""
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("fidbench_case") if callspec is not None else None
    return case if isinstance(case, Case) else None


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own
def pytest_collection_modifyitems(config, items):
    for item in items:
        case = _item_case(item)
        if case is not None:
            item.user_properties.append((CASE, case.id))
            # A fidelity case is a benchmark even when it asks for pytest-benchmark's fixture only while timing
            # is on (fidbench_benchmark): --benchmark-only must not skip it as a non-benchmark.
            item.own_markers = [m for m in item.own_markers
                                if not (m.name == "skip" and "--benchmark-only" in str(m.kwargs.get("reason")))]


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
    """The case's model with its prompts and references, loaded once per model per worker.

    A model that cannot be set up fails its first case with the reason, and its other cases at once
    with a line that points there (never a reload and a traceback per case)."""
    model = fidbench_case.model
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
    """Call with a case record to send it to the report (on the controller, also under xdist)."""
    return lambda record: request.node.user_properties.append(("fidbench", record))


@pytest.fixture
def fidbench_benchmark(request):
    """pytest-benchmark's fixture while it times this session, else None: under ``--benchmark-skip`` (or
    without pytest-benchmark) fidelity cases still run and gate, untimed. Requested by name only when timing
    is on, because pytest-benchmark skips every test that lists ``benchmark`` among its fixtures."""
    config = request.config
    if not config.pluginmanager.has_plugin("benchmark"):
        return None
    if config.getoption("benchmark_skip") and not config.getoption("benchmark_only"):
        return None
    return request.getfixturevalue("benchmark")


def _message(rep) -> str | None:
    """The one message of a test report: a skip's reason, an exception's line, a crash's text."""
    longrepr = rep.longrepr
    if longrepr is None:
        return None
    if isinstance(longrepr, tuple):  # a skip: (path, line, reason)
        return longrepr[2].removeprefix("Skipped: ")
    crash = getattr(longrepr, "reprcrash", None)  # pytest.fail's message reads "Failed: <message>"
    return crash.message.removeprefix("Failed: ") if crash is not None else str(longrepr).strip()


def _outcome(rep, recorded: bool) -> tuple[str, str | None] | None:
    """(outcome, error) that a report of one phase gives its case, or None when it changes nothing."""
    if rep.when == "call" and rep.passed:
        return "passed", None
    if rep.skipped:
        return "skipped", _message(rep)
    if rep.failed:  # a failed call that sent its record failed its floors; any other failure is an error
        return ("failed", None) if rep.when == "call" and recorded else ("error", _message(rep))
    return None


def _param_id(nodeid: str) -> str:
    """The parametrize id of a node id: ``case-id`` of ``tests/x.py::test_fidelity[case-id]`` (ids may hold [ ])."""
    return nodeid.rpartition("::")[2].partition("[")[2][:-1]


def _workers(config) -> int:
    """Processes that run cases at once: pytest-xdist's workers (each sees PYTEST_XDIST_WORKER_COUNT), else 1."""
    if config.getoption("dist", "no") != "no" and config.getoption("tx", None):
        return len(config.getoption("tx"))
    return 1


class Reporter:
    """Collects case records and outcomes on the controller into the report; prints the table at the end."""

    def __init__(self, config):
        self.config = config
        self._report = None
        self._cases: dict[str, Case] = {}
        # at session start: the code that ran, not the tree at the end
        self.environment = report.environment(workers=_workers(config))
        self.nodes: dict[str, str] = {}  # node id -> case id, from the reports' user properties
        self.selected: dict[str, str] = {}  # node id -> case id of every selected fidelity case

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
            self._cases = {c.id: c for c in suite.cases()}
            self._report = report.Report(opt("fidbench_report"), settings, list(self._cases), self.environment)
        return self._report

    @property
    def cases(self) -> dict[str, Case]:
        """The suite's cases by id (read with the report)."""
        _ = self.report  # reads the suite
        return self._cases

    def _active(self) -> bool:
        """Whether this session runs fidelity cases (one was seen) or asked for a report: only then is the
        suite read to place what carries no case property (a crashed worker's report, xdist's node ids)."""
        return self._report is not None or bool(self.config.getoption("fidbench_report"))

    def _case(self, rep) -> Case | None:
        """The case a report is about: named by its user property or, for a crashed xdist worker's report
        (which carries none), by its node id: seen before, or read as the parametrize id."""
        for name, value in rep.user_properties:
            if name == CASE:
                self.nodes[rep.nodeid] = value
        case_id = self.nodes.get(rep.nodeid)
        if case_id is None and rep.when == "???" and self._active():
            case_id = self.selected.get(rep.nodeid) or _param_id(rep.nodeid)
        return None if case_id is None else self.cases.get(case_id)

    def pytest_collection_finish(self, session):
        """Without xdist this process collected the items: note the selected cases."""
        for item in session.items:
            self.selected.update((item.nodeid, value) for name, value in item.user_properties if name == CASE)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        """Under xdist the workers collected them: the controller gets node ids, read as parametrize ids."""
        if ids and self._active():  # ids: the workers read the suite, so it loads here too
            self.selected.update((i, _param_id(i)) for i in ids if _param_id(i) in self.cases)

    def pytest_runtest_logreport(self, report):
        case = self._case(report)
        if case is None:
            return
        records = [value for name, value in report.user_properties if name == "fidbench"]
        for record in records:
            self.report.add(record)
        outcome = _outcome(report, bool(records))
        if outcome is not None:
            self.report.settle(case, *outcome)

    def pytest_sessionfinish(self, session):
        """Selected cases that never ran (-x, --maxfail, an interruption) are in the report too."""
        if self.config.option.collectonly:
            return
        for case_id in self.selected.values():
            if case_id in self.cases and case_id not in self.report.records:
                self.report.settle(self.cases[case_id], "skipped", "not run: the session ended before this case")

    def pytest_terminal_summary(self, terminalreporter):
        records = self.report.ordered() if self._report is not None else []
        if records:
            terminalreporter.write_sep("=", "fidbench results")
            terminalreporter.write_line(report.table(records))
            if self.config.getoption("fidbench_report"):
                terminalreporter.write_line(f"fidbench report: {self.config.getoption('fidbench_report')}")
