"""``fidbench compare base.json new.json``: per case, the change of acc@1, acc@5 and KL mean over the samples
both reports scored (matched by dataset and prompt index), with a paired bootstrap interval, and a gate.
Free-running scores (ROUGE-L, edit distance, common prefix, answer recall) are compared too where both
reports have them for a case, over the samples both measured (``stats.paired``), and can be gated alike.

The gate (``--max-drop acc1=0.01 --max-rise kl_mean=10%``) allows each metric a change in its worse
direction, absolute or relative to the base's value. Rule ``interval`` (default) fails a case when its whole
interval lies beyond the allowed change: the change is then larger than allowed with the interval's
confidence, not an accident of which prompts were drawn; a point beyond the allowance whose interval still
reaches it is shown as ``warn``. Rule ``point`` fails whenever the measured change is beyond (stricter, and
flaky on changes near the allowance). Below two matched samples there is no interval and both rules
use the point. A comparison that cannot be made never passes: with a gate, a gated metric that the new
report lacks fails, a case of the base missing from the new report fails, and so does a case that either
run could not score faithfully (non-finite logits, no scores: an error or a skip). A case that failed its own
floors is compared as measured, with a note.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import metrics, provenance, report, stats

RULES = ("interval", "point")


class CompareError(ValueError):
    pass


@dataclass
class Allowance:
    """How much ``metric`` may get worse: ``amount`` absolute, or a fraction of the base's value (``relative``)."""

    metric: str
    amount: float
    relative: bool

    @property
    def higher_is_better(self) -> bool:
        return self.metric in metrics.HIGHER_IS_BETTER

    def limit(self, base: float) -> float:
        return self.amount * abs(base) if self.relative else self.amount

    def __str__(self) -> str:
        return f"{self.metric}={self.amount * 100:g}%" if self.relative else f"{self.metric}={self.amount:g}"


def allowance(text: str, direction: str) -> Allowance:
    """Parse ``METRIC=AMOUNT`` or ``METRIC=PERCENT%`` of ``--max-drop`` (``direction`` "drop") or ``--max-rise``."""
    metric, sep, value = text.partition("=")
    if not sep or not value:
        raise ValueError(f"{text!r}: expected METRIC=AMOUNT, e.g. acc1=0.01 or kl_mean=10%")
    gateable = (*stats.METRICS, *stats.FREE)
    if metric not in gateable:
        raise ValueError(f"{text!r}: {metric!r} cannot be gated (choose from {', '.join(gateable)})")
    higher = metric in metrics.HIGHER_IS_BETTER
    if higher != (direction == "drop"):
        other = "--max-drop" if higher else "--max-rise"
        raise ValueError(f"{text!r}: {metric} gets worse by {'dropping' if higher else 'rising'}: use {other} {text}")
    relative = value.endswith("%")
    try:
        amount = float(value[:-1] if relative else value) / (100 if relative else 1)
    except ValueError:
        raise ValueError(f"{text!r}: {value!r} is not a number or a percentage") from None
    if not math.isfinite(amount) or amount < 0:
        raise ValueError(f"{text!r}: the allowed change must be a finite number >= 0")
    return Allowance(metric, amount, relative)


def verdict(change: dict | None, allow: Allowance, rule: str) -> str:
    """``ok``, ``warn`` (the point is beyond the allowance, the interval is not) or ``FAIL``."""
    if change is None:
        return "FAIL"  # not measured: nothing to pass on
    limit = allow.limit(change["base"])
    ci = change["ci"]
    values = [change["diff"], limit, *(ci or [])]
    if not all(math.isfinite(v) for v in values):
        return "FAIL"

    def beyond(x: float) -> bool:
        return x < -limit if allow.higher_is_better else x > limit

    if rule == "point" or ci is None:
        return "FAIL" if beyond(change["diff"]) else "ok"
    nearest = ci[1] if allow.higher_is_better else ci[0]  # the bound nearest to "no worse"
    if beyond(nearest):
        return "FAIL"
    return "warn" if beyond(change["diff"]) else "ok"


def _key(sample: dict) -> tuple:
    return sample["dataset"], sample["index"]


