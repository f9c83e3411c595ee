"""The session's set-up (``pytest_configure``): the lock settings checked, the suite file chosen, SIGTERM
handled, progress lines and, on the controller, the reporter registered."""

from __future__ import annotations

import contextlib
import os

import pytest

from .. import lock, report
from ..models import model_type
from ..suite import SuiteError
from . import markers, sigterm, suite_file
from .progress import Progress
from .reporter import Reporter


def pytest_configure(config):
    config.addinivalue_line("markers", "fidbench: a fidelity case (model × method variant)")
    try:
        lock.kind(), lock.timeout(), lock.stale_after()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    config.stash[suite_file.PATH] = suite_file.session_path(config)
    sigterm.install(config)
    config.pluginmanager.register(Progress(config, os.environ.get("PYTEST_XDIST_WORKER")), "fidbench-progress")
    if config.option.markers:  # `pytest --markers` collects nothing: list the suite's markers from here
        with contextlib.suppress(SuiteError, OSError, ValueError):
            for case in suite_file.get(config).cases():
                markers.marks(config, case, model_type(case.model.path))
    if not hasattr(config, "workerinput"):  # xdist workers send their records to the controller
        path = config.getoption("fidbench_report")
        if path:  # before any case runs, not after the first one
            try:
                report.check_writable(path)
            except OSError as e:
                raise pytest.UsageError(f"--fidbench-report {path}: cannot write the report there "
                                        f"({e.strerror or e})") from None
        config.pluginmanager.register(Reporter(config), "fidbench-reporter")
