"""What goes around the scores in fidbench's JSON report, and the results table printed at the end."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = ("fidbench", "torch", "transformers", "accelerate", "pytest", "pytest-benchmark", "pytest-xdist")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment() -> dict:
    """Taken when the session starts, so it describes the code that ran, not the tree at the last write."""
    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "commit": _git("rev-parse", "HEAD") or None,
        # uncommitted changes to tracked files: the commit alone does not say what ran
        "dirty": None if (status := _git("status", "--porcelain", "--untracked-files=no")) is None else bool(status),
    }


COLUMNS = [("acc1", "acc@1", "{:.4f}"), ("acc5", "acc@5", "{:.4f}"), ("kl_mean", "KL", "{:.4f}"),
           ("kl_p99", "KL p99", "{:.3f}"), ("nll_ratio", "NLL×", "{:.3f}"), ("first_divergence", "1st div", "{:.1f}")]


def _fmt(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)  # a metric the method does not measure


def table(records: list[dict], datasets: bool = True, markdown: bool = False) -> str:
    """One row per case and dataset (``datasets``), then the case overall; failures marked."""
    header = ["case", "dataset", *(c[1] for c in COLUMNS), "kept", "prefill s", "decode s", "floors"]
    rows = []
    for r in records:
        kept = r["kept"].get("kv_fraction")
        parts = [*r["datasets"].items()] if datasets else []
        for name, scores in [*parts, ("all", r["scores"])]:
            if not scores.get("n_tokens"):
                continue
            row = [r["id"], name, *(_fmt(fmt, scores[k]) for k, _, fmt in COLUMNS)]
            overall = name == "all"
            row += [f"{kept:.3f}" if overall and kept is not None else "",
                    _fmt("{:.2f}", r["timing"]["prefill_s"]) if overall else "",
                    _fmt("{:.2f}", r["timing"]["decode_s"]) if overall else "",
                    ("FAIL" if r["failures"] else "ok") if overall else ""]
            rows.append(row)
    if markdown:
        lines = [header, ["---"] * len(header), *rows]
        return "\n".join("| " + " | ".join(str(x) for x in row) + " |" for row in lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
