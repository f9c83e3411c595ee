"""Fidelity scores from teacher-forced logits, their aggregation, and floor checks.

KL(base ‖ method) is computed over the base's stored top-K tokens plus one bucket holding the rest
of the vocabulary. Merging tokens into one bucket can only lower a KL divergence, so the figure is
a lower bound of the full-vocabulary KL, tight when the base's tail mass is small (see README).

A method that scores samples itself (``score_sample``, e.g. a legacy Modifier reporting acc@1/acc@5)
gives ``PartialScores``: the metrics it did not measure are reported as None, never estimated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Direction of each floor: a floor on these is a minimum, on every other metric a maximum.
HIGHER_IS_BETTER = {"acc1", "acc5", "first_divergence", "exact_match"}
KL_PERCENTILES = {"kl_median": 0.5, "kl_p90": 0.9, "kl_p95": 0.95, "kl_p99": 0.99, "kl_p999": 0.999}
POSITION_BUCKET = 16  # tokens per bin of the agreement-by-position curve


@dataclass
class SampleScores:
    """Per-position values for one sample; ``summary()`` gives its scores."""

    hit1: torch.Tensor  # (N,) bool
    hit5: torch.Tensor  # (N,) bool
    kl: torch.Tensor  # (N,) float64
    nll: torch.Tensor  # (N,) float64, -log q(reference token)
    nll_base: torch.Tensor  # (N,) float64, -log p(reference token)

    def first_divergence(self) -> int:
        misses = (~self.hit1).nonzero()
        return int(misses[0]) if len(misses) else len(self.hit1)

    def summary(self) -> dict:
        return _summarize([self])


def rest_logp(logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``top_idx``, summed from the tail itself (1 - Σ top loses it to rounding)."""
    return logp.scatter(1, top_idx.to(logp.device), -torch.inf).logsumexp(-1)


@dataclass
class PartialScores:
    """One sample's scores as a method measured them: means over ``n_tokens`` positions, by metric."""

    n_tokens: int
    values: dict

    @classmethod
    def of(cls, scores: dict, who: str) -> "PartialScores":
        """Check a method's ``score_sample`` result: ``n_tokens`` and known metrics only."""
        values = dict(scores)
        n_tokens = values.pop("n_tokens", None)
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
            raise ValueError(f"{who}: score_sample must give n_tokens, a count of scored positions, got {n_tokens!r}")
        unknown = sorted(set(values) - _SCALARS)
        if unknown:
            raise ValueError(f"{who}: score_sample gave unknown metric(s) {', '.join(unknown)}; known: {', '.join(sorted(_SCALARS))}")
        for metric, value in sorted(values.items()):
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
                raise ValueError(f"{who}: score_sample gave {metric} = {value!r}, not a finite number")
        return cls(n_tokens, values)

    def summary(self) -> dict:
        return _summarize([self])


def score(logits: torch.Tensor, ref) -> SampleScores:
    """Compare method ``logits`` (N, V) with the base's reference distribution (a ``Reference``)."""
    device = logits.device
    logq = torch.log_softmax(logits.float(), dim=-1)
    gold = torch.tensor(ref.g_ids, device=device)
    top_idx = ref.top_idx.to(device).long()
    top_logp = ref.top_logp.to(device).double()
    hit1 = logq.argmax(-1) == gold
    hit5 = (logq.topk(5, dim=-1).indices == gold[:, None]).any(-1)
    q_top = logq.gather(1, top_idx).double()
    kl_top = (top_logp.exp() * (top_logp - q_top)).sum(-1)
    # The tail bucket: base mass outside its top-K against the method's mass on the same tokens.
    p_rest = ref.rest_logp.to(device).double()
    q_rest = rest_logp(logq, top_idx).double()
    kl_rest = torch.where(p_rest > -torch.inf, p_rest.exp() * (p_rest - q_rest), 0.0)
    kl = (kl_top + kl_rest).clamp(min=0)
    nll = -logq.gather(1, gold[:, None])[:, 0].double()
    return SampleScores(hit1.cpu(), hit5.cpu(), kl.cpu(), nll.cpu(), -ref.gold_logp.double().cpu())


