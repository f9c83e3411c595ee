"""``fidbench frontier``: the most aggressive value of one numeric parameter of a method variant whose run still
meets the given floors, judged on the bootstrap bound in the direction of worse (the lower bound of acc@1, the
upper bound of KL), never on the point estimate.

Search: the conservative end of the range is probed first (if it fails, there is no frontier), then the
aggressive end (if it passes, it is the frontier), plus ``grid`` evenly spaced values between them; the
frontier is then bisected between the most aggressive value that passes with every more conservative probe
passing too and its aggressive neighbour, until they are ``tolerance`` apart (integer parameters: adjacent).
One Bench serves every probe: the model, its references and (for methods that leave the prefill to the base
model) each prompt's recorded prefill are made once. ``by_dataset`` searches each dataset on the same probes
(a probe scores every dataset), probing more where its bisection needs it.

Non-monotone cases are reported, not hidden: a probe that meets the floors at a more aggressive value than one
that fails, and a metric whose point estimate gets worse as the parameter gets more conservative.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from . import metrics, report, stats
from .harness import Bench
from .methods import build
from .methods.base import parameters
from .suite import Case, Suite, Variant


class FrontierError(ValueError):
    pass


def bound(samples: list[dict], metric: str, level: float) -> float | None:
    """The bootstrap bound of ``metric`` in the direction of worse; None without an interval (under two samples)."""
    ci = stats.interval(samples, metric, level)
    return None if ci is None else (ci[0] if metric in metrics.HIGHER_IS_BETTER else ci[1])


def meets(samples: list[dict], floors: dict, level: float) -> tuple[bool, dict]:
    """Whether every floor holds at its pessimistic bound, and the bounds (a missing interval never passes)."""
    bounds = {m: bound(samples, m, level) for m in floors}
    ok = all(b is not None and (b >= f if m in metrics.HIGHER_IS_BETTER else b <= f)
             for m, (b, f) in ((m, (bounds[m], floors[m])) for m in floors))
    return ok, bounds


def score(samples: list[dict], metric: str) -> float | None:
    got = stats.sums(samples, metric)
    return None if got is None else float(got[0].sum() / got[1].sum())


@dataclass
class Search:
    """One bisection over ``probe(value) -> samples``; values are ordered from conservative to aggressive."""

    conservative: float
    aggressive: float
    tolerance: float
    floors: dict
    level: float = stats.LEVEL
    integer: bool = False
    grid: int = 0
    results: dict = field(default_factory=dict)  # value -> (meets, bounds, scores)

    def _judge(self, probe, value):
        if value not in self.results:
            samples = probe(value)
            ok, bounds = meets(samples, self.floors, self.level)
            self.results[value] = (ok, bounds, {m: score(samples, m) for m in self.floors})
        return self.results[value][0]

    def _more_aggressive(self, a, b) -> bool:
        return (a < b) if self.aggressive < self.conservative else (a > b)

    def _mid(self, a, b):
        mid = (a + b) / 2
        return math.floor(mid) if self.integer and self.aggressive < self.conservative else (
            math.ceil(mid) if self.integer else mid)

    def _close(self, a, b) -> bool:
        return abs(a - b) <= (max(self.tolerance, 1) if self.integer else self.tolerance)

    def run(self, probe) -> dict:
        start, end = self.conservative, self.aggressive
        values = [start + (end - start) * i / (self.grid + 1) for i in range(self.grid + 2)]
        values = sorted({round(v) if self.integer else v for v in values}, key=lambda v: abs(v - start))
        frontier = None
        if self._judge(probe, start):
            for v in values[1:]:
                self._judge(probe, v)
            ordered = sorted(self.results, key=lambda v: abs(v - start))
            safe = start  # the most aggressive value with every more conservative probe passing
            for v in ordered[1:]:
                if not self.results[v][0]:
                    break
                safe = v
            failing = next((v for v in ordered if self._more_aggressive(v, safe) and not self.results[v][0]), None)
            while failing is not None and not self._close(safe, failing):
                mid = self._mid(safe, failing)
                if mid in (safe, failing):
                    break
                if self._judge(probe, mid):
                    safe = mid
                else:
                    failing = mid
            frontier = safe
        return {"frontier": frontier, "probes": self.probes(), "non_monotone": self.non_monotone()}

    def probes(self) -> list[dict]:
        order = sorted(self.results, key=lambda v: abs(v - self.conservative))
        return [{"value": v, "meets": self.results[v][0], "bounds": self.results[v][1], "scores": self.results[v][2]}
                for v in order]

    def non_monotone(self) -> list[str]:
        probes = self.probes()  # conservative first
        found = []
        for i, a in enumerate(probes):
            for b in probes[i + 1 :]:  # b is more aggressive than a
                if b["meets"] and not a["meets"]:
                    found.append(f"meets the floors at {b['value']:g} but not at the more conservative {a['value']:g}")
                for m, x in a["scores"].items():
                    y = b["scores"][m]
                    if x is None or y is None:
                        continue
                    if (x < y) if m in metrics.HIGHER_IS_BETTER else (x > y):
                        found.append(f"{m} {y:.4g} at {b['value']:g} is better than {x:.4g} at the more "
                                     f"conservative {a['value']:g}")
        return found


def check(suite: Suite, variant: str, param: str, floors: dict) -> Variant:
    """The variant to search, after checking the parameter is numeric and the floors have intervals."""
    found = next((v for v in suite.variants if v.name == variant), None)
    if found is None:
        names = ", ".join(v.name for v in suite.variants)
        raise FrontierError(f"{suite.path}: no variant {variant!r} (variants: {names})")
    hints = parameters(build(found.method, found.params).__class__)
    if param not in hints:
        raise FrontierError(f"variant {variant!r}: method {found.method!r} has no parameter {param!r} "
                            f"(it takes: {', '.join(sorted(hints))})")
    bad = sorted(set(floors) - set(stats.METRICS))
    if bad or not floors:
        raise FrontierError(f"frontier floors must be on {', '.join(stats.METRICS)} (the metrics with bootstrap "
                            f"intervals), got {', '.join(bad) or 'none'}")
    return found


def integer_param(found: Variant, param: str) -> bool:
    hint = parameters(build(found.method, found.params).__class__)[param]
    return "int" in str(hint) and "float" not in str(hint)


def run(suite: Suite, variants: list[str], param: str, low: float, high: float, tolerance: float, floors: dict,
        aggressive: str = "low", grid: int = 0, by_dataset: bool = False, limit: int | None = None,
        level: float = stats.LEVEL, log=None, share_prefill_gib: float = 1.0) -> dict:
    """Search each variant (on the suite's first model); the report document, with a ``frontier`` section.
    ``log(line)`` hears of each probe as it is scored."""
    if not low < high:
        raise FrontierError(f"--range: the low end must be below the high end, got {low} {high}")
    found = [check(suite, v, param, floors) for v in variants]
    suite = copy.copy(suite)
    suite.share_prefill_gib = suite.share_prefill_gib or share_prefill_gib  # prefills replayed across probes
    bench = Bench(suite, limit=limit)
    model = suite.models[0]
    records, results = [], []
    for variant in found:
        integer = integer_param(variant, param)
        memo: dict = {}

        def probe(value, variant=variant, integer=integer, memo=memo):
            value = int(value) if integer else float(value)
            if value not in memo:
                params = {**variant.params, param: value}
                name = f"{variant.name}[{param}={value:g}]"
                case = Case(model, Variant(name, variant.method, params, [], variant.datasets, None), {})
                try:
                    method = build(variant.method, params, f"variant {variant.name!r} at {param}={value:g}")
                except ValueError as e:
                    raise FrontierError(str(e)) from None
                memo[value] = bench.run(case, method)
                records.append(memo[value])
                if log:
                    scores = memo[value]["scores"]
                    log(f"{case.id}: " + ", ".join(f"{m} {scores.get(m)}" for m in floors))
            return memo[value]

        ends = (high, low) if aggressive == "low" else (low, high)
        if integer:
            ends = (int(ends[0]), int(ends[1]))

        def search(samples_of, ends=ends, integer=integer, probe=probe):
            s = Search(ends[0], ends[1], tolerance, floors, level, integer, grid)
            return s.run(lambda v: samples_of(probe(v)))

        entry = {"variant": variant.name, "method": variant.method, "param": param, "range": [low, high],
                 "aggressive": aggressive, "tolerance": tolerance, "floors": floors, "level": level,
                 **search(lambda record: record["samples"])}
        if by_dataset:
            names = [d.name for d in suite.datasets if d.name in suite.scored_by(variant)]
            entry["datasets"] = {d: search(lambda record, d=d: [s for s in record["samples"] if s["dataset"] == d])
                                 for d in names}
        results.append(entry)
    settings = {"suite": str(suite.path), "limit": limit, "command": "frontier"}
    return {"format": report.FORMAT, "environment": report.environment(), "settings": settings,
            "cases": records, "frontier": results}


def _value(v) -> str:
    return "none" if v is None else f"{v:g}"


def table(doc: dict) -> str:
    """One line per variant (and per dataset), then its probes and any non-monotone finding."""
    lines = []
    for r in doc.get("frontier", []):
        floors = ", ".join(f"{m} {'>=' if m in metrics.HIGHER_IS_BETTER else '<='} {f:g}"
                           for m, f in r["floors"].items())
        lines.append(f"{r['variant']}: {r['param']} frontier {_value(r['frontier'])} in [{r['range'][0]:g}, "
                     f"{r['range'][1]:g}] ({r['aggressive']} is aggressive, tolerance {r['tolerance']:g}) "
                     f"at {floors}, {r['level']:.0%} bootstrap bound")
        rows = [("all", r), *((d, x) for d, x in (r.get("datasets") or {}).items())]
        for name, x in rows:
            probes = "; ".join(
                f"{p['value']:g} {'ok' if p['meets'] else 'no'} ("
                + ", ".join(f"{m} {_value(p['scores'][m])} bound {_value(p['bounds'][m])}" for m in p["scores"]) + ")"
                for p in x["probes"])
            lines.append(f"  {name}: frontier {_value(x['frontier'])}; probes {probes}")
            lines += [f"    non-monotone: {n}" for n in x["non_monotone"]]
    return "\n".join(lines)


def write(doc: dict, path: Path) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text(json.dumps(report.finite(doc), indent=1, allow_nan=False))
    os.replace(tmp, path)
