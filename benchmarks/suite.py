"""Whole pytest runs of the suite, an earlier commit's and this checkout's, side by side.

Each run is a fresh ``pytest`` process (as a user starts it) over this checkout or over an earlier commit checked
out in a git worktree; the earlier commit runs with its own code, tests and suite file, in this venv (its pytest
plugin is switched in for this one's). Runs alternate sides repeat by repeat, and each record is written to
``--out`` as soon as it is measured: the wall time, pytest's outcome, and every case's ``prefill_s`` and ``decode_s``
from the run's fidbench report. ``--fresh-cache`` gives every run an empty ``$FIDBENCH_CACHE`` (the model
converted and the references generated within the timing, as on a new machine); otherwise each side keeps one
cache of its own, warmed first by an untimed run of that side (the same command, or only the cases ``--warm-k``
selects: origin generates the references, a calibrated method the calibration continuations).

    python benchmarks/suite.py --before 478389f --label "default suite" -- tests/methods --fidbench-limit 2 -n 2
    python benchmarks/suite.py --show
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:  # e.g. a --before that names no commit
        sys.exit(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def checkout(rev: str, scratch: Path) -> Path:
    """A worktree of ``rev`` under ``scratch`` (made once, reused by later runs of this script)."""
    path = scratch / f"worktree-{git('rev-parse', '--short', rev)}"
    if not path.exists():
        git("worktree", "add", "--detach", str(path), rev)
    return path


def plugin_switch(tree: Path) -> list[str]:
    """pytest options that load ``tree``'s fidbench plugin instead of the installed one (its module moved)."""
    pyproject = (tree / "pyproject.toml").read_text()
    module = re.search(r'\[project\.entry-points\.pytest11\]\s*fidbench\s*=\s*"([^"]+)"', pyproject).group(1)
    return ["-p", "no:fidbench", "-p", module]


def run(tree: Path, pytest_args: list[str], cache: Path, log: Path) -> dict:
    report = log.with_suffix(".json")
    env = {**os.environ, "FIDBENCH_CACHE": str(cache), "PYTHONPATH": str(tree)}
    cmd = ["pytest", *plugin_switch(tree), *pytest_args, "-p", "no:cacheprovider", "--fidbench-report", str(report)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    cases = {}
    if report.exists():
        for case in json.loads(report.read_text())["cases"]:
            seconds = {k: v for k, v in (case.get("timing") or {}).items() if k.endswith("_s")}  # free_run_s too
            acc1 = (case.get("scores") or {}).get("acc1")
            cases[case["id"]] = {**seconds, "outcome": case.get("outcome"), "acc1": acc1}
    return {"wall_s": round(wall, 1), "exit": code, "load_at_start": round(load, 2), "summary":
            (log.read_text().strip().splitlines() or [""])[-1], "cases": cases}


def save(out: Path, records: list[dict]) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, out)  # a run cut short keeps what it measured


def show(records: list[dict]) -> None:
    by_label: dict[str, dict[str, list[float]]] = {}
    for r in records:
        by_label.setdefault(r["label"], {}).setdefault(r["side"], []).append(r["wall_s"])
    print("| measurement | before s (each) | after s (each) | before / after |\n|---|---|---|---|")
    for label, sides in by_label.items():
        b, a = sides.get("before", []), sides.get("after", [])
        ratio = f"{sorted(b)[len(b) // 2] / sorted(a)[len(a) // 2]:.2f}x" if a and b else ""
        print(f"| {label} | {', '.join(map(str, b))} | {', '.join(map(str, a))} | {ratio} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="the earlier commit (git revision) to run beside this checkout")
    ap.add_argument("--label", help="name of the measurement in --out")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--fresh-cache", action="store_true", help="every run starts from an empty $FIDBENCH_CACHE")
    ap.add_argument("--warm-k", help="the -k expression of each side's untimed warm-up run (default: all cases)")
    ap.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "fidbench-suite-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "suite.json")
    ap.add_argument("--show", action="store_true", help="print --out's measurements as a table and stop")
    ap.add_argument("pytest_args", nargs="*", help="after --: the pytest command line, run in each tree")
    args = ap.parse_args()
    records = json.loads(args.out.read_text()) if args.out.exists() else []
    if args.show:
        return show(records)
    if not (args.before and args.label and args.pytest_args):
        ap.error("--before, --label and the pytest arguments (after --) are needed to measure")
    if shutil.which("pytest") is None:
        sys.exit("no pytest on PATH: activate the venv first")
    args.scratch.mkdir(parents=True, exist_ok=True)
    trees = {"before": checkout(args.before, args.scratch), "after": ROOT}
    commits = {side: git("rev-parse", "--short", "HEAD", cwd=tree) for side, tree in trees.items()}
    if git("status", "--porcelain", "--untracked-files=no"):
        commits["after"] += "+dirty"
    caches = {side: args.scratch / f"cache-{commits[side]}" for side in trees}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", args.label).strip("-")  # each measurement's logs and reports apart
    if not args.fresh_cache:
        warm = ["-k", args.warm_k] if args.warm_k else []  # the last -k is the one pytest takes
        for side, tree in trees.items():  # untimed: the conversion, references, calibrations
            print(f"warming the cache of {side} ({commits[side]})", flush=True)
            run(tree, args.pytest_args + warm, caches[side], args.scratch / f"{slug}-warm-{side}.log")
    for repeat in range(args.repeats):
        for side in (("before", "after") if repeat % 2 == 0 else ("after", "before")):
            cache = Path(tempfile.mkdtemp(dir=args.scratch)) if args.fresh_cache else caches[side]
            r = run(trees[side], args.pytest_args, cache, args.scratch / f"{slug}-{side}-{repeat}.log")
            if args.fresh_cache:
                shutil.rmtree(cache)
            records.append({"label": args.label, "side": side, "commit": commits[side], "repeat": repeat,
                            "pytest": args.pytest_args, "fresh_cache": args.fresh_cache, "warm_k": args.warm_k,
                            "omp_threads": os.environ.get("OMP_NUM_THREADS"), **r})
            save(args.out, records)
            print(f"{args.label}: {side} {commits[side]} {r['wall_s']} s ({r['summary']})", flush=True)
    show(records)


if __name__ == "__main__":
    main()