def _summarize(samples: list) -> dict:
    if not samples:  # every metric present, none measured
        return {**dict.fromkeys(sorted(_SCALARS)), "acc1_by_position": None, "n_samples": 0, "n_tokens": 0}
    if any(isinstance(s, PartialScores) for s in samples):
        return _summarize_partial(samples)
    hit1 = torch.cat([s.hit1 for s in samples]).double()
    hit5 = torch.cat([s.hit5 for s in samples]).double()
    kl = torch.cat([s.kl for s in samples])
    nll = torch.cat([s.nll for s in samples]).mean().item()
    nll_base = torch.cat([s.nll_base for s in samples]).mean().item()
    first = [s.first_divergence() for s in samples]
    out = {
        "acc1": hit1.mean().item(),
        "acc5": hit5.mean().item(),
        "kl_mean": kl.mean().item(),
        **{name: torch.quantile(kl, q).item() for name, q in KL_PERCENTILES.items()},
        "kl_max": kl.max().item(),
        "nll": nll,
        "nll_base": nll_base,
        "nll_ratio": nll / nll_base if nll_base > 0 else math.inf,
        "first_divergence": sum(first) / len(first),
        "exact_match": sum(f == len(s.hit1) for f, s in zip(first, samples)) / len(samples),
        "n_samples": len(samples),
        "n_tokens": len(hit1),
    }
    out["acc1_by_position"] = _by_position(samples)
    return out


def _summarize_partial(samples: list[PartialScores]) -> dict:
    """Token-weighted means of what the samples measured; None for every metric none of them did."""
    if not all(isinstance(s, PartialScores) for s in samples):
        raise ValueError("cannot aggregate a method's own partial scores with teacher-forced scores")
    out = {}
    for metric in sorted(_SCALARS):
        measured = [(s.values[metric], s.n_tokens) for s in samples if s.values.get(metric) is not None]
        weight = sum(n for _, n in measured)
        out[metric] = sum(v * n for v, n in measured) / weight if weight else None
    out.update(n_samples=len(samples), n_tokens=sum(s.n_tokens for s in samples), acc1_by_position=None)
    return out


def _by_position(samples: list[SampleScores]) -> list[float]:
    """acc@1 per bin of POSITION_BUCKET reference positions, over the samples that reach the bin."""
    longest = max(len(s.hit1) for s in samples)
    bins = []
    for start in range(0, longest, POSITION_BUCKET):
        hits = [s.hit1[start : start + POSITION_BUCKET] for s in samples if len(s.hit1) > start]
        bins.append(torch.cat(hits).double().mean().item())
    return bins


def aggregate(samples: list) -> dict:
    """Token-weighted scores over samples; percentiles pooled over all positions."""
    return _summarize(samples)


def check_floors(scores: dict, floors: dict) -> list[str]:
    """Messages for each floor the scores violate (empty when all hold). A non-finite value never passes:
    every comparison with NaN is false, so it is checked first."""
    failures = []
    for metric, bound in sorted(floors.items()):
        value = scores.get(metric)
        if value is None:
            failures.append(f"{metric} has a floor ({bound}) but this method does not measure it")
        elif not math.isfinite(value):
            failures.append(f"{metric} = {value} is not a finite number (floor {bound})")
        elif metric in HIGHER_IS_BETTER and value < bound:
            failures.append(f"{metric} = {value:.4f} is below its floor {bound}")
        elif metric not in HIGHER_IS_BETTER and value > bound:
            failures.append(f"{metric} = {value:.4f} is above its ceiling {bound}")
    return failures


def known_metrics() -> set[str]:
    return HIGHER_IS_BETTER | {"kl_mean", "kl_max", "nll", "nll_ratio", *KL_PERCENTILES}


def floor_range(metric: str) -> tuple[float, float]:
    """The values ``metric`` can take: fractions lie in [0, 1], everything else is non-negative."""
    return (0.0, 1.0) if metric in ("acc1", "acc5", "exact_match") else (0.0, math.inf)


_SCALARS = known_metrics() | {"nll_base"}  # the per-sample scalars of a summary
