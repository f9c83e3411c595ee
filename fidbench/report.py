"""What goes around the scores in fidbench's JSON report, and the results table printed at the end."""

from __future__ import annotations

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


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "commit": _commit(),
    }


COLUMNS = [("acc1", "acc@1", "{:.4f}"), ("acc5", "acc@5", "{:.4f}"), ("kl_mean", "KL", "{:.4f}"),
           ("kl_p99", "KL p99", "{:.3f}"), ("nll_ratio", "NLL×", "{:.3f}"), ("first_divergence", "1st div", "{:.1f}")]


def _fmt(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)  # a metric the method does not measure


def table(records: list[dict]) -> str:
    """One row per case and dataset, then the case overall; failures marked."""
    header = ["case", "dataset", *(c[1] for c in COLUMNS), "kept", "prefill s", "decode s", "floors"]
    rows = []
    for r in records:
        kept = r["kept"].get("kv_fraction")
        for name, scores in [*r["datasets"].items(), ("all", r["scores"])]:
            if not scores.get("n_tokens"):
                continue
            row = [r["id"], name, *(_fmt(fmt, scores[k]) for k, _, fmt in COLUMNS)]
            overall = name == "all"
            row += [f"{kept:.3f}" if overall and kept is not None else "",
                    _fmt("{:.2f}", r["timing"]["prefill_s"]) if overall else "",
                    _fmt("{:.2f}", r["timing"]["decode_s"]) if overall else "",
                    ("FAIL" if r["failures"] else "ok") if overall else ""]
            rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
