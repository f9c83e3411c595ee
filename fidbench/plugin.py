"""The pytest plugin: options, one parametrized case per model × method variant, the score report.

The cases come from a suite file: one named as a test path (``pytest my-suite.yaml``, collected here
as the items of ``fidbench.cases``, so any project runs them with the installed package and its suite
file alone), else ``--fidbench-config`` or ``fidbench.yaml`` for a test module that re-exports
``fidbench.cases.test_fidelity`` (this project's tests/methods). ``--fidbench-shard I/N`` keeps a
deterministic share of them; ``device: cuda`` models go to each xdist worker's own GPU.

pytest-benchmark keeps its numbers only in its own JSON and switches itself off under xdist, so
fidbench carries each case's record to the controller in ``user_properties`` and writes its own
report there, rewritten after every case so an interrupted run keeps what it measured. Every
selected case gets an outcome in it (passed, failed, error, skipped), also one that errored in
setup, raised, or whose xdist worker crashed; SIGTERM (what ``timeout`` and CI runners send) stops a
session that writes a report as Ctrl-C does, so the case running then is an error ("interrupted") and
the unrun ones are "not run". Every session writes the report at its end, also one that collected
nothing or failed to collect: a previous run's report is never left behind to be read as this one's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from . import cases, lock, report
from .engine import MODES
from .harness import Bench, SetupError
from .methods import build
from .models import model_type
from .suite import Case, SuiteError, load

_suite_key = pytest.StashKey()
_path_key = pytest.StashKey()
_model_errors_key = pytest.StashKey()  # model name -> why its type could not be read at collection
CASE = "fidbench_case"  # user property naming an item's case, attached at collection: every phase's report carries it
RECORD = "fidbench"  # user property carrying a case's record in its call report only
PROGRESS = "fidbench_progress"  # user property carrying a worker's progress line in one report
TRANSIENT = (RECORD, PROGRESS)  # taken off the item once a report carries them: JUnit XML gets metrics, not blobs
METRICS = (*cases.SCALARS, "prefill_s", "decode_s", "kv_fraction", "prefill_ms_per_1k_tokens", "decode_ms_per_token")
TICK_S = 10.0  # a phase longer than this (a model's references, a case's prompts) says how far it got
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


def _shard(value: str) -> tuple[int, int]:
    """``--fidbench-shard I/N``: shard I (1 to N) of N."""
    i, sep, n = value.partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        sep = ""
    if not sep or not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"must be I/N, shard I of N with 1 <= I <= N, got {value!r}")
    return i, n


def _devices(value: str) -> list[str]:
    """``--fidbench-devices cuda:0,cuda:1``: torch device names."""
    devices = [d.strip() for d in value.split(",")]
    for d in devices:
        try:
            torch.device(d)
        except RuntimeError:
            raise argparse.ArgumentTypeError(f"{d!r} is not a torch device (expected e.g. cuda:0,cuda:1)") from None
    return devices


def pytest_addoption(parser):
    group = parser.getgroup("fidbench", "fidbench: fidelity of compressed LLMs")
    group.addoption("--fidbench-config", metavar="PATH", help="suite YAML file (default: fidbench.yaml in the rootdir)")
    group.addoption("--fidbench-limit", type=_positive, metavar="N",
                    help="score only the first N prompts of each dataset")
    group.addoption("--fidbench-max-new-tokens", type=_positive, metavar="N",
                    help="reference length (default: the suite's, 64)")
    group.addoption("--fidbench-decode", choices=MODES,
                    help="teacher forcing: parallel, stepwise, or auto (per method)")
    group.addoption("--fidbench-report", metavar="PATH", help="write fidbench's JSON report (scores, timing, samples)")
    group.addoption("--fidbench-batch-size", type=_positive, default=1, metavar="N",
                    help="generate base references N prompts at a time (default 1; >1 keeps its own references)")
    group.addoption("--fidbench-free-run", action="store_true",
                    help="every case also lets the method generate on its own and scores that (ROUGE-L, edit "
                         "distance), as variants with free_run: true do; one forward per generated token")
    group.addoption("--fidbench-quiet", action="store_true", help="no progress lines")
    group.addoption("--fidbench-shard", type=_shard, metavar="I/N",
                    help="run shard I of N (1 <= I <= N) of the suite's cases, deselecting the others")
    group.addoption("--fidbench-devices", type=_devices, metavar="DEV,DEV",
                    help="device of xdist worker gwN's 'device: cuda' models: the N-th of the list (wrapping)")


def pytest_configure(config):
    config.addinivalue_line("markers", "fidbench: a fidelity case (model × method variant)")
    try:
        lock.kind(), lock.timeout(), lock.stale_after()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[_path_key] = _suite_path(config)
    _stop_on_sigterm(config)
    config.pluginmanager.register(Progress(config, os.environ.get("PYTEST_XDIST_WORKER")), "fidbench-progress")
    if config.option.markers:  # `pytest --markers` collects nothing: list the suite's markers from here
        with contextlib.suppress(SuiteError, OSError, ValueError):
            for case in _suite_now(config).cases():
                _marks(config, case, model_type(case.model.path))
    if not hasattr(config, "workerinput"):  # xdist workers send their records to the controller
        path = config.getoption("fidbench_report")
        if path:  # before any case runs, not after the first one
            try:
                report.check_writable(path)
            except OSError as e:
                raise pytest.UsageError(f"--fidbench-report {path}: cannot write the report there "
                                        f"({e.strerror or e})") from None
        config.pluginmanager.register(Reporter(config), "fidbench-reporter")


_sigterm_key = pytest.StashKey()


def _stop_on_sigterm(config) -> None:
    """In a session that writes a report, SIGTERM (``timeout``, CI runners cancelling a job, ``kill``) interrupts
    it as Ctrl-C does, in the controller and in each xdist worker (they get the same options), so the report gets
    written; a second SIGTERM kills at once. Other sessions (fidbench is a plugin of every pytest run where it is
    installed) keep SIGTERM's default, and so does one where someone else handles SIGTERM or pytest runs outside
    the main thread."""
    if not config.getoption("fidbench_report") or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return

    def interrupt(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    config.stash[_sigterm_key] = interrupt


def pytest_unconfigure(config):
    if signal.getsignal(signal.SIGTERM) is config.stash.get(_sigterm_key, None):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _looks_like_suite(path: Path) -> bool:
    """A YAML file whose top level names models, methods or datasets (or that does not parse: its error is
    then reported as the suite's)."""
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return True
    return isinstance(data, dict) and bool({"models", "methods", "datasets"} & set(data))


def _named_suites(config) -> list[Path]:
    """Suite files named as test paths on the command line (``pytest my-suite.yaml``)."""
    found = []
    for arg in config.args:
        path = Path(arg.split("::")[0])
        path = (path if path.is_absolute() else Path(config.invocation_params.dir) / path).resolve()
        if path not in found and _looks_like_suite(path):
            found.append(path)
    return found


def _suite_path(config) -> Path:
    """The session's one suite: a suite file named as a test path, else --fidbench-config, else fidbench.yaml."""
    named, option = _named_suites(config), config.getoption("fidbench_config")
    if len(named) > 1:
        raise pytest.UsageError(f"fidbench runs one suite per session; the command line names {len(named)}: "
                                + ", ".join(map(str, named)))
    if named and option and Path(option).resolve() != named[0]:
        raise pytest.UsageError(f"--fidbench-config {option} and the suite file {named[0]} named as a test path "
                                "differ; give one of them")
    return named[0] if named else Path(option) if option else Path(config.rootpath) / "fidbench.yaml"


def _suite_now(config):
    """The suite, read once (``SuiteError`` when it is not valid)."""
    if _suite_key not in config.stash:
        config.stash[_suite_key] = load(config.stash[_path_key])
    return config.stash[_suite_key]


def _suite(config):
    """The suite, or a collection error that says what is wrong with it (no traceback)."""
    try:
        return _suite_now(config)
    except SuiteError as e:
        error = str(e)
    pytest.fail(f"fidbench: {error}", pytrace=False)


class SuiteFile(pytest.Module):
    """A suite file named as a test path, collected as ``fidbench.cases``: its items are the suite's cases."""

    def _getobj(self):
        return cases

    def istestfunction(self, obj, name: str) -> bool:
        return name == "test_fidelity"  # whatever the project's python_functions

    def istestclass(self, obj, name: str) -> bool:
        return False


def pytest_collect_file(file_path: Path, parent):
    if parent.session.isinitpath(file_path) and file_path.resolve() == parent.config.stash[_path_key].resolve():
        return SuiteFile.from_parent(parent, path=file_path)
    return None


def families(model_type: str) -> list[str]:
    """Marker names of a model type: itself, and the family a user would guess (``gemma3_text`` -> ``gemma3``)."""
    family = re.sub(r"_(text|vl)$", "", model_type)
    return [model_type] if family == model_type else [model_type, family]


def _marks(config, case: Case, model_type: str | None) -> list:
    """A case's markers (each registered, so ``pytest --markers`` lists it): fidbench, the model's families,
    the method (a stack's members too) and the variant's tags."""
    names = [(f, "fidbench model family") for f in (families(model_type) if model_type else [])]
    names += [(case.variant.method, "fidbench method"), *((t, "fidbench variant tag") for t in case.variant.tags)]
    if case.variant.method == "stack":  # `-m snapkv` selects the stacks holding it too
        names += [(m["method"], "fidbench method") for m in case.variant.params["members"]
                  if (m["method"], "fidbench method") not in names]
    known = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, what in names:
        if name not in known:
            config.addinivalue_line("markers", f"{name}: {what}")
            known.add(name)
    return [pytest.mark.fidbench, *(getattr(pytest.mark, name) for name, _ in names)]


def pytest_generate_tests(metafunc):
    if "fidbench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    suite = _suite(config)
    types, errors = {}, config.stash.setdefault(_model_errors_key, {})
    params = []
    for case in suite.cases():
        if case.model.name not in types:
            try:
                types[case.model.name] = model_type(case.model.path)
            except (OSError, ValueError) as e:  # its cases error (fidbench_model); the suite's other models run
                types[case.model.name] = None
                errors[case.model.name] = f"fidbench: {suite.path}: models.{case.model.name}: {e}"
        params.append(pytest.param(case, id=case.id, marks=_marks(config, case, types[case.model.name])))
    metafunc.parametrize("fidbench_case", params)


def _item_case(item) -> Case | None:
    """The fidelity case an item runs (its ``fidbench_case`` parameter), or None for any other test."""
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("fidbench_case") if callspec is not None else None
    return case if isinstance(case, Case) else None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: each model's cases go to one worker, which loads the model once; other tests are
    grouped by their ``xdist_group`` marker as xdist does. (xdist groups by a suffix its workers add to node
    ids, which pytest 9.2 no longer lets them set, and which would change the cases' ids.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    try:
        model_of = {case.id: case.model.name for case in _suite_now(config).cases()}
    except SuiteError:
        model_of = {}  # the workers report the suite's error

    class ByModel(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            model = model_of.get(_param_id(nodeid)) if "::test_fidelity[" in nodeid else None
            return f"fidbench model {model}" if model else super()._split_scope(nodeid)

    return ByModel(config, log)


def in_shard(rank: int, shard: tuple[int, int] | None) -> bool:
    """Whether the case at ``rank`` in the suite's order is in ``shard`` (I, N): round-robin, rank mod N = I - 1.

    Round-robin keeps shards even in cost as well as count: a suite lists a method's variants (often
    equally slow, e.g. every stepwise one) next to each other, and these go to different shards. Each shard
    loads each of its models once (cases run in suite order) and the reference cache is shared, so a
    reference is generated once, by whichever shard gets to it first."""
    return shard is None or rank % shard[1] == shard[0] - 1


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own, and after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    shard = config.getoption("fidbench_shard")
    kept, dropped, seen, rank = [], [], set(), None
    for item in items:
        case = _item_case(item)
        if case is None:
            kept.append(item)
            continue
        rank = rank or {c.id: k for k, c in enumerate(_suite(config).cases())}
        if case.id in seen or not in_shard(rank[case.id], shard):  # seen: a suite file and a module both collected it
            dropped.append(item)
            continue
        seen.add(case.id)
        item.user_properties.append((CASE, case.id))
        # A fidelity case is a benchmark even when it asks for pytest-benchmark's fixture only while timing
        # is on (fidbench_timer): --benchmark-only must not skip it as a non-benchmark.
        item.own_markers = [m for m in item.own_markers
                            if not (m.name == "skip" and "--benchmark-only" in str(m.kwargs.get("reason")))]
        kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A record or a progress line goes in the one report it was made for: off the item afterwards."""
    rep = yield
    item.user_properties[:] = [(name, value) for name, value in item.user_properties if name not in TRANSIENT]
    return rep


class Progress:
    """Progress lines of long phases (a model's references, a case's prompts): how far one got every
    ``TICK_S`` while it lasts, and a line when it ends; nothing for shorter phases.

    Outside xdist they go through pytest's terminal reporter (capture suspended), so they show under the
    default capture. An xdist worker's terminal goes nowhere (its stdout is /dev/null) and its reports reach
    the controller only when a phase ends, so a worker writes its ``[gwN]`` lines to its stderr (the
    controller's terminal) and relays each phase's last line in that phase's report, which the controller
    prints through its terminal reporter."""

    def __init__(self, config, worker: str | None):
        self.config, self.worker = config, worker
        self.item = None  # the item running now: a worker's last lines ride on its reports
        self.phases: dict[str, tuple[float, float]] = {}  # what -> (start, last line)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.item = item
        try:
            return (yield)
        finally:
            self.item = None

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done == 0 or what not in self.phases:
            self.phases[what] = (now, now)
            return
        start, last = self.phases[what]
        if done == total:
            del self.phases[what]
            if now - start >= TICK_S:
                self._end(f"fidbench: {what} {done}/{total} in {now - start:.0f} s")
        elif now - last >= TICK_S:
            self.phases[what] = (start, now)
            self._write(f"fidbench: {what} {done}/{total} ({now - start:.0f} s)")

    def _end(self, line: str) -> None:
        if self.worker is not None and self.item is not None:
            self.item.user_properties.append((PROGRESS, f"[{self.worker}] {line}"))
        else:
            self._write(line)

    def _write(self, line: str) -> None:
        capman = self.config.pluginmanager.getplugin("capturemanager")
        terminal = self.config.pluginmanager.getplugin("terminalreporter")
        with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
            if self.worker is None and terminal is not None:
                terminal.write_line(line)
            else:  # one write: several workers share the terminal
                sys.stderr.write(f"[{self.worker}] {line}\n" if self.worker else f"{line}\n")
                sys.stderr.flush()


@pytest.fixture(scope="session")
def fidbench_bench(request):
    """Per-process harness state: the suite, and the model currently loaded with its references."""
    config = request.config
    progress = config.pluginmanager.get_plugin("fidbench-progress")
    return Bench(
        _suite(config),
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
    if model.name in request.config.stash.get(_model_errors_key, {}):
        pytest.fail(request.config.stash[_model_errors_key][model.name], pytrace=False)
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


def _properties(record: dict) -> list[tuple[str, object]]:
    """A record's figures as (name, value) properties, one per metric (JUnit XML writes each as a property)."""
    timing = record.get("timing") or {}
    values = {**(record.get("scores") or {}), **timing, **(timing.get("timed") or {}),
              "kv_fraction": (record.get("kept") or {}).get("kv_fraction")}
    return [(name, values[name]) for name in METRICS if values.get(name) is not None]


@pytest.fixture
def fidbench_record(request):
    """Call with a case record to send it to the report (on the controller, also under xdist) and its figures
    to the item's properties."""
    def send(record):
        request.node.user_properties.append((RECORD, record))
        request.node.user_properties.extend(_properties(report.finite(record)))
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
    """The parametrize id of a node id: ``case-id`` of ``tests/x.py::test_fidelity[case-id]``, also with the
    ``@group`` that ``--dist loadgroup`` appends (ids may hold [ ] and ::, the path neither)."""
    return nodeid.partition("::")[2].partition("[")[2].rpartition("]")[0]


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
        self.running: set[str] = set()  # node ids started and not finished (under xdist, on any worker)
        self.interrupted: str | None = None  # what stopped the session: "SIGTERM", "Ctrl-C", a worker's interrupt
        self.interrupted_workers: set[str] = set()  # xdist workers that stopped on SIGTERM or Ctrl-C
        self.collect_errors: list[str] = []  # what failed to collect: the report says so instead of holding no case
        self.write_error: str | None = None  # why the report could not be written (a full disk), said once

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
                "free_run": opt("fidbench_free_run"),  # every case; variants may ask on their own
            }
            if opt("fidbench_shard"):
                settings["shard"] = "{}/{}".format(*opt("fidbench_shard"))
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

    def _save(self, change) -> None:
        """Apply ``change`` to the report, which rewrites its file; a file that cannot be written (a full disk,
        a read-only directory) is said once, in a line, and fails the session at its end: no INTERNALERROR."""
        try:
            change()
        except OSError as e:
            if self.write_error is None:
                self.write_error = (f"fidbench: cannot write the report {self.report.path}: {e.strerror or e}; "
                                    "the cases still run and gate, their scores are not saved")
                terminal = self.config.pluginmanager.getplugin("terminalreporter")
                if terminal is not None:
                    terminal.write_line("\n" + self.write_error)

    def pytest_runtest_logstart(self, nodeid, location):
        self.running.add(nodeid)

    def pytest_runtest_logfinish(self, nodeid, location):
        self.running.discard(nodeid)

    def pytest_keyboard_interrupt(self, excinfo):
        """Ctrl-C, or SIGTERM (raised as KeyboardInterrupt("SIGTERM")), or an xdist worker's interruption."""
        message = str(excinfo.value)  # xdist's: "<WorkerController gw0> received keyboard-interrupt"
        self.interrupted = message if message == "SIGTERM" or "keyboard-interrupt" in message else "Ctrl-C"

    def pytest_testnodedown(self, node, error):
        if error == "keyboard-interrupt":  # xdist then reports the case the worker ran as its crash
            self.interrupted_workers.add(node.gateway.id)

    def pytest_collectreport(self, report):
        if report.failed:
            self.collect_errors.append(f"{report.nodeid or 'collection'}: {(_message(report) or '')[:2000]}")

    @pytest.hookimpl(tryfirst=True)  # an xdist worker's progress shows before the report's outcome
    def pytest_runtest_logreport(self, report):
        terminal = self.config.pluginmanager.getplugin("terminalreporter")
        for name, value in report.user_properties:  # progress lines a worker relayed: printed here
            if name == PROGRESS and terminal is not None:
                if getattr(getattr(terminal, "_tw", None), "width_of_current_line", 0):
                    terminal.write("\n")  # after xdist's progress dots
                terminal.write_line(value)
        case = self._case(report)
        if case is None:
            return
        records = [value for name, value in report.user_properties if name == RECORD]
        for record in records:
            self._save(lambda record=record: self.report.add(record))
        outcome = _outcome(report, bool(records))
        worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", None)
        if report.when == "???" and worker in self.interrupted_workers:  # xdist calls it a crash
            outcome = ("error", f"interrupted (worker {worker} stopped by SIGTERM or Ctrl-C) while this case ran")
        if outcome is not None:
            self._save(lambda: self.report.settle(case, *outcome))

    def pytest_sessionfinish(self, session):
        """The report is written at the end of every session: the case running when the session was interrupted
        is an error that says so, selected cases that never ran (-x, --maxfail, an interruption) are "not run",
        and a session that collected no case or failed to collect replaces a previous report (its ``errors``
        say why), so nobody reads an earlier run's results as this one's."""
        if self.config.option.collectonly or not self._active():
            return
        try:
            _ = self.report
        except pytest.fail.Exception as e:  # the suite is not valid: a report of no case that says why
            self._report = report.Report(self.config.getoption("fidbench_report"), {}, [], self.environment)
            if not any(e.msg in error for error in self.collect_errors):  # said at collection already
                self.report.errors.append(e.msg)
        for nodeid in sorted(self.running):
            case = self.cases.get(self.nodes.get(nodeid) or self.selected.get(nodeid) or _param_id(nodeid))
            if case is not None and case.id not in self.report.records:
                why = self.interrupted or "the session ended"
                self._save(lambda case=case, why=why: self.report.settle(case, "error", f"interrupted ({why}) while "
                                                                                        "this case ran"))
        for case_id in self.selected.values():
            if case_id in self.cases and case_id not in self.report.records:
                self._save(lambda case_id=case_id: self.report.settle(
                    self.cases[case_id], "skipped", "not run: the session ended before this case"))
        self.report.errors.extend(self.collect_errors)
        self._save(self.report.write)
        if self.write_error is not None and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter):
        records = self.report.ordered() if self._report is not None else []
        option = self.config.getoption("fidbench_config")
        if not records and not self.selected and option and not _named_suites(self.config):
            terminalreporter.write_line(f"fidbench: no fidelity case ran; to run the cases of {option}, name it as a "
                                        f"test path: pytest {option}")
        if records:
            terminalreporter.write_sep("=", "fidbench results")
            terminalreporter.write_line(report.table(records))
            for line in report.skip_notes(records):
                terminalreporter.write_line(line, yellow=True)
            if self.config.getoption("fidbench_report") and self.write_error is None:
                terminalreporter.write_line(f"fidbench report: {self.config.getoption('fidbench_report')}")
        if self.write_error is not None:
            terminalreporter.write_line(self.write_error)
