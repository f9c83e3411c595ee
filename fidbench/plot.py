"""``fidbench plot report.json -o DIR``: figures of a report (PNG and SVG) and ``index.html`` that puts them
with the results table.

- ``budget``: acc@1 and KL mean against the KV entries kept, one line per method through its variants (the
  trade-off a budget buys), with the bootstrap intervals as error bars and ``origin`` as the ceiling.
- ``position``: acc@1 by reference position (bins of ``metrics.POSITION_BUCKET`` tokens), one line per case.
- ``heatmap``: acc@1 per case (rows) and dataset (columns).
- ``stacks``: what each member of a stack costs (``fidbench.attribution``).
- ``frontier``: a ``fidbench frontier`` search, fidelity against the parameter with the floor and the frontier.

matplotlib is an optional dependency (``pip install 'fidbench[plot]'``); figures are built as
``matplotlib.figure.Figure`` objects, without pyplot's global state.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from . import attribution, metrics, report


class PlotError(RuntimeError):
    pass


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'fidbench[plot]' (or matplotlib)") from None
    return Figure(**kwargs)


def _scored(records: list[dict]) -> list[dict]:
    return [r for r in records if (r.get("scores") or {}).get("n_tokens")]


def _labels(records: list[dict]) -> dict[str, str]:
    """A case's label: its variant, or model/variant when the report holds several models."""
    many = len({r.get("model") for r in records}) > 1
    return {r["id"]: f"{r['model']}/{r['variant']}" if many else r["variant"] for r in records}


def _yerr(points: list[dict], metric: str):
    """Asymmetric error bars from the records' intervals (zero where a record has none)."""
    lo, hi = [], []
    for p in points:
        ci = (p.get("ci") or {}).get(metric)
        value = p["scores"][metric]
        lo.append(value - ci[0] if ci else 0.0)
        hi.append(ci[1] - value if ci else 0.0)
    return [lo, hi]


def budget(records: list[dict]):
    """acc@1 and KL mean against ``kept.kv_fraction``, one line per (model,) method; None when no case
    reports a KV fraction."""
    records = _scored(records)
    lines: dict[str, list[dict]] = {}
    many = len({r.get("model") for r in records}) > 1
    for r in records:
        if (r.get("kept") or {}).get("kv_fraction") is not None:
            lines.setdefault(f"{r['model']}/{r['method']}" if many else r["method"], []).append(r)
    if not lines:
        return None
    fig = _figure(figsize=(11, 4.4), layout="constrained")
    acc, kl = fig.subplots(1, 2)
    for label, points in lines.items():
        points.sort(key=lambda r: r["kept"]["kv_fraction"])
        xs = [r["kept"]["kv_fraction"] for r in points]
        for ax, metric in ((acc, "acc1"), (kl, "kl_mean")):
            ys = [r["scores"][metric] for r in points]
            (line,) = ax.plot(xs, ys, marker="o", label=label)
            ax.errorbar(xs, ys, yerr=_yerr(points, metric), fmt="none", ecolor=line.get_color(), capsize=3)
    for r in records:  # the base through the engine: acc@1's ceiling (its KL, ~0, would only stretch a log axis)
        if r["method"] == "origin":
            acc.axhline(r["scores"]["acc1"], color="grey", linestyle="--", label=_labels(records)[r["id"]])
    acc.set(xlabel="KV entries kept (fraction visible to decode queries)", ylabel="acc@1", ylim=(0, 1.02))
    kl.set(xlabel="KV entries kept (fraction visible to decode queries)", ylabel="KL(base ‖ method), mean")
    if all(y > 0 for line in kl.get_lines() for y in line.get_ydata()):
        kl.set_yscale("log")
    acc.legend(fontsize="small")
    fig.suptitle("Fidelity against KV budget (error bars: bootstrap interval over samples)")
    return fig


