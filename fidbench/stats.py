"""Bootstrap intervals over a case's samples, token-weighted like its scores.

A case's acc@1, acc@5 and KL mean are means over all its scored positions, so a resampled case is scored
as Σ(value × tokens) / Σ tokens over the resampled samples; each sample's sums are exact from its record
(``acc1 × n_tokens`` hits, ``kl_mean × n_tokens`` summed KL), so a bootstrap needs no per-position data.
Samples are resampled regardless of their dataset: a design stratified by dataset would have no spread at
``--fidbench-limit 1`` (one prompt per dataset), and pooling can only widen the interval. Percentile
intervals, a fixed seed: the same record gives the same interval on every machine.

Free-running scores (``FREE``: declared with an interval, pooled over samples) are plain means over the samples
that measured them (a sample's ROUGE-L counts once, whatever its length), so each such sample weighs 1.
"""

from __future__ import annotations

import numpy as np

from . import metric_table

METRICS = metric_table.names(interval=True, pooled="tokens")  # the token-weighted means with intervals
FREE = metric_table.names(interval=True, pooled="samples")  # per-sample means (see above)
LEVEL = 0.95
RESAMPLES = 2000
SEED = 0


def sums(samples: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-sample (Σ metric over positions, positions) of the samples that scored any position; None when a
    sample lacks the metric (a method that does not measure it). A free-running metric: (value, 1) of each
    sample that measured it, None when none did."""
    if metric in FREE:
        values = [s[metric] for s in samples if s.get(metric) is not None]
        return (np.array(values, dtype=np.float64), np.ones(len(values))) if values else None
    scored = [s for s in samples if s.get("n_tokens")]
    if not scored or any(s.get(metric) is None for s in scored):
        return None
    tokens = np.array([s["n_tokens"] for s in scored], dtype=np.float64)
    return np.array([s[metric] for s in scored], dtype=np.float64) * tokens, tokens


def draws(n: int, size: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, size) indices into ``n`` samples, drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, size))


def _percentiles(estimates: np.ndarray, level: float) -> list[float]:
    lo, hi = np.quantile(estimates, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def interval(samples: list[dict], metric: str, level: float = LEVEL, resamples: int = RESAMPLES,
             seed: int = SEED) -> list[float] | None:
    """Percentile bootstrap interval of the case's token-weighted ``metric``; None below two samples (no spread
    to resample) or when the samples lack the metric."""
    got = sums(samples, metric)
    if got is None or len(got[0]) < 2:
        return None
    total, tokens = got
    idx = draws(len(total), len(total), resamples, seed)
    return _percentiles(total[idx].sum(1) / tokens[idx].sum(1), level)


def intervals(samples: list[dict], level: float = LEVEL) -> dict:
    """The case record's ``ci``: metric -> [lo, hi] or None (free-running metrics only where measured)."""
    out = {metric: interval(samples, metric, level) for metric in METRICS}
    return out | {metric: interval(samples, metric, level) for metric in FREE if sums(samples, metric) is not None}


def paired(base: list[dict], new: list[dict], metric: str, level: float = LEVEL, resamples: int = RESAMPLES,
           seed: int = SEED) -> dict | None:
    """The change new − base of a token-weighted metric over matched samples (``base[i]`` and ``new[i]`` are
    the same prompt), with a paired percentile bootstrap interval: both sides are resampled with the same
    indices, so what the prompts share cancels. None when either side lacks the metric. A free-running metric
    is compared over the pairs where both sides measured it."""
    if metric in FREE:
        pairs = [(b, n) for b, n in zip(base, new) if b.get(metric) is not None and n.get(metric) is not None]
        base, new = [b for b, _ in pairs], [n for _, n in pairs]
    b, n = sums(base, metric), sums(new, metric)
    if b is None or n is None or len(b[0]) != len(n[0]):
        return None
    value_b, value_n = b[0].sum() / b[1].sum(), n[0].sum() / n[1].sum()
    out = {"base": float(value_b), "new": float(value_n), "diff": float(value_n - value_b), "ci": None}
    if len(b[0]) >= 2:
        idx = draws(len(b[0]), len(b[0]), resamples, seed)
        change = n[0][idx].sum(1) / n[1][idx].sum(1) - b[0][idx].sum(1) / b[1][idx].sum(1)
        out["ci"] = _percentiles(change, level)
    return out


def stratified(groups: list[tuple[np.ndarray, np.ndarray]], size: list[int], resamples: int = RESAMPLES,
               seed: int = SEED) -> np.ndarray:
    """Token-weighted estimates of runs that draw ``size[g]`` samples of each group ``g`` (a dataset's
    (Σ metric, tokens) arrays, from ``sums``) with replacement: the spread of a run of that many prompts."""
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    tokens = np.zeros(resamples)
    for (values, weights), k in zip(groups, size):
        idx = rng.integers(0, len(values), size=(resamples, k))
        total += values[idx].sum(1)
        tokens += weights[idx].sum(1)
    return total / tokens
