"""``fidbench floors report.json``: floors proposed from a measured run, with a stated statistical margin.

For each case and each run size N (prompts per dataset, ``--at-limit``; default: the report's own), the
case is re-scored over bootstrap runs that draw N of each dataset's prompts in the report, with replacement
(what ``--fidbench-limit N`` runs is one such draw). The floor of acc@1 and acc@5 is the (1 - level) quantile
of those runs, the ceiling of KL mean the level quantile: a one-sided bound that a run of N prompts from the
same population passes with that probability. It is never stricter than what the report's own first N prompts
score (the very prompts ``--fidbench-limit N`` takes), the most lenient over the sizes asked is kept, and it is
rounded outward (acc to 0.01 down, KL up to two significant digits and at least 0.0001).
"""

from __future__ import annotations

import math
import textwrap

import numpy as np

from . import metrics, report, stats

LEVEL = 0.99
KL_RESOLUTION = 1e-4  # a smaller KL ceiling would hold only the engine's own rounding noise (the table shows 0.0000)


def _down(x: float) -> float:
    return math.floor(x * 100 + 1e-9) / 100


def _up(x: float) -> float:
    x = max(x, KL_RESOLUTION)
    step = 10.0 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(x / step - 1e-9) * step, 12)


def _by_dataset(samples: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for s in samples:
        out.setdefault(s["dataset"], []).append(s)
    return out


def propose(doc: dict, limits: list[int | None] = (None,), level: float = LEVEL) -> tuple[list[dict], list[str]]:
    """Per case with samples: model, variant, measured scores and the proposed bounds; and warnings."""
    report_limit = doc.get("settings", {}).get("limit")
    out, warnings = [], []
    for limit in limits:
        if limit is not None and report_limit is not None and limit > report_limit:
            warnings.append(f"the report scored {report_limit} prompt(s) per dataset: runs of {limit} drawn from them "
                            f"cannot show the spread of {limit} distinct prompts (use a report of the full set)")
    for record in doc["cases"]:
        samples = [s for s in record.get("samples") or [] if s.get("n_tokens")]
        if (why := report.unusable(record)) is not None:  # e.g. NaN logits scored as acc@1 0.0: no floor to learn
            warnings.append(f"{record['id']}: no floor proposed: {why}")
            continue
        if not samples:
            warnings.append(f"{record['id']}: no scored sample, no floor proposed")
            continue
        if not record.get("model") or not record.get("variant"):
            warnings.append(f"{record['id']}: the record names no model or variant (an older report?), no floor "
                            f"proposed")
            continue
        if record.get("failures"):
            warnings.append(f"{record['id']}: failed in this run ({'; '.join(record['failures'])}): its floors are "
                            f"proposed from what it measured")
        groups = _by_dataset(samples)
        lone = [name for name, group in groups.items() if len(group) < 2]
        if lone:
            warnings.append(f"one prompt only of {', '.join(lone)} in the report: no spread to draw from there, the "
                            "floors are near the measured values (use a report with more prompts per dataset)")
        bounds, measured = {}, {}
        for metric in stats.METRICS:
            per = {name: stats.sums(group, metric) for name, group in groups.items()}
            if any(v is None for v in per.values()):
                continue  # the method does not measure it
            higher = metric in metrics.HIGHER_IS_BETTER
            everything = stats.sums(samples, metric)
            measured[metric] = float(everything[0].sum() / everything[1].sum())
            candidates = []
            for limit in limits:
                size = [len(v[0]) if limit is None else min(limit, len(v[0])) for v in per.values()]
                runs = stats.stratified(list(per.values()), size)
                candidates.append(float(np.quantile(runs, 1 - level if higher else level)))
                first = stats.sums([s for s in samples if limit is None or s["index"] < limit], metric)
                if first is not None:  # (None: every one of the first prompts was skipped)
                    candidates.append(float(first[0].sum() / first[1].sum()))
            bounds[metric] = _down(min(candidates)) if higher else _up(max(candidates))
        out.append({"id": record["id"], "model": record.get("model"), "variant": record.get("variant"),
                    "n_samples": len(samples), "measured": measured, "floors": bounds})
    return out, warnings


def yaml(proposals: list[dict], warnings: list[str], source: str, limits: list[int | None], level: float) -> str:
    """The suite's ``floors:`` section (model -> variant -> bounds) with the rule and warnings as comments."""
    sizes = ", ".join("all" if n is None else str(n) for n in limits)
    lines = [
        f"# Floors proposed by fidbench floors from {source},",
        f"# for runs of {sizes} prompt(s) per dataset (all: as many as the report holds).",
        f"# Rule: {stats.RESAMPLES} bootstrap runs per size draw that many of each dataset's prompts in the report",
        f"# (with replacement, seed {stats.SEED}); acc1/acc5 floor = their {1 - level:.0%} quantile, kl_mean ceiling"
        f" = their {level:.0%} quantile",
        "# (a one-sided bound at that level), never stricter than the report's first N prompts (what",
        "# --fidbench-limit N runs); the most lenient over the sizes, rounded outward (acc down to 0.01,",
        f"# KL up to 2 significant digits, at least {KL_RESOLUTION:g}).",
        "# Paste as the suite's floors: section (per model and variant; it overrides the variants' own floors).",
        *("\n#   ".join(textwrap.wrap(f"# warning: {w}", 116)) for w in dict.fromkeys(warnings)),
        "floors:",
    ]
    models: dict[str, list[dict]] = {}
    for p in proposals:
        models.setdefault(p["model"], []).append(p)
    for model, props in models.items():
        lines.append(f"  {model}:")
        width = max(len(p["variant"]) for p in props)
        for p in props:
            bounds = ", ".join(f"{k}: {v!r}" for k, v in p["floors"].items())
            seen = " ".join(f"{k} {v:.4f}" for k, v in p["measured"].items())
            name = f"{p['variant']}:"
            lines.append(f"    {name:<{width + 1}} {{{bounds}}}  # measured {seen} ({p['n_samples']} prompts)")
    return "\n".join(lines)