def position(records: list[dict]):
    """acc@1 by reference position, one line per case that measured it; None when none did."""
    records = [r for r in _scored(records) if r["scores"].get("acc1_by_position")]
    if not records:
        return None
    fig = _figure(figsize=(11, 4.4), layout="constrained")
    ax = fig.subplots()
    labels = _labels(records)
    for i, r in enumerate(records):
        bins = r["scores"]["acc1_by_position"]
        style = ("-", "--", ":", "-.")[i // 10 % 4]  # a new line style each time the 10 colours come round
        ax.plot([j * metrics.POSITION_BUCKET for j in range(len(bins))], bins, marker=".", linestyle=style,
                label=labels[r["id"]])
    ax.set(xlabel=f"reference position (start of each bin of {metrics.POSITION_BUCKET} tokens)", ylabel="acc@1",
           ylim=(0, 1.02), title="acc@1 by position in the reference")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(records) // 16)
    return fig


def heatmap(records: list[dict]):
    """acc@1 per case (rows) and dataset (columns); blank where a case did not score a dataset."""
    records = _scored(records)
    if not records:
        return None
    datasets = list(dict.fromkeys(name for r in records for name in r.get("datasets", {})))
    matrix = [[((r["datasets"].get(d) or {}).get("acc1") if (r["datasets"].get(d) or {}).get("n_tokens") else None)
               for d in datasets] for r in records]
    values = [[math.nan if v is None else v for v in row] for row in matrix]
    fig = _figure(figsize=(1.4 + 1.1 * len(datasets), 1.2 + 0.36 * len(records)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    labels = _labels(records)
    ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
    ax.set_yticks(range(len(records)), [labels[r["id"]] for r in records])
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize="small",
                        color="black" if v > 0.6 else "white")
    fig.colorbar(image, ax=ax, label="acc@1")
    ax.set_title("acc@1 by case and dataset")
    return fig


def stacks(records: list[dict]):
    """Each stack member's share of the stack's loss (``fidbench.attribution``): the change of acc@1 and KL mean
    from the stack without the member to the stack (what the member costs inside it) and from the member alone
    to the stack, with paired bootstrap intervals; None when the report holds no stack with its partners."""
    rows = [r for r in attribution.attribute(records)[0] if r.get("without") or r.get("alone")]
    if not rows:
        return None
    fig = _figure(figsize=(11, 1.6 + 0.45 * len(rows)), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    labels = [f"{r['stack']}: {r['member']}" for r in rows]
    for ax, (metric, title, _) in zip(axes, attribution.METRICS):
        sides = (("without", "stack − stack without it"), ("alone", "stack − member alone"))
        for k, (key, name) in enumerate(sides):
            ys = [i + (k - 0.5) * 0.36 for i in range(len(rows))]
            changes = [r.get(f"{key}_{metric}") for r in rows]
            xs = [c["diff"] if c else math.nan for c in changes]
            err = [[c["diff"] - c["ci"][0] if c and c["ci"] else 0.0 for c in changes],
                   [c["ci"][1] - c["diff"] if c and c["ci"] else 0.0 for c in changes]]
            ax.barh(ys, xs, height=0.34, xerr=err, capsize=3, label=name)
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set(xlabel=f"change of {title}")
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize="small")
    fig.suptitle("Stacks: what each member costs (error bars: paired bootstrap interval)")
    return fig


def frontier(results: list[dict]):
    """Per frontier search (``fidbench frontier -o``): each floored metric against the searched parameter, the
    probes' point estimates and bounds, the floor and the chosen value; None for a report without a search."""
    panels = [(r, m) for r in results for m in r["floors"]]
    if not panels:
        return None
    fig = _figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (r, metric) in zip(axes, panels):
        probes = sorted(r["probes"], key=lambda p: p["value"])
        xs = [p["value"] for p in probes]
        ax.plot(xs, [p["scores"][metric] for p in probes], marker="o", label="point estimate")
        ax.plot(xs, [p["bounds"][metric] for p in probes], marker="v", linestyle=":", label="bootstrap bound")
        ax.axhline(r["floors"][metric], color="red", linestyle="--", label="floor")
        if r["frontier"] is not None:
            ax.axvline(r["frontier"], color="green", label=f"frontier {r['frontier']:g}")
        ax.set(xlabel=r["param"], ylabel=metric, title=r["variant"])
        ax.legend(fontsize="small")
    fig.suptitle("Frontier: fidelity against the searched parameter")
    return fig


FIGURES = {  # name -> (builder, title on the page, the report's key it draws)
    "budget": (budget, "Fidelity against KV budget", "cases"),
    "position": (position, "acc@1 by position", "cases"),
    "heatmap": (heatmap, "acc@1 by case and dataset", "cases"),
    "stacks": (stacks, "Stacks: what each member costs", "cases"),
    "frontier": (frontier, "Frontier of a parameter", "frontier"),
}


def _html_table(markdown: str) -> str:
    """The Markdown table of ``report.table`` as HTML (cells escaped), with its footnote."""
    body, _, note = markdown.partition("\n\n")
    rows = [[html.escape(c.strip()) for c in line.strip().strip("|").split("|")] for line in body.splitlines()]
    head = "".join(f"<th>{c}</th>" for c in rows[0])
    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in rows[2:])
    return (f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{cells}</tbody>\n</table>\n"
            + (f"<p class='note'>{html.escape(note)}</p>\n" if note else ""))


STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
td:first-child,th:first-child,td:nth-child(2){text-align:left}thead{background:#f2f2f2}.note,.meta{color:#555}"""


def page(doc: dict, source: str, drawn: set[str]) -> str:
    """index.html: what ran, the figures (SVG, with a PNG link) and the results table."""
    env = doc.get("environment") or {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    settings = ", ".join(f"{k}: {v}" for k, v in (doc.get("settings") or {}).items())
    parts = ["<!doctype html>",
             f"<html lang='en'><head><meta charset='utf-8'><title>fidbench: {html.escape(source)}</title>",
             f"<style>{STYLE}</style></head><body>", f"<h1>fidbench report: {html.escape(source)}</h1>",
             f"<p class='meta'>{html.escape(settings)}<br>commit {html.escape(str(env.get('commit')))}"
             f"{' (uncommitted changes)' if env.get('dirty') else ''}; {html.escape(versions)}</p>"]
    for name, (_, title, _) in FIGURES.items():
        parts.append(f"<h2>{title}</h2>")
        if name in drawn:
            parts.append(f"<figure><img src='{name}.svg' alt='{title}'><figcaption><a href='{name}.png'>PNG</a> · "
                         f"<a href='{name}.svg'>SVG</a></figcaption></figure>")
        else:
            parts.append("<p class='note'>No case in this report measured what this figure shows.</p>")
    records = doc["cases"]
    parts += ["<h2>Results</h2>", _html_table(report.table(records, datasets=False, markdown=True)),
              "<details><summary>per dataset</summary>", _html_table(report.table(records, markdown=True)),
              "</details></body></html>"]
    return "\n".join(parts)


def write(doc: dict, outdir: str | Path, source: str) -> list[Path]:
    """Every figure as PNG and SVG, and index.html, under ``outdir``; the paths written."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths, drawn = [], set()
    for name, (build, _, key) in FIGURES.items():
        fig = build(doc.get(key) or [])
        if fig is None:
            continue
        for ext in ("png", "svg"):
            fig.savefig(outdir / f"{name}.{ext}", dpi=120)
            paths.append(outdir / f"{name}.{ext}")
        drawn.add(name)
    index = outdir / "index.html"
    index.write_text(page(doc, source, drawn))
    return [*paths, index]