def compare(base: dict, new: dict, names: tuple[str, str] = ("base", "new"), allow: list[Allowance] = (),
            rule: str = "interval", allow_mismatch: bool = False, level: float = stats.LEVEL) -> dict:
    """The comparison document: per common case and metric the base, new, change and interval, and the gate's
    verdicts. Refuses (``CompareError``) reports of another base model or other settings, or samples whose
    prompt or reference length differ, unless ``allow_mismatch``."""
    if rule not in RULES:
        raise CompareError(f"unknown gate rule {rule!r} (choose from {', '.join(RULES)})")
    gates = {a.metric: a for a in allow}
    base_cases = {r["id"]: r for r in base["cases"]}
    new_cases = {r["id"]: r for r in new["cases"]}
    common = [case_id for case_id in base_cases if case_id in new_cases]
    if not common:
        raise CompareError(f"no case is in both {names[0]} and {names[1]}")
    measured = {m for r in (*base_cases.values(), *new_cases.values()) for s in r.get("samples") or []
                for m in stats.FREE if s.get(m) is not None}
    unmeasured = [m for m in gates if m in stats.FREE and m not in measured]
    if unmeasured:
        raise CompareError(f"{', '.join(unmeasured)} cannot be gated: no case of either report has it (free-running "
                           f"scores come from --fidbench-free-run or a variant's free_run: true)")
    docs = dict(zip(names, (base, new)))
    problems = provenance.differences(docs, versions=False)
    notes = [f"not a mismatch, for information: {d}" for d in provenance.differences(docs) if d not in problems]
    cases = []
    for case_id in common:
        b = {_key(s): s for s in base_cases[case_id].get("samples") or []}
        n = {_key(s): s for s in new_cases[case_id].get("samples") or []}
        keys = [k for k in b if k in n]
        differ = [k for k in keys if any(b[k].get(f) != n[k].get(f) for f in ("prompt_tokens", "n_tokens"))]
        if differ:
            problems.append(f"case {case_id}: {len(differ)} sample(s) have another prompt or reference length "
                            f"(first: {differ[0][0]} #{differ[0][1]}), so they were not scored on the same tokens")
        if len(b) != len(keys) or len(n) != len(keys):
            notes.append(f"case {case_id}: {len(keys)} sample(s) in both, {len(b) - len(keys)} only in {names[0]}, "
                         f"{len(n) - len(keys)} only in {names[1]}: compared on the common ones")
        entry = {"id": case_id, "n_samples": len(keys), "metrics": {}}
        broken = {name: why for name, r in zip(names, (base_cases[case_id], new_cases[case_id]))
                  if (why := report.unusable(r))}
        if broken:
            entry["unusable"] = [f"{name}: {why}" for name, why in broken.items()]
        own = new_cases[case_id].get("failures")
        if own and not broken:
            notes.append(f"case {case_id}: its run in {names[1]} failed: {'; '.join(own)}")
        # free-running scores where either report measured them for this case (a gated one missing on a side fails)
        free = [m for m in stats.FREE if any(s.get(m) is not None for s in (*b.values(), *n.values()))]
        for metric in (*stats.METRICS, *free):
            change = stats.paired([b[k] for k in keys], [n[k] for k in keys], metric, level) if keys else None
            if metric in gates:
                change = {**(change or {"base": None, "new": None, "diff": None, "ci": None}),
                          "allowed": None if change is None else gates[metric].limit(change["base"]),
                          "verdict": "FAIL" if broken else verdict(change, gates[metric], rule)}
            entry["metrics"][metric] = change
        cases.append(entry)
    if problems and not allow_mismatch:
        raise CompareError("the reports are not comparable (--allow-mismatch compares them anyway):\n  "
                           + "\n  ".join(problems))
    only_base = [c for c in base_cases if c not in new_cases]
    failed = [f"{c['id']} {m}" for c in cases if "unusable" not in c
              for m, ch in c["metrics"].items() if ch and ch.get("verdict") == "FAIL"]
    if gates:  # a gated case must be measured, faithfully, by both runs
        failed += [f"{c['id']} (cannot be compared: {'; '.join(c['unusable'])})" for c in cases if "unusable" in c]
        failed += [f"{case_id} (missing from {names[1]})" for case_id in only_base]
    return {
        "base": names[0], "new": names[1], "level": level, "resamples": stats.RESAMPLES, "seed": stats.SEED,
        "rule": rule, "gate": {a.metric: str(a) for a in allow},
        "mismatches": problems, "notes": notes, "cases": cases,
        "only_base": only_base,
        "only_new": [c for c in new_cases if c not in base_cases],
        "failed": failed, "passed": not failed,
    }


def _num(x, signed: bool = False) -> str:
    return "-" if x is None else f"{x:+.4f}" if signed else f"{x:.4f}"


def table(result: dict) -> str:
    """One row per common case and metric; the gate's column when a gate was given; notes after."""
    gated = bool(result["gate"])
    header = ["case", "metric", "n", "base", "new", "change", f"{result['level']:.0%} CI"]
    header += ["allowed", "gate"] if gated else []
    rows = []
    for case in result["cases"]:
        for metric, ch in case["metrics"].items():
            ch = ch or {}
            ci = ch.get("ci")
            row = [case["id"], metric, str(case["n_samples"]), _num(ch.get("base")), _num(ch.get("new")),
                   _num(ch.get("diff"), True), f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-"]
            if gated:
                allowed = ch.get("allowed")
                worse = -1 if metric in metrics.HIGHER_IS_BETTER else 1
                row += [_num(None if allowed is None else worse * allowed, True) if "verdict" in ch else "",
                        ch.get("verdict", "")]
            rows.append(row)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    lines = [f"base: {result['base']}", f"new:  {result['new']}"]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    for side in ("base", "new"):
        if result[f"only_{side}"]:
            lines.append(f"only in {result[side]} (not compared): {', '.join(result[f'only_{side}'])}")
    lines += [f"cannot be compared: case {c['id']}: {why}" for c in result["cases"] for why in c.get("unusable", [])]
    lines += [f"warning: {m}" for m in result["mismatches"]] + result["notes"]
    if gated:
        rule = ("the whole interval beyond the allowed change" if result["rule"] == "interval"
                else "the measured change beyond the allowed change")
        if any(ch and ch.get("verdict") == "warn" for c in result["cases"] for ch in c["metrics"].values()):
            lines.append("warn: the change is beyond the allowance, its interval reaches back to it (not significant)")
        lines.append(f"gate ({', '.join(result['gate'].values())}; fails on {rule}): "
                     + ("passed" if result["passed"] else f"FAILED: {', '.join(result['failed'])}"))
    return "\n".join(lines)
