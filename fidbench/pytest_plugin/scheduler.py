"""``--dist loadgroup`` under pytest-xdist: each model's cases go to one worker, which loads the model once."""

from __future__ import annotations

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
