"""fidbench's JSON report: the case record (built here from a case's scores), the document that holds
the records with the environment and settings (ordered, written atomically), and the results table.

The report is a public interface; ``FORMAT`` is its version, raised whenever a field changes meaning
or goes away.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from . import metrics

FORMAT = 2  # 1: records without "format"; 2: + format, kind

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


def environment(workers: int = 1) -> dict:
    """Taken when the session starts, so it describes the code that ran, not the tree at the last write.

    ``workers``: the processes that ran cases at once (pytest-xdist's workers), sharing the machine."""
    return {
        "versions": {"python": platform.python_version(), **{p: _version(p) for p in PACKAGES}},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "workers": workers,
        },
        "commit": _git("rev-parse", "HEAD") or None,
        # uncommitted changes to tracked files: the commit alone does not say what ran
        "dirty": None if (status := _git("status", "--porcelain", "--untracked-files=no")) is None else bool(status),
    }


def sample(prompt, ref, scores) -> dict:
    """One sample's row of a case record: where it came from and its scores."""
    summary = {k: v for k, v in scores.summary().items() if k not in ("n_samples", "acc1_by_position")}
    return {"dataset": prompt.dataset, "index": prompt.index, "prompt_tokens": len(ref.p_ids),
            "template": prompt.template, "truncated_from": prompt.truncated_from, **summary}


def case(case, loaded, method, mode: str, per_dataset: dict, samples: list, skipped: list, timing: dict) -> dict:
    """A case's record: what ran, its scores overall and per dataset, timing, what the method kept, floors."""
    every = [s for group in per_dataset.values() for s in group]
    scores = metrics.aggregate(every)
    # A method's own loop is timed as a whole: it has no separate prefill and decode.
    timing = {"prefill_s": None, "decode_s": None, **timing}
    return {
        "id": case.id,
        "model": case.model.name,
        "model_type": loaded.model.config.model_type,
        "fingerprint": loaded.fingerprint,
        "method": case.variant.method,
        "kind": method.kind,
        "variant": case.variant.name,
        "params": method.params(),
        "decode": mode,
        "scores": scores,
        "datasets": {name: metrics.aggregate(group) for name, group in per_dataset.items()},
        "timing": timing,
        "kept": method.kept(),
        "floors": case.floors,
        "failures": metrics.check_floors(scores, case.floors) if every else ["no prompt was scored"],
        "samples": samples,
        "skipped": skipped,
    }


class Report:
    """Case records of a run, kept in suite order and rewritten to ``path`` after every case."""

    def __init__(self, path: str | None, settings: dict, order: list[str], env: dict | None = None):
        self.path = path
        self.settings = settings
        self.order = order
        self.records: dict[str, dict] = {}
        self.environment = env or environment()

    def add(self, record: dict) -> None:
        self.records[record["id"]] = record
        self.write()

    def ordered(self) -> list[dict]:
        """Records in suite order, whatever order xdist workers finished them in."""
        rank = {case_id: i for i, case_id in enumerate(self.order)}
        return sorted(self.records.values(), key=lambda r: rank.get(r["id"], len(rank)))

    def write(self) -> None:
        if not self.path:
            return
        doc = {"format": FORMAT, "environment": self.environment, "settings": self.settings, "cases": self.ordered()}
        tmp = f"{self.path}.tmp{os.getpid()}"
        Path(tmp).write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.path)


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
