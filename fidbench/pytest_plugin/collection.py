"""The suite's cases as test items: one ``fidbench_case`` parameter per model × method variant (its id the
case id), then the selection: a case collected twice runs once, ``--fidbench-shard`` keeps its share, and each
kept item names its case in a user property that every phase's report carries."""

from __future__ import annotations

import pytest

from ..models import model_type
from ..suite import Case
from . import markers, sharding, suite_file

MODEL_ERRORS = pytest.StashKey()  # model name -> why its type could not be read at collection
CASE = "fidbench_case"  # user property naming an item's case, attached at collection: every phase's report carries it


def pytest_generate_tests(metafunc):
    if "fidbench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    suite = suite_file.get_or_fail(config)
    types, errors = {}, config.stash.setdefault(MODEL_ERRORS, {})
    params = []
    for case in suite.cases():
        if case.model.name not in types:
            try:
                types[case.model.name] = model_type(case.model.path)
            except (OSError, ValueError) as e:  # its cases error (fidbench_model); the suite's other models run
                types[case.model.name] = None
                errors[case.model.name] = f"fidbench: {suite.path}: models.{case.model.name}: {e}"
        params.append(pytest.param(case, id=case.id, marks=markers.marks(config, case, types[case.model.name])))
    metafunc.parametrize("fidbench_case", params)


def _item_case(item) -> Case | None:
    """The fidelity case an item runs (its ``fidbench_case`` parameter), or None for any other test."""
    callspec = getattr(item, "callspec", None)
    case = callspec.params.get("fidbench_case") if callspec is not None else None
    return case if isinstance(case, Case) else None


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own, and after -k / -m deselection
def pytest_collection_modifyitems(config, items):
    shard = config.getoption("fidbench_shard")
    kept, dropped, seen, rank = [], [], set(), None
    for item in items:
        case = _item_case(item)
        if case is None:
            kept.append(item)
            continue
        rank = rank or {c.id: k for k, c in enumerate(suite_file.get_or_fail(config).cases())}
        # seen: a suite file and a module both collected it
        if case.id in seen or not sharding.in_shard(rank[case.id], shard):
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


def param_id(nodeid: str) -> str:
    """The parametrize id of a node id: ``case-id`` of ``tests/x.py::test_fidelity[case-id]``, also with the
    ``@group`` that ``--dist loadgroup`` appends (ids may hold [ ] and ::, the path neither)."""
    return nodeid.partition("::")[2].partition("[")[2].rpartition("]")[0]
