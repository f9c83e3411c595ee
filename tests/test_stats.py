"""Bootstrap intervals over samples (fidbench/stats.py) and the ones in case records and the results table."""

import numpy as np
import pytest
import torch
from helpers import ROOT, save_tiny

from fidbench import metrics, report, stats
from fidbench.harness import Bench
from fidbench.suite import load


def scores(n_tokens: int, p: float, seed: int) -> metrics.SampleScores:
    g = torch.Generator().manual_seed(seed)
    hit1 = torch.rand(n_tokens, generator=g) < p
    hit5 = hit1 | (torch.rand(n_tokens, generator=g) < 0.5)
    kl = torch.rand(n_tokens, generator=g, dtype=torch.float64) * (~hit1)
    return metrics.SampleScores(hit1, hit5, kl, kl + 1, torch.ones(n_tokens, dtype=torch.float64))


def row(s: metrics.SampleScores) -> dict:
    return {k: v for k, v in s.summary().items() if k not in ("n_samples", "acc1_by_position")}


def test_interval_is_the_bootstrap_of_the_pooled_positions():
    """Sums from the sample rows give exactly the token-weighted means that resampling the positions gives."""
    samples = [scores(n, p, seed) for seed, (n, p) in enumerate([(5, 0.2), (64, 0.9), (17, 0.5), (40, 0.7), (1, 1.0)])]
    rows = [row(s) for s in samples]
    idx = stats.draws(len(samples), len(samples))
    for metric, field in (("acc1", "hit1"), ("acc5", "hit5"), ("kl_mean", "kl")):
        pooled = [torch.cat([getattr(samples[i], field) for i in draw]).double().mean().item() for draw in idx]
        assert stats.interval(rows, metric) == pytest.approx(list(np.quantile(pooled, [0.025, 0.975])), abs=1e-12)
        total, tokens = stats.sums(rows, metric)
        assert total.sum() / tokens.sum() == pytest.approx(metrics.aggregate(samples)[metric], abs=1e-12)


def test_interval_is_seeded_needs_two_samples_and_a_measured_metric():
    rows = [row(scores(32, 0.6, seed)) for seed in range(6)]
    assert stats.interval(rows, "acc1") == stats.interval(list(rows), "acc1")
    lo, hi = stats.interval(rows, "acc1")
    assert lo < stats.sums(rows, "acc1")[0].sum() / (32 * 6) < hi
    assert stats.interval(rows[:1], "acc1") is None
    partial = [{"n_tokens": 8, "acc1": 0.5, "kl_mean": None}, {"n_tokens": 8, "acc1": 0.25, "kl_mean": None}]
    assert stats.intervals(partial) == {"acc1": [0.25, 0.5], "acc5": None, "kl_mean": None}
    assert stats.interval([{"n_tokens": 0, "acc1": 0.0}, *partial], "acc1") == [0.25, 0.5]  # no positions: no weight


def test_interval_covers_the_truth_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    widths, covered = [], 0
    for trial in range(40):
        p = rng.uniform(0.3, 0.9, size=64)  # each prompt its own difficulty; the population mean is 0.6
        rows = [{"n_tokens": 32, "acc1": rng.binomial(32, q) / 32} for q in p]
        lo, hi = stats.interval(rows, "acc1")
        covered += lo <= 0.6 <= hi
        widths.append(hi - lo)
        if trial == 0:
            small = stats.interval(rows[:8], "acc1")
            assert small[1] - small[0] > hi - lo
    assert covered >= 34  # 95 % nominal; a percentile bootstrap at 64 samples covers ~93 %
    assert 0.03 < np.mean(widths) < 0.12


def test_paired_change_cancels_what_the_prompts_share():
    rng = np.random.default_rng(2)
    base = [{"n_tokens": 20, "acc1": a, "kl_mean": 0.1} for a in rng.uniform(0.2, 1.0, 12).round(2)]
    rerun = stats.paired(base, [dict(s) for s in base], "acc1")
    assert rerun["diff"] == 0 and rerun["ci"] == [0.0, 0.0]
    worse = [{**s, "acc1": s["acc1"] - 0.05} for s in base]  # every prompt drops by 0.05: certain, whatever the spread
    change = stats.paired(base, worse, "acc1")
    assert change["diff"] == pytest.approx(-0.05) and change["ci"] == pytest.approx([-0.05, -0.05])
    assert stats.interval(base, "acc1")[1] - stats.interval(base, "acc1")[0] > 0.1  # unpaired, it would be noise
    assert stats.paired(base, worse, "kl_mean")["diff"] == pytest.approx(0)
    assert stats.paired(base[:1], worse[:1], "acc1")["ci"] is None


def test_stratified_runs_draw_each_dataset_apart():
    a = stats.sums([{"n_tokens": 10, "acc1": 1.0}, {"n_tokens": 10, "acc1": 0.0}], "acc1")
    b = stats.sums([{"n_tokens": 10, "acc1": 0.5}], "acc1")
    runs = stats.stratified([a, b], [1, 1])
    assert set(np.round(runs, 9)) == {0.25, 0.75}  # one of a's two prompts with b's only one


def test_case_record_and_table_carry_the_interval(tmp_path, cache):
    checkpoint = save_tiny(tmp_path / "tiny", "llama")
    rows = (ROOT / "data" / "facts.jsonl").read_text().splitlines()[:4]
    (tmp_path / "facts.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "s.yaml").write_text(
        f"generation: {{max_new_tokens: 12}}\nmodels:\n  tiny: {{path: {checkpoint}}}\n"
        "datasets: {facts: facts.jsonl}\nmethods:\n  topk: {keep: 0.3, min_keep: 2}\n")
    suite = load(tmp_path / "s.yaml")
    record = Bench(suite, progress=False).run(suite.cases()[0])
    assert record["ci_level"] == 0.95 and set(record["ci"]) == {"acc1", "acc5", "kl_mean"}
    assert record["ci"] == stats.intervals(record["samples"])
    for metric, (lo, hi) in record["ci"].items():
        assert lo <= record["scores"][metric] <= hi
    lo, hi = record["ci"]["acc1"]
    assert hi > lo  # four prompts that score differently
    text = report.table([record], datasets=False)
    assert f"{record['scores']['acc1']:.4f} ±{(hi - lo) / 2:.2g}" in text.splitlines()[1]
    assert text.splitlines()[-1] == "±: half the 95% bootstrap interval over samples"
    old = {k: v for k, v in record.items() if k not in ("ci", "ci_level")}  # a report written before intervals
    assert "±" not in report.table([old])
