"""A case's figures as the item's user properties, one per metric (JUnit XML writes each as a property); the
record and progress lines that ride on one report are taken off the item afterwards."""

from __future__ import annotations

import pytest

from .. import cases
from .progress import PROGRESS
from .reporter import RECORD

TRANSIENT = (RECORD, PROGRESS)  # taken off the item once a report carries them: JUnit XML gets metrics, not blobs
METRICS = (*cases.SCALARS, "prefill_s", "decode_s", "kv_fraction", "prefill_ms_per_1k_tokens", "decode_ms_per_token")


def properties(record: dict) -> list[tuple[str, object]]:
    """A record's figures as (name, value) properties, one per metric (JUnit XML writes each as a property)."""
    timing = record.get("timing") or {}
    values = {**(record.get("scores") or {}), **timing, **(timing.get("timed") or {}),
              "kv_fraction": (record.get("kept") or {}).get("kv_fraction")}
    return [(name, values[name]) for name in METRICS if values.get(name) is not None]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A record or a progress line goes in the one report it was made for: off the item afterwards."""
    rep = yield
    item.user_properties[:] = [(name, value) for name, value in item.user_properties if name not in TRANSIENT]
    return rep
