"""SIGTERM stops a session that writes a report as Ctrl-C does, so the report gets written."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

_sigterm_key = pytest.StashKey()
# `timeout` sends its SIGTERM twice, to the command and then to the command's process group; when the first has
# been handled before the second arrives (a loaded machine), the second must not count as someone's second stop.
SAME_STOP_S = 2.0


def install(config) -> None:
    """In a session that writes a report, SIGTERM (``timeout``, CI runners cancelling a job, ``kill``) interrupts
    it as Ctrl-C does, in the controller and in each xdist worker (they get the same options), so the report gets
    written; a second SIGTERM, more than ``SAME_STOP_S`` after the first, kills at once. Other sessions (fidbench
    is a plugin of every pytest run where it is installed) keep SIGTERM's default, and so does one where someone
    else handles SIGTERM or pytest runs outside the main thread."""
    if not config.getoption("fidbench_report") or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return

    first: list[float] = []

    def interrupt(signum, frame):
        if not first:
            first.append(time.monotonic())
            raise KeyboardInterrupt("SIGTERM")
        if time.monotonic() - first[0] > SAME_STOP_S:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, interrupt)
    config.stash[_sigterm_key] = interrupt


def pytest_unconfigure(config):
    if signal.getsignal(signal.SIGTERM) is config.stash.get(_sigterm_key, None):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
