"""A stack's loss, attributed to its members: for each member, the stack against that member alone
(what the other members add to it) and against the stack without it (leave-one-out: what the member costs
inside the stack), as paired changes over the prompts both cases scored, with bootstrap intervals
(``stats.paired``).

Cases are matched within one report and one model by what ran, not by name: a case is the tuple of its
members' (method, full parameters) in the order the stack applied them (``kept["members"]``), a single
method the tuple of itself. A comparison whose partner case is not in the report is left out and listed.
"""

from __future__ import annotations

import json

from . import stats

METRICS = (("acc1", "acc@1", "{:.3f}"), ("kl_mean", "KL mean", "{:.4f}"))


def _member(method: str, params: dict) -> tuple[str, str]:
    return method, json.dumps(params, sort_keys=True)


def signature(record: dict) -> tuple | None:
    """What a case ran: its members' (method, parameters) in order; None for a case that recorded no members."""
    if record.get("method") != "stack":
        return (_member(record["method"], record.get("params") or {}),) if record.get("method") else None
    members = (record.get("kept") or {}).get("members")
    return tuple(_member(m["method"], m["params"]) for m in members) if members else None


def _matched(base: dict, new: dict) -> tuple[list, list]:
    """The samples both cases scored, in one order (``stats.paired`` pairs them by position)."""
    key = lambda s: (s["dataset"], s["index"])  # noqa: E731
    theirs = {key(s): s for s in base.get("samples") or []}
    pairs = [(theirs[key(s)], s) for s in new.get("samples") or [] if key(s) in theirs]
    return [b for b, _ in pairs], [n for _, n in pairs]


def attribute(records: list[dict], level: float = stats.LEVEL) -> tuple[list[dict], list[str]]:
    """One row per stack member: the stack against the member alone and against the stack without it, per metric
    (``stats.paired`` results, None where the partner case is missing); and a line per missing partner."""
    by_signature = {(r.get("model"), signature(r)): r for r in records if signature(r)}
    rows, missing = [], []
    for stack in records:
        members = signature(stack) if stack.get("method") == "stack" else None
        if not members:
            continue
        names = [m["method"] for m in stack["kept"]["members"]]
        for i, name in enumerate(names):
            row = {"stack": stack["id"], "member": name}
            for label, partner in (("alone", members[i : i + 1]), ("without", members[:i] + members[i + 1 :])):
                other = by_signature.get((stack.get("model"), partner))
                row[label] = None if other is None else other["id"]
                if other is None:
                    missing.append(f"{stack['id']}: no case runs {name} {label}")
                    continue
                base, new = _matched(other, stack)
                for metric, _, _ in METRICS:
                    row[f"{label}_{metric}"] = stats.paired(base, new, metric, level)
            rows.append(row)
    return rows, missing


def _change(fmt: str, change: dict | None) -> str:
    if change is None:
        return "-"
    text = f"{fmt.format(change['base'])} → {fmt.format(change['new'])}: {change['diff']:+.4g}"
    ci = change.get("ci")
    return text + (f" [{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "")


def table(records: list[dict], markdown: bool = False, level: float = stats.LEVEL) -> str:
    """The attribution rows of a report's stacks, or an empty string when it has none."""
    rows, missing = attribute(records, level)
    if not rows:
        return ""
    header = ["stack", "member", "vs member alone", *(f"{t} (alone → stack)" for _, t, _ in METRICS),
              "vs stack without it", *(f"{t} (without → stack)" for _, t, _ in METRICS)]
    body = [[r["stack"], r["member"], r["alone"] or "-",
             *(_change(fmt, r.get(f"alone_{m}")) for m, _, fmt in METRICS), r["without"] or "-",
             *(_change(fmt, r.get(f"without_{m}")) for m, _, fmt in METRICS)] for r in rows]
    note = [f"change stack − other case over the prompts both scored, [{level:.0%} paired bootstrap interval]; "
            f"'without → stack' is what the member costs inside the stack",
            *(f"missing: {m}" for m in missing)]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in [header, ["---"] * len(header), *body]]
        return "\n".join(["", *lines, "", *note])
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *body]]
    return "\n".join(["", "stack attribution", *lines, *note])
