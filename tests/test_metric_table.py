"""The metric declarations agree with what is computed: every score a summary holds is declared and every declared
one is scored, each by what its ``kind`` says; declared intervals and poolings are what the report computes; the
README's metric table is the generated one."""

import textwrap

import pytest
import torch
from helpers import ROOT

from fidbench import metric_table, metrics, stats
from fidbench.metric_table import Metric, names

VOCAB = ["The", " cat", " sat", " on", " the", " mat", "."]


class Words:
    """A tokenizer whose ids are VOCAB's words."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(VOCAB[i] for i in ids)


def sample(hits: list[bool], free: bool, answers: bool) -> metrics.SampleScores:
    n = len(hits)
    hit1 = torch.tensor(hits)
    s = metrics.SampleScores(hit1, torch.ones(n, dtype=torch.bool), torch.linspace(0, 1, n).double(),
                             torch.full((n,), 2.0).double(), torch.ones(n).double())
    g_ids, ids = [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 6]
    text = Words().decode
    if free:
        s.free = metrics.free_run(g_ids, ids, text(g_ids), text(ids), answers=["cat", "mat"] if answers else None)
    if answers:
        s.answers = metrics.answer_scores(Words(), g_ids, torch.ones(6, dtype=torch.bool), ["cat", "mat", "dog"])
    return s


def scored(summary: dict) -> list[str]:
    """The metrics a summary holds a number for, in its order."""
    return [k for k, v in summary.items() if k not in ("n_samples", "n_tokens", "acc1_by_position") and v is not None]


def disagreement() -> tuple[list[str], list[str]]:
    """(declared but never scored, scored but not declared) on a sample that measures everything."""
    got = scored(metrics.aggregate([sample([True, False, True], free=True, answers=True)]))
    return [m for m in names() if m not in got], [m for m in got if m not in names()]


def test_every_scored_metric_is_declared_and_every_declared_metric_is_scored_by_its_kind():
    assert disagreement() == ([], []), "metric_table.METRICS and metrics disagree: (declared only, scored only)"
    assert scored(metrics.aggregate([sample([True, False, True], free=True, answers=True)])) == list(names())
    teacher = names(kind="teacher")
    assert scored(metrics.aggregate([sample([True, True], free=False, answers=False)])) == list(teacher)
    assert scored(metrics.aggregate([sample([True], free=True, answers=False)])) == [
        *teacher, *(m for m in names(kind="free_run") if not m.startswith("answer_"))]  # recall needs answers
    assert scored(metrics.aggregate([sample([True], free=False, answers=True)])) == [*teacher, *names(kind="answers")]
    assert set(metrics.free_run([1], [1], "a", "a")) == set(names(kind="free_run"))
    # a summary of nothing, and a method's own partial scores, hold every declared metric (as None)
    nothing = metrics.aggregate([])
    assert set(nothing) - {"n_samples", "n_tokens", "acc1_by_position"} == set(names())
    partial = metrics.PartialScores.of({"n_tokens": 4, "acc1": 0.5}, "m").summary()
    assert set(partial) - {"n_samples", "n_tokens", "acc1_by_position"} == set(names())


def test_declared_poolings_and_intervals_are_what_the_report_computes():
    """A case's value of an interval metric is its samples' values pooled as declared: token-weighted or a plain
    mean of samples; and the report's ``ci`` holds exactly the declared intervals."""
    samples = [sample([True] * 3 + [False] * 5, free=True, answers=True),
               sample([True, True], free=True, answers=True), sample([False] * 4, free=True, answers=True)]
    samples[1].free = {**samples[1].free, "rouge_l": 0.25, "edit_distance": 0.5, "common_prefix": 1}
    case = metrics.aggregate(samples)
    records = [s.summary() for s in samples]
    for name in names(interval=True):
        values = [r[name] for r in records]
        weights = [r["n_tokens"] if metric_table.BY_NAME[name].pooled == "tokens" else 1 for r in records]
        assert case[name] == pytest.approx(sum(v * w for v, w in zip(values, weights)) / sum(weights)), name
        total, weight = stats.sums(records, name)
        assert case[name] == pytest.approx(total.sum() / weight.sum()), name
    assert set(stats.intervals(records)) == set(names(interval=True))
    assert all(ci is not None for ci in stats.intervals(records).values())


def test_a_declaration_with_an_unknown_field_value_is_an_error():
    with pytest.raises(ValueError, match="metric acc9: better must be one of"):
        Metric("acc9", "teacher", "up", metric_table.FRACTION, "tokens", "a typo")


def test_the_readme_s_metric_example_is_a_declaration_the_tests_then_require_computed(monkeypatch):
    """The README's "Adding a metric" example, as printed: a valid declaration, and one this file's check
    reports as declared but never scored until metrics.py computes it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Adding a metric"):]
    code = section[section.index("```python") + len("```python"):]
    declared = eval(textwrap.dedent(code[: code.index("```")]), vars(metric_table))
    assert isinstance(declared, Metric) and declared.name not in names()
    monkeypatch.setattr(metric_table, "METRICS", (*metric_table.METRICS, declared))
    assert disagreement() == ([declared.name], [])


def test_the_readme_metric_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert metric_table.section(readme) == metric_table.markdown(), (
        "README.md's metric table is stale: run `python -m fidbench.metric_table README.md`")
