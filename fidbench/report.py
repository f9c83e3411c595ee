"""fidbench's JSON report: the case record (built here from a case's scores), the document that holds
the records with the environment and settings (ordered, written atomically), and the results table.

The report is a public interface; ``FORMAT`` is its version, raised whenever a field changes meaning
or goes away. It is strict JSON: a non-finite score is written as null, and the case says why
(``non_finite``, ``failures``). ``read`` checks a saved report field by field.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from . import metric_table, metrics, stats

# 1: records without "format"; 2: + format, kind; 3: + outcome, error, non_finite; stub records;
# 4: + free_run, free-running scores (metrics.FREE_RUN), timing.free_run_s, free-running fields of samples
FORMAT = 4
OUTCOMES = ("passed", "failed", "error", "skipped")

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


def sample(prompt, ref, scores, non_finite: int = 0, first_non_finite: int | None = None,
           free: dict | None = None) -> dict:
    """One sample's row of a case record: where it came from, its scores, and how many of its positions had
    non-finite logits (the first of them in ``first_non_finite``); the task's ``answers`` where it has them;
    ``free``: the free-running run's fields (both texts, the method's length, its non-finite steps, the answers)."""
    summary = {k: v for k, v in scores.summary().items() if k not in ("n_samples", "acc1_by_position")}
    return {"dataset": prompt.dataset, "index": prompt.index, "prompt_tokens": len(ref.p_ids),
            "template": prompt.template, "truncated_from": prompt.truncated_from, **summary,
            "non_finite": non_finite, "first_non_finite": first_non_finite,
            **({"answers": prompt.answers} if prompt.answers else {}), **(free or {})}


def _failures(case, method, scores: dict, samples: list, skipped: list) -> list[str]:
    """Why the case fails: nothing scored, non-finite logits (NaN passes every comparison), floors."""
    if not samples:
        reasons = sorted({s["reason"] for s in skipped})
        more = "; ..." if len(reasons) > 3 else ""
        return [f"no prompt was scored: {len(skipped)} skipped ({'; '.join(reasons[:3])}{more})" if skipped
                else "no prompt was scored"]
    failures = []
    bad = [s for s in samples if s.get("non_finite")]
    if bad:
        first = bad[0]
        failures.append(
            f"method {method.name!r} (variant {case.variant.name!r}) gave non-finite logits (NaN or inf) at "
            f"{sum(s['non_finite'] for s in bad)} position(s) of {len(bad)} sample(s); first: sample "
            f"{first['dataset']}[{first['index']}], position {first['first_non_finite']}")
    free_bad = [s for s in samples if s.get("free_non_finite")]
    if free_bad:
        first = free_bad[0]
        failures.append(
            f"method {method.name!r} (variant {case.variant.name!r}) gave non-finite logits (NaN or inf) while "
            f"free-running, at {sum(s['free_non_finite'] for s in free_bad)} step(s) of {len(free_bad)} sample(s); "
            f"first: sample {first['dataset']}[{first['index']}]")
    return failures + metrics.check_floors(scores, case.floors)


def case(case, loaded, method, mode: str, per_dataset: dict, samples: list, skipped: list, timing: dict,
         free_run: bool = False) -> dict:
    """A case's record: what ran, its scores overall and per dataset, timing, what the method kept, floors,
    and why it fails. ``outcome`` is the harness's verdict; under pytest the test's outcome replaces it.
    ``free_run``: the method also generated on its own (its scores are then in ``scores`` too)."""
    every = [s for group in per_dataset.values() for s in group]
    scores = metrics.aggregate(every)
    # A method's own loop is timed as a whole: it has no separate prefill and decode.
    timing = {"prefill_s": None, "decode_s": None, **timing}
    failures = _failures(case, method, scores, samples, skipped)
    return {
        "id": case.id,
        "model": case.model.name,
        "model_type": loaded.model.config.model_type,
        "fingerprint": loaded.fingerprint,
        "device": "+".join(sorted({str(p.device) for p in loaded.model.parameters()})),  # where it ran: cuda:3, cpu
        "method": case.variant.method,
        "kind": method.kind,
        "variant": case.variant.name,
        "params": method.params(),
        "decode": mode,
        "free_run": free_run,
        "scores": scores,
        "datasets": {name: metrics.aggregate(group) for name, group in per_dataset.items()},
        "ci": stats.intervals(samples),  # bootstrap over samples: metric -> [lo, hi], None below two samples
        "ci_level": stats.LEVEL,
        "timing": timing,
        "kept": method.kept(),
        "floors": case.floors,
        "outcome": "failed" if failures else "passed",
        "error": None,
        "failures": failures,
        "non_finite": sum(s.get("non_finite", 0) for s in samples),
        "samples": samples,
        "skipped": skipped,
    }


def skip_notes(records: list[dict]) -> list[str]:
    """A line per model whose cases left prompts out (``overlong: skip``), with the counts: the table shows only
    what was scored, so a run that dropped half its prompts must say so where it is read."""
    left: dict[str, tuple[set, set, str]] = {}  # model -> (skipped, every prompt, a reason)
    for record in records:
        skipped = record.get("skipped") or []
        if not skipped:
            continue
        out, every, _ = left.setdefault(record["model"], (set(), set(), skipped[0]["reason"]))
        out.update((s["dataset"], s["index"]) for s in skipped)
        every.update((s["dataset"], s["index"]) for s in skipped + (record.get("samples") or []))
    return [f"fidbench: warning: model {model}: {len(out)} of {len(every)} prompts were not scored (overlong: "
            f"skip; e.g. {reason}); each case's report record lists them under 'skipped'"
            for model, (out, every, reason) in left.items()]


def stub(case, outcome: str, error: str | None) -> dict:
    """The record of a case that gave no scores (it errored, was skipped or never ran): what it was, and why."""
    return {"id": case.id, "model": case.model.name, "method": case.variant.method, "variant": case.variant.name,
            "outcome": outcome, "error": error}


def unusable(record: dict) -> str | None:
    """Why a case's scores are not to be trusted or compared (its run gave non-finite logits, or no scores), or
    None. A case that failed its floors only has scores: they are what it measured."""
    if record.get("outcome") in ("error", "skipped") or "scores" not in record:
        return f"its run gave no scores (outcome {record.get('outcome')}: {record.get('error') or 'no record'})"
    free = sum(s.get("free_non_finite") or 0 for s in record.get("samples") or [])
    if record.get("non_finite") or free:
        return (f"its run gave non-finite logits (NaN or inf) at {record.get('non_finite') or 0} teacher-forced "
                f"position(s) and {free} free-running step(s)")
    return None


def finite(value):
    """``value`` with every non-finite float replaced by None, so the JSON is strict (NaN is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def check_writable(path) -> None:
    """Raise OSError unless a report can be written at ``path`` (checked before a run, not after its first case)."""
    if Path(path).is_dir():
        raise IsADirectoryError(f"{path} is a directory")
    probe = Path(f"{path}.tmp{os.getpid()}")
    probe.write_text("")
    probe.unlink()


def batched(records) -> dict:
    """``{"batched": ...}`` when cases ran several prompts per forward: how many, and their scored positions at a
    near-tie (``metrics.NEAR_TIE``), where an argmax may differ from one prompt per forward; else nothing."""
    cases = [r for r in records if ((r.get("timing") or {}).get("batch_size") or 1) > 1]
    if not cases:
        return {}
    ties = sum(r["timing"].get("near_ties") or 0 for r in cases)
    return {"batched": {"cases": len(cases), "near_ties": ties, "near_tie_margin": metrics.NEAR_TIE}}


class Report:
    """Case records of a run, kept in suite order and rewritten to ``path`` after every case."""

    def __init__(self, path: str | None, settings: dict, order: list[str], env: dict | None = None):
        self.path = path
        self.settings = settings
        self.order = order
        self.records: dict[str, dict] = {}
        self.environment = env or environment()
        self.errors: list[str] = []  # what kept cases from being collected (a bad suite): written as "errors"

    def add(self, record: dict) -> None:
        self.records[record["id"]] = finite(record)  # the table shows what the file holds
        self.write()

    def settle(self, case, outcome: str, error: str | None = None) -> None:
        """Set a case's outcome (and error), on its record or on a stub when no record arrived."""
        record = self.records.get(case.id) or stub(case, outcome, error)
        record["outcome"], record["error"] = outcome, error if error is not None else record.get("error")
        self.add(record)

    def ordered(self) -> list[dict]:
        """Records in suite order, whatever order xdist workers finished them in."""
        rank = {case_id: i for i, case_id in enumerate(self.order)}
        return sorted(self.records.values(), key=lambda r: rank.get(r["id"], len(rank)))

    def write(self) -> None:
        if not self.path:
            return
        doc = {"format": FORMAT, "environment": {**self.environment, **batched(self.records.values())},
               "settings": self.settings, "cases": self.ordered()}
        if self.errors:
            doc["errors"] = self.errors
        tmp = Path(f"{self.path}.tmp{os.getpid()}")
        try:
            tmp.write_text(json.dumps(finite(doc), indent=1, allow_nan=False))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)  # a full disk keeps no half-written file
            raise


