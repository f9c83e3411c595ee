"""The command-line options (``--fidbench-*``) and their types, checked when pytest parses the command line."""

from __future__ import annotations

import argparse

import torch

from ..engine import MODES
from . import sharding


def _positive(value: str) -> int:
    """The count options' type: a positive integer, checked when pytest parses the command line."""
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return n


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
                    help="prompts per forward: base references, and teacher forcing and free running (every method "
                         "but caches and kvpress presses; cases replaying shared prefills run one at a time); "
                         "default 1; >1 keeps its own references")
    group.addoption("--fidbench-free-run", action="store_true",
                    help="every case also lets the method generate on its own and scores that (ROUGE-L, edit "
                         "distance), as variants with free_run: true do; one forward per generated token")
    group.addoption("--fidbench-quiet", action="store_true", help="no progress lines")
    group.addoption("--fidbench-shard", type=sharding.parse, metavar="I/N",
                    help="run shard I of N (1 <= I <= N) of the suite's cases, deselecting the others")
    group.addoption("--fidbench-devices", type=_devices, metavar="DEV,DEV",
                    help="device of xdist worker gwN's 'device: cuda' models: the N-th of the list (wrapping)")
