"""Every metric fidbench reports, declared once; each list that needs metrics is derived from ``METRICS``.

A declaration says how a score reads and where it goes: its better direction (a floor's direction; None for a
score that describes the base model and takes no floor), the values it can take, whether a case's value is
pooled over all its scored positions (``tokens``) or a mean over samples (``samples``), whether the report gives
it a bootstrap interval (and ``fidbench compare`` a paired one), its column in the results table, whether JUnit
XML carries it, and a line defining it (the README's metric table is generated from those lines).

``kind`` says what computes it (``metrics``): ``teacher`` from the teacher-forced logits (``_summarize``),
``free_run`` from the method's own greedy text (``free_run``), ``answers`` from a task's answers
(``answer_scores``). Adding a metric is one entry here plus its computation; tests/test_metric_table.py fails
while the two disagree or the README's table is stale (``python -m fidbench.metric_table README.md`` rewrites it).
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

FRACTION = (0.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str  # teacher | free_run | answers: what computes it
    better: str | None  # higher | lower: the floor's direction; None: describes the base, takes no floor
    range: tuple[float, float]  # the values it can take (a floor outside it is an error)
    pooled: str  # tokens: over all scored positions of a case; samples: a mean of per-sample values
    doc: str  # its definition, one line of markdown
    interval: bool = False  # bootstrap interval in the report (``ci``), paired interval in ``fidbench compare``
    column: tuple[str, str] | None = None  # (header, format) in the results table
    junit: bool = False  # a JUnit XML property (and a pytest-benchmark extra_info field) of every case

    def __post_init__(self):
        checks = {"kind": (self.kind, ("teacher", "free_run", "answers")),
                  "better": (self.better, ("higher", "lower", None)), "pooled": (self.pooled, ("tokens", "samples"))}
        for field, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"metric {self.name}: {field} must be one of {allowed}, got {value!r}")


_KL = "KL(base ‖ method) per position"
METRICS = (
    Metric("acc1", "teacher", "higher", FRACTION, "tokens", "fraction of positions where the method's argmax is the "
           "base token",
           interval=True, column=("acc@1", "{:.4f}"), junit=True),
    Metric("acc5", "teacher", "higher", FRACTION, "tokens", "fraction of positions where the base token is in the "
           "method's top 5", interval=True, column=("acc@5", "{:.4f}"), junit=True),
    Metric("kl_mean", "teacher", "lower", NON_NEGATIVE, "tokens", f"{_KL}, its mean over all positions (Dutta et al. "
           "2024 show KL tracks answer flips that accuracy misses)",
           interval=True, column=("KL", "{:.4f}"), junit=True),
    Metric("kl_median", "teacher", "lower", NON_NEGATIVE, "tokens", f"{_KL}, its median over all positions (as "
           "llama.cpp's `--kl-divergence` reports its percentiles)"),
    Metric("kl_p90", "teacher", "lower", NON_NEGATIVE, "tokens", f"{_KL}, its 90th percentile over all positions"),
    Metric("kl_p95", "teacher", "lower", NON_NEGATIVE, "tokens", f"{_KL}, its 95th percentile over all positions"),
    Metric("kl_p99", "teacher", "lower", NON_NEGATIVE, "tokens", f"{_KL}, its 99th percentile over all positions",
           column=("KL p99", "{:.3f}"), junit=True),
    Metric("kl_p999", "teacher", "lower", NON_NEGATIVE, "tokens", f"{_KL}, its 99.9th percentile over all positions"),
    Metric("kl_max", "teacher", "lower", NON_NEGATIVE, "tokens", f"{_KL}, its maximum over all positions"),
    Metric("nll", "teacher", "lower", NON_NEGATIVE, "tokens", "mean negative log-likelihood of the base tokens under "
           "the method", junit=True),
    Metric("nll_base", "teacher", None, NON_NEGATIVE, "tokens", "the same under the base model"),
    Metric("nll_ratio", "teacher", "lower", NON_NEGATIVE, "tokens", "`nll / nll_base`",
           column=("NLL×", "{:.3f}"), junit=True),
    Metric("ppl", "teacher", "lower", (1.0, math.inf), "tokens", "exp of `nll`: on a `text` dataset the text's "
           "perplexity under the method (on generated references, the perplexity of the base's own continuation)",
           column=("PPL", "{:.3f}")),
    Metric("ppl_base", "teacher", None, (1.0, math.inf), "tokens", "exp of `nll_base`, the same under the base"),
    Metric("ppl_ratio", "teacher", "lower", NON_NEGATIVE, "tokens", "`ppl / ppl_base`", column=("PPL×", "{:.3f}")),
    Metric("first_divergence", "teacher", "higher", NON_NEGATIVE, "samples", "index of the first top-1 mismatch, "
           "averaged over samples = how many tokens a greedy run of the method would reproduce exactly",
           column=("1st div", "{:.1f}"), junit=True),
    Metric("exact_match", "teacher", "higher", FRACTION, "samples", "fraction of samples with no mismatch at all",
           junit=True),
    Metric("rouge_l", "free_run", "higher", FRACTION, "samples", "free-running: ROUGE-L F1 between the method's "
           "and the base's texts", interval=True, column=("ROUGE-L", "{:.3f}"), junit=True),
    Metric("rouge_l_ids", "free_run", "higher", FRACTION, "samples", "free-running: ROUGE-L F1 on the token ids",
           interval=True, junit=True),
    Metric("edit_distance", "free_run", "lower", FRACTION, "samples", "free-running: token Levenshtein distance / "
           "the longer length", interval=True, column=("edit", "{:.3f}"), junit=True),
    Metric("common_prefix", "free_run", "higher", NON_NEGATIVE, "samples", "free-running: tokens equal from the "
           "start", interval=True, junit=True),
    Metric("answer_recall", "free_run", "higher", FRACTION, "samples", "free-running, where a prompt has `answers`: "
           "the share of them the method's text contains", interval=True, junit=True),
    Metric("answer_recall_base", "free_run", None, FRACTION, "samples", "the same for the base's text", junit=True),
    Metric("answers_in_base", "answers", None, FRACTION, "samples", "where a prompt has `answers`: the share of them "
           "the base's reference holds", column=("ans in base", "{:.2f}")),
    Metric("answers_reproduced", "answers", "higher", FRACTION, "samples", "the share of those the method's "
           "teacher-forced argmax writes token for token at their positions", column=("ans reproduced", "{:.2f}")),
)
BY_NAME = {m.name: m for m in METRICS}


def names(**where) -> tuple[str, ...]:
    """The names of the metrics whose fields equal ``where`` (``names(kind="free_run")``), in declaration order."""
    return tuple(m.name for m in METRICS if all(getattr(m, k) == v for k, v in where.items()))


def columns(kind: str) -> list[tuple[str, str, str]]:
    """The results table's (metric, header, format) columns of the metrics of ``kind``."""
    return [(m.name, *m.column) for m in METRICS if m.kind == kind and m.column]


