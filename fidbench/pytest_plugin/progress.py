"""Progress lines of long phases, on the terminal also from xdist workers."""

from __future__ import annotations

import contextlib
import sys
import time

import pytest

PROGRESS = "fidbench_progress"  # user property carrying a worker's progress line in one report
TICK_S = 10.0  # a phase longer than this (a model's references, a case's prompts) says how far it got


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