class ReportError(ValueError):
    pass


def _number(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _check(where: str, data: dict, key: str, ok, expected: str):
    if key not in data:
        raise ReportError(f"{where}.{key}: missing")
    if not ok(data[key]):
        raise ReportError(f"{where}.{key}: expected {expected}, got {json.dumps(data[key])[:80]}")
    return data[key]


def _in_range(where: str, metric: str, value) -> None:
    """A known metric's finite value lies in its range (an older report's NaN is shown as a failure, not refused)."""
    if metric in metrics.known_metrics() and isinstance(value, (int, float)) and math.isfinite(value):
        low, high = metrics.floor_range(metric)
        if not low <= value <= high:
            raise ReportError(f"{where}.{metric}: {value} is outside its range [{low:g}, {high:g}]")


def _scores(where: str, scores, nested: bool = False) -> None:
    if not isinstance(scores, dict):
        raise ReportError(f"{where}: expected an object of scores, got {json.dumps(scores)[:80]}")
    for metric, value in scores.items():
        if metric == "heads" and not nested:  # a method's own predictors (Medusa heads), each an object of scores
            if not isinstance(value, list):
                raise ReportError(f"{where}.heads: expected a list of per-head scores, got {json.dumps(value)[:80]}")
            for i, head in enumerate(value):
                _scores(f"{where}.heads[{i}]", head, nested=True)
        elif metric != "acc1_by_position" and not _number(value):
            raise ReportError(f"{where}.{metric}: expected a number or null, got {json.dumps(value)[:80]}")
        else:
            _in_range(where, metric, value)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _samples(where: str, samples) -> None:
    """Per-sample rows: where each came from, and its scores (what compare and floors read)."""
    if not isinstance(samples, list):
        raise ReportError(f"{where}: expected a list of samples, got {json.dumps(samples)[:80]}")
    for i, row in enumerate(samples):
        at = f"{where}[{i}]"
        if not isinstance(row, dict):
            raise ReportError(f"{at}: expected an object, got {json.dumps(row)[:80]}")
        _check(at, row, "dataset", lambda v: isinstance(v, str), "a string")
        _check(at, row, "index", _count, "a count (an integer >= 0)")
        _check(at, row, "n_tokens", _count, "a count (an integer >= 0)")
        if "non_finite" in row:
            _check(at, row, "non_finite", _count, "a count (an integer >= 0)")
        _scores(at, {k: v for k, v in row.items() if k in metrics.known_metrics() or k == "heads"})


def _check_case(where: str, case) -> None:
    if not isinstance(case, dict):
        raise ReportError(f"{where}: expected an object, got {json.dumps(case)[:80]}")
    _check(where, case, "id", lambda v: isinstance(v, str), "a string")
    if "outcome" in case:
        _check(where, case, "outcome", lambda v: v in OUTCOMES, " or ".join(OUTCOMES))
    if "scores" not in case and case.get("outcome") in ("error", "skipped"):
        return  # a stub: the case gave no scores
    _scores(f"{where}.scores", _check(where, case, "scores", lambda v: True, ""))
    for name, scores in _check(where, case, "datasets", lambda v: isinstance(v, dict), "an object").items():
        _scores(f"{where}.datasets.{name}", scores)
    timing = _check(where, case, "timing", lambda v: isinstance(v, dict), "an object")
    for key in ("prefill_s", "decode_s"):
        _check(f"{where}.timing", timing, key, _number, "a number or null")
    if "free_run_s" in timing:
        _check(f"{where}.timing", timing, "free_run_s", _number, "a number or null")
    if "free_run" in case:
        _check(where, case, "free_run", lambda v: isinstance(v, bool), "true or false")
    kept = _check(where, case, "kept", lambda v: isinstance(v, dict), "an object")
    if "kv_fraction" in kept:
        _check(f"{where}.kept", kept, "kv_fraction", lambda v: v is None or (_number(v) and 0 <= v <= 1),
               "a fraction in [0, 1] or null")
    if "non_finite" in case:
        _check(where, case, "non_finite", _count, "a count (an integer >= 0)")
    if "samples" in case:
        _samples(f"{where}.samples", case["samples"])
    _check(where, case, "failures", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
           "a list of strings")


def read(path) -> dict:
    """A saved report, checked: a ``ReportError`` names the file and the first field that is not as written."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise ReportError(f"{path}: cannot read it ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ReportError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ReportError(f"{path}: not a fidbench report (JSON nested too deeply to read)") from None
    if not isinstance(doc, dict):
        raise ReportError(f"{path} is not a fidbench report (expected a JSON object with 'cases')")
    if "format" in doc and not (_count(doc["format"]) and 1 <= doc["format"] <= FORMAT):
        raise ReportError(f"{path}: format: expected a report format 1 to {FORMAT} (this fidbench's), got "
                          f"{json.dumps(doc['format'])[:80]}: written by a newer fidbench, or not by fidbench")
    for key in ("settings", "environment"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            raise ReportError(f"{path}: {key}: expected an object, got {json.dumps(doc[key])[:80]}")
    if "errors" in doc and not (isinstance(doc["errors"], list) and all(isinstance(e, str) for e in doc["errors"])):
        raise ReportError(f"{path}: errors: expected a list of messages, got {json.dumps(doc['errors'])[:80]}")
    if not isinstance(doc.get("cases"), list):
        got = "missing" if "cases" not in doc else f"expected a list of cases, got {json.dumps(doc['cases'])[:80]}"
        raise ReportError(f"{path}: cases: {got}")
    seen = {}
    for i, case in enumerate(doc["cases"]):
        _check_case(f"{path}: cases[{i}]", case)
        if case["id"] in seen:
            raise ReportError(f"{path}: cases[{i}].id: {case['id']!r} is also cases[{seen[case['id']]}]'s: a case "
                              f"appears once in a report")
        seen[case["id"]] = i
    return doc


COLUMNS = metric_table.columns("teacher")  # (metric, header, format)


def _fmt(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)  # a metric the method does not measure


def verdict(record: dict) -> str:
    """ok, FAIL, ERROR or SKIP: never ok for a case with failures or a non-finite score (older reports hold NaN)."""
    outcome = record.get("outcome")
    if outcome in ("error", "skipped"):
        return "ERROR" if outcome == "error" else "SKIP"
    scores = record.get("scores") or {}
    broken = any(isinstance(v, float) and not math.isfinite(v) for v in scores.values())
    return "FAIL" if outcome == "failed" or record.get("failures") or broken else "ok"


FREE_COLUMNS = metric_table.columns("free_run")
ANSWER_COLUMNS = metric_table.columns("answers")


def _answers(scores: dict) -> str:
    """The method's and the base's answer recall, ``method/base``, or ``-`` where the task has no answers."""
    method, base = scores.get("answer_recall"), scores.get("answer_recall_base")
    return "-" if method is None else f"{method:.2f}/{base:.2f}"


def _pm(fmt: str, ci) -> str:
    """Half the interval's width, 2 significant digits (enough to tell a difference from noise), no finer than
    the column's own ``fmt``."""
    if not ci or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in ci):  # none, or non-finite
        return ""
    half = (ci[1] - ci[0]) / 2
    text = f"{half:.2g}"
    return f" ±{fmt.format(half) if 'e' in text else text}"


