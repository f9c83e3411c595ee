"""``--dist loadgroup`` under pytest-xdist: each model's cases go to one worker, which loads the model once."""

from __future__ import annotations

import queue

import pytest

from ..suite import SuiteError
from . import collection, suite_file


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``: each model's cases go to one worker, which loads the model once; other tests are
    grouped by their ``xdist_group`` marker as xdist does. (xdist groups by a suffix its workers add to node
    ids, which pytest 9.2 no longer lets them set, and which would change the cases' ids.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    try:
        model_of = {case.id: case.model.name for case in suite_file.get(config).cases()}
    except SuiteError:
        model_of = {}  # the workers report the suite's error

    class ByModel(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            model = model_of.get(collection.param_id(nodeid)) if "::test_fidelity[" in nodeid else None
            return f"fidbench model {model}" if model else super()._split_scope(nodeid)

    return ByModel(config, log)


def pending(config) -> list[list[str]]:
    """Under xdist, each worker's cases in the order it runs them that the scheduler has not yet heard it finish.
    An interrupted controller may stop before it reads a worker's events ("started", "complete"), so these, with
    the cases whose end it did read, say which case an interruption stopped."""
    sched = getattr(config.pluginmanager.getplugin("dsession"), "sched", None)
    lists = [[nodeid for work in scopes.values() for nodeid, done in work.items() if not done]
             for scopes in getattr(sched, "assigned_work", {}).values()]  # loadscope, loadgroup, ours
    lists += [[sched.collection[i] for i in indices] for indices in getattr(sched, "node2pending", {}).values()]
    return lists


def read_sent_reports(config) -> None:
    """After the controller was interrupted: pass on what the workers had already sent about their cases (started,
    reported, finished), which the interruption left unread in xdist's queue, so those cases keep their outcome.
    Other events (work complete, scheduling) are dropped: the session is over."""
    dsession = config.pluginmanager.getplugin("dsession")
    events = getattr(dsession, "queue", None)
    while events is not None:
        try:
            name, kwargs = events.get(timeout=0.2)  # a worker's events arrive within milliseconds of each other
        except queue.Empty:
            return
        if name in ("logstart", "testreport", "logfinish"):
            getattr(dsession, f"worker_{name}")(**kwargs)