def _bound(x: float) -> str:
    return "∞" if x == math.inf else f"{x:g}"


def markdown() -> str:
    """The README's metric table: one row per metric."""
    rows = ["| metric | better | range | pooled over | interval | JUnit | definition |", "|---" * 7 + "|"]
    for m in METRICS:
        cells = [f"`{m.name}`", m.better or "none: describes the base", f"[{_bound(m.range[0])}, {_bound(m.range[1])}]",
                 m.pooled, "yes" if m.interval else "", "yes" if m.junit else "", m.doc]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


BEGIN, END = "<!-- metric table: python -m fidbench.metric_table README.md -->", "<!-- end of metric table -->"


def _find(text: str) -> re.Match:
    found = re.search(f"{re.escape(BEGIN)}\n(.*?){re.escape(END)}", text, re.DOTALL)
    if found is None:
        raise ValueError(f"no metric table between {BEGIN!r} and {END!r}")
    return found


def section(text: str) -> str:
    """The generated metric table in ``text`` (a README), between its markers."""
    return _find(text).group(1).rstrip("\n")


if __name__ == "__main__":  # rewrite the metric table of the file named
    path = Path(sys.argv[1])
    text = path.read_text()
    found = _find(text)
    path.write_text(f"{text[: found.start()]}{BEGIN}\n{markdown()}\n{END}{text[found.end():]}")