def table(records: list[dict], datasets: bool = True, markdown: bool = False) -> str:
    """One row per case and dataset (``datasets``), then the case overall with its verdict (every case has one)
    and ± half its bootstrap interval (``ci``) on acc@1, acc@5, KL and the free-running scores, then one row
    per head of a method that scores heads of its own (Medusa).

    Answer columns (the share of answers in the base's reference, the share of those the method reproduces
    teacher-forced) and free-running columns (ROUGE-L, edit distance, answer recall method/base, time) appear when
    a case has them."""
    free = any(r.get("free_run") for r in records)
    answered = any((r.get("scores") or {}).get("answers_in_base") is not None for r in records)
    header = ["case", "dataset", *(c[1] for c in COLUMNS)]
    header += [c[1] for c in ANSWER_COLUMNS] if answered else []
    header += [*(c[1] for c in FREE_COLUMNS), "answers"] if free else []
    header += ["kept", "prefill s", "decode s", *(["free s"] if free else []), "floors"]
    rows = []
    for r in records:
        kept = (r.get("kept") or {}).get("kv_fraction")
        timing = r.get("timing") or {}
        parts = [(n, s) for n, s in r.get("datasets", {}).items() if s.get("n_tokens")] if datasets else []
        for name, scores in [*parts, ("all", r.get("scores") or {})]:
            overall = name == "all"
            ci = (r.get("ci") or {}) if overall else {}
            row = [r["id"], name, *(_fmt(fmt, scores.get(k)) + _pm(fmt, ci.get(k)) for k, _, fmt in COLUMNS)]
            row += [_fmt(fmt, scores.get(k)) for k, _, fmt in ANSWER_COLUMNS] if answered else []
            if free:
                row += [*(_fmt(fmt, scores.get(k)) + _pm(fmt, ci.get(k)) for k, _, fmt in FREE_COLUMNS),
                        _answers(scores)]
            row += [f"{kept:.3f}" if overall and kept is not None else "",
                    _fmt("{:.2f}", timing.get("prefill_s")) if overall else "",
                    _fmt("{:.2f}", timing.get("decode_s")) if overall else ""]
            row += [_fmt("{:.2f}", timing.get("free_run_s")) if overall else ""] if free else []
            row.append(verdict(r) if overall else "")
            rows.append(row)
            if overall:  # then each of the method's own predictors (Medusa heads): what it measured
                for head in scores.get("heads") or []:
                    values = [_fmt(fmt, head.get(k)) for k, _, fmt in COLUMNS]
                    rows.append([r["id"], f"head {head.get('head')}", *values, *[""] * (len(header) - 2 - len(values))])
    levels = {r.get("ci_level") for r in records if any((r.get("ci") or {}).values())}
    shown = ", ".join(f"{x:.0%}" for x in sorted(levels))
    note = [f"±: half the {shown} bootstrap interval over samples"] if levels else []
    if markdown:
        lines = ["| " + " | ".join(str(x) for x in row) + " |" for row in [header, ["---"] * len(header), *rows]]
        return "\n".join(lines + (["", *note] if note else []))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines + note)
