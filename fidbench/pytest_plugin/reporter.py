"""The report on the controller: each case's record and outcome, written after every case and at the end of
every session, and the results table in pytest's terminal summary."""

from __future__ import annotations

import pytest

from .. import report
from ..suite import Case
from . import scheduler, suite_file
from .collection import CASE, param_id
from .progress import PROGRESS

RECORD = "fidbench"  # user property carrying a case's record in its call report only


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
        self.finished: set[str] = set()
        self.interrupted: str | None = None  # what stopped the session: "SIGTERM", "Ctrl-C", a worker's interrupt
        self.interrupted_workers: set[str] = set()  # xdist workers that stopped on SIGTERM or Ctrl-C
        self.collect_errors: list[str] = []  # what failed to collect: the report says so instead of holding no case
        self.write_error: str | None = None  # why the report could not be written (a full disk), said once

    @property
    def report(self) -> report.Report:
        if self._report is None:  # the suite is read on first use, after pytest has parsed the options
            opt, suite = self.config.getoption, suite_file.get_or_fail(self.config)
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
            case_id = self.selected.get(rep.nodeid) or param_id(rep.nodeid)
        return None if case_id is None else self.cases.get(case_id)

    def pytest_collection_finish(self, session):
        """Without xdist this process collected the items: note the selected cases."""
        for item in session.items:
            self.selected.update((item.nodeid, value) for name, value in item.user_properties if name == CASE)

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        """Under xdist the workers collected them: the controller gets node ids, read as parametrize ids."""
        if ids and self._active():  # ids: the workers read the suite, so it loads here too
            self.selected.update((i, param_id(i)) for i in ids if param_id(i) in self.cases)

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
        self.finished.add(nodeid)

    def pytest_keyboard_interrupt(self, excinfo):
        """Ctrl-C, or SIGTERM (raised as KeyboardInterrupt("SIGTERM")), or an xdist worker's interruption."""
        message = str(excinfo.value)  # xdist's: "<WorkerController gw0> received keyboard-interrupt"
        self.interrupted = message if message == "SIGTERM" or "keyboard-interrupt" in message else "Ctrl-C"

    @pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest refuses an unknown one under -p no:xdist
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
        if self.interrupted:  # each worker's first case whose end this process has not seen
            scheduler.read_sent_reports(self.config)
            for nodeids in scheduler.pending(self.config):
                self.running.update([nodeid for nodeid in nodeids if nodeid not in self.finished][:1])
        for nodeid in sorted(self.running):
            case = self.cases.get(self.nodes.get(nodeid) or self.selected.get(nodeid) or param_id(nodeid))
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
        if not records and not self.selected and option and not suite_file.named_suites(self.config):
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
