"""``fidbench merge a.json b.json ... -o all.json``: one report from the reports of shards of a run.

Cases are unioned in the suite's order (read from the settings' suite file when it is there, else in the
order the reports list them). A case in two reports must be the same record. Reports of another base model
(fingerprint), other settings, other library versions or another commit are refused unless forced; each
shard's own environment (machine, versions) is kept under ``merged_from``.

Shards (``settings.shard``, ``I/N``) must be distinct shards of one N: the same shard twice is an error (one of
the files is not the report it is named for), and a merge missing shards says which. The merged settings
record them as ``shards``: ``{"of": N, "merged": [I, ...], "missing": [I, ...]}``.
"""

from __future__ import annotations

import json

from . import provenance
from .suite import SuiteError, load


class MergeError(ValueError):
    pass


def _suite_order(settings: dict) -> list[str] | None:
    path = settings.get("suite")
    if not path:
        return None
    try:
        return [case.id for case in load(path).cases()]
    except SuiteError:
        return None


def _shards(docs: dict[str, dict]) -> tuple[dict | None, list[str]]:
    """The shards merged (None when no report is a shard's) and what differs between them; the same shard twice
    is a ``MergeError``. A merged report's ``shards`` count as the shards they hold."""
    seen: dict[tuple[int, int], str] = {}
    for name, doc in docs.items():
        settings = doc.get("settings") or {}
        held = settings.get("shards")
        if isinstance(held, dict):
            held = [f"{i}/{held.get('of')}" for i in held.get("merged") or []]
        else:
            held = [settings["shard"]] if settings.get("shard") is not None else []
        for shard in held:
            i, _, n = str(shard).partition("/")
            if not (i.isdigit() and n.isdigit()):
                raise MergeError(f"{name}: settings.shard {shard!r} is not I/N")
            if (int(i), int(n)) in seen:
                raise MergeError(f"{seen[int(i), int(n)]} and {name} both hold shard {shard}: the same shard twice "
                                 f"(is one file another shard's report, copied or misnamed?)")
            seen[int(i), int(n)] = name
    if not seen:
        return None, []
    counts = sorted({n for _, n in seen})
    unsharded = [name for name, doc in docs.items()
                 if not ({"shard", "shards"} & set(doc.get("settings") or {}))]
    differ = []
    if len(counts) > 1:
        differ.append("shard counts: " + ", ".join(f"{i}/{n} in {name}" for (i, n), name in seen.items()))
    differ += [f"{name} is not a shard's report; the others are shards of {counts[0]}" for name in unsharded]
    merged = sorted(i for i, n in seen if n == counts[-1])
    return {"of": counts[-1], "merged": merged, "missing": sorted(set(range(1, counts[-1] + 1)) - set(merged))}, differ


def merge(docs: dict[str, dict], force: bool = False) -> tuple[dict, list[str]]:
    """The merged document and notes for the user; ``docs`` maps a report's name (its path) to its document."""
    if len(docs) < 2:
        raise MergeError("give at least two reports to merge")
    formats = {name: doc.get("format") for name, doc in docs.items()}
    differ = provenance.differences(docs)
    if len(set(formats.values())) > 1:
        differ.insert(0, "report format: " + ", ".join(f"{n} {f}" for n, f in formats.items()))
    shards, more = _shards(docs)
    differ += more
    notes = [f"forced despite a difference: {d}" for d in differ]
    if shards and shards["missing"]:
        notes.append(f"shard(s) {', '.join(str(i) for i in shards['missing'])} of {shards['of']} missing: the merged "
                     f"report holds part of the run (settings.shards)")
    if differ and not force:
        raise MergeError("the reports are not of one run (--force merges them anyway):\n  " + "\n  ".join(differ))
    records: dict[str, dict] = {}
    where: dict[str, str] = {}
    for name, doc in docs.items():
        for record in doc["cases"]:
            case_id = record["id"]
            if case_id in records:
                if json.dumps(records[case_id], sort_keys=True) != json.dumps(record, sort_keys=True):
                    raise MergeError(f"case {case_id} is in {where[case_id]} and {name} with different records")
                notes.append(f"case {case_id} is in {where[case_id]} and {name} (identical): kept once")
                continue
            records[case_id], where[case_id] = record, name
    first = next(iter(docs.values()))
    settings = {k: v for k, v in first.get("settings", {}).items() if k not in ("shard", "shards")}
    if shards:
        settings["shards"] = shards
    order = _suite_order(settings)
    if order is None:
        notes.append(f"suite file {settings.get('suite')!r} not readable here: cases kept in the reports' order")
        order = list(records)
    rank = {case_id: i for i, case_id in enumerate(order)}
    cases = sorted(records.values(), key=lambda r: rank.get(r["id"], len(rank)))  # stable: unknown ids keep their order
    merged = {
        "format": first.get("format"),
        "environment": first.get("environment"),
        "settings": settings,
        "merged_from": [{"report": name, "environment": doc.get("environment"), "settings": doc.get("settings"),
                         "cases": [r["id"] for r in doc["cases"]]} for name, doc in docs.items()],
        "cases": cases,
    }
    return merged, notes
