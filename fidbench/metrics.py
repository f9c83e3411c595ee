"""Fidelity scores from teacher-forced logits, their aggregation, and floor checks.

KL(base ‖ method) is computed over the base's stored top-K tokens plus one bucket holding the rest
of the vocabulary. Merging tokens into one bucket can only lower a KL divergence, so the figure is
a lower bound of the full-vocabulary KL, tight when the base's tail mass is small (see README).

A method that scores samples itself (``score_sample``, e.g. a legacy Modifier reporting acc@1/acc@5)
gives ``PartialScores``: the metrics it did not measure are reported as None, never estimated. It may
also score several predictors of its own (``heads``: Medusa's draft heads), each aggregated on its own.

Perplexity is exp of the mean NLL of the scored tokens (``ppl``; ``ppl_base`` under the base model,
``ppl_ratio`` their ratio): on a ``text`` dataset it is the text's perplexity, on generated references
the perplexity of the base's own continuation.

Free-running scores (``free_run``) compare the method's own greedy continuation with the base's; they are
measured only in free-running mode and are None otherwise.

Answer scores (``answer_scores``) put task success beside token fidelity where a prompt has ``answers``: the
share of them the base's reference holds, and the share of those the method's teacher-forced argmax writes
token for token where the reference has them. None for a prompt without answers.
"""

from __future__ import annotations

import functools
import math
import os
import re
from bisect import bisect_left
from dataclasses import dataclass

import torch
from rapidfuzz.distance import LCSseq, Levenshtein, Prefix

from . import metric_table

# Free-running and answer scores of a sample, averaged over the samples that have them; declared in metric_table.
FREE_RUN = metric_table.names(kind="free_run")
ANSWERS = metric_table.names(kind="answers")
# Direction of each floor: a floor on these is a minimum, on every other metric a maximum.
HIGHER_IS_BETTER = set(metric_table.names(better="higher"))
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
    free: dict | None = None  # free-running scores (``free_run``), when the sample was also free-run
    answers: dict | None = None  # answer scores (``answer_scores``), when the prompt has answers

    def first_divergence(self) -> int:
        misses = (~self.hit1).nonzero()
        return int(misses[0]) if len(misses) else len(self.hit1)

    def summary(self) -> dict:
        return _summarize([self])


# A top-2 logit margin below this is a near-tie: batching changes fp32 summation order, which moves logits by up to
# ~1e-4 on the default model and 1e-3 on the tiny test models where a method rounds (tests/test_batch.py), so its
# argmax may differ from one prompt per forward there. A rounding method on a real model can move further (a flipped
# e4m3 rounding, ~1 logit: benchmarks/LOG.md, "Noise floor of rounding methods"); no margin catches that.
NEAR_TIE = 1e-3


def near_ties(logits: torch.Tensor) -> torch.Tensor:
    """How many rows of (N, V) ``logits`` are near-ties (``NEAR_TIE``), as a tensor (read once per case)."""
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1] < NEAR_TIE).sum()


def rest_logp(logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``top_idx``, summed from the tail itself (1 - Σ top loses it to rounding)."""
    return logp.scatter(1, top_idx.to(logp.device), -torch.inf).logsumexp(-1)


@dataclass
class PartialScores:
    """One sample's scores as a method measured them: means over ``n_tokens`` positions, by metric."""

    n_tokens: int
    values: dict
    heads: list[PartialScores] | None = None  # each of the method's own predictors (Medusa heads), scored alike
    non_finite: int = 0  # positions where the method's own logits held NaN or inf (its scores are then not faithful)
    first_non_finite: int | None = None

    @classmethod
    def of(cls, scores: dict, who: str, nested: bool = False) -> PartialScores:
        """Check a method's ``score_sample`` result: ``n_tokens``, known metrics, each a finite number in its
        range (``floor_range``), optionally ``heads``, a list of such results (without heads of their own), one
        per predictor, and ``non_finite`` / ``first_non_finite``: how many positions of the logits it scored
        held NaN or inf, and the first (the case then fails, as a teacher-forced one does)."""
        values = dict(scores)
        non_finite, first = values.pop("non_finite", 0), values.pop("first_non_finite", None)
        if not isinstance(non_finite, int) or isinstance(non_finite, bool) or non_finite < 0:
            raise ValueError(f"{who}: score_sample's non_finite must be a count of positions, got {non_finite!r}")
        heads = values.pop("heads", None)
        if heads is not None:
            if nested or not isinstance(heads, list) or not all(isinstance(h, dict) for h in heads):
                raise ValueError(f"{who}: score_sample's heads must be a list of score mappings, one per head, "
                                 f"without heads of their own; got {heads!r}")
            heads = [cls.of(h, f"{who} head {i + 1}", nested=True) for i, h in enumerate(heads)]
        n_tokens = values.pop("n_tokens", None)
        if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
            raise ValueError(f"{who}: score_sample must give n_tokens, a count of scored positions, got {n_tokens!r}")
        unknown = sorted(set(values) - _SCALARS)
        if unknown:
            raise ValueError(f"{who}: score_sample gave unknown metric(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(_SCALARS))}")
        for metric, value in sorted(values.items()):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not (number and math.isfinite(value)):
                raise ValueError(f"{who}: score_sample gave {metric} = {value!r}, not a finite number")
            low, high = floor_range(metric)
            if value is not None and not low <= value <= high:
                raise ValueError(f"{who}: score_sample gave {metric} = {value!r}, outside its range "
                                 f"[{low:g}, {high:g}]")
        return cls(n_tokens, values, heads, non_finite, first)

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


@functools.cache
def _rouge():
    """rouge-score's ROUGE-L with its default tokenizer and Porter stemmer, as the original scripts scored
    free-running text (wenhaoli-xmu/fidbench ``test_sim.py``). Imported on first use: it loads nltk (about 1.5 s)."""
    from rouge_score import rouge_scorer, tokenizers

    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=True)
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer), tokenizer


def contains(text: str, answers: list[str]) -> float:
    """Fraction of ``answers`` that ``text`` contains, ignoring case (RULER's ``string_match_all``)."""
    return sum(a.lower() in text.lower() for a in answers) / len(answers)


def free_run(g_ids: list[int], ids: list[int], base_text: str, text: str, answers: list[str] | None = None) -> dict:
    """How close the method's continuation ``ids`` (decoded: ``text``) is to the base's ``g_ids`` (``base_text``).

    ``rouge_l``: ROUGE-L F1 on the words of the text (None when neither text has a word rouge-score's tokenizer
    keeps: it drops everything but ASCII letters and digits); ``rouge_l_ids``: the same on token ids;
    ``edit_distance``: token Levenshtein distance over the longer length; ``common_prefix``: tokens equal from
    the start; ``answer_recall`` (``_base``): the share of a task's answers the method's (base's) text holds.
    """
    scorer, words = _rouge()
    measured = bool(words.tokenize(base_text) or words.tokenize(text))
    recall = (lambda t: contains(t, answers)) if answers else (lambda t: None)
    return {
        "rouge_l": scorer.score(base_text, text)["rougeL"].fmeasure if measured else None,
        "rouge_l_ids": 2 * LCSseq.similarity(g_ids, ids) / (len(g_ids) + len(ids)),
        "edit_distance": Levenshtein.normalized_distance(g_ids, ids),
        "common_prefix": Prefix.similarity(g_ids, ids),
        "answer_recall": recall(text),
        "answer_recall_base": recall(base_text),
    }


def answer_spans(tokenizer, ids: list[int], answers: list[str]) -> list[range | None]:
    """Per answer, the positions of the tokens of ``ids`` whose decoded text covers its first case-insensitive
    occurrence in the decoded ``ids`` (None where the text lacks it).

    Found from the decoded prefixes, so a token that merges a space into a word, or holds part of a word or a
    character's first bytes (byte-level BPE decodes them as U+FFFD), counts by the characters it writes: the
    span starts at the first token whose prefix reaches past the answer's start, and ends at the first whose
    prefix agrees with the whole text through the answer's end (lowered to the later prefixes' agreement,
    should decoding a longer prefix clean up its spaces)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    prefixes = [tokenizer.decode(ids[: t + 1], skip_special_tokens=True) for t in range(len(ids))]
    settled = [len(os.path.commonprefix([prefix, text])) for prefix in prefixes]
    for t in range(len(settled) - 2, -1, -1):
        settled[t] = min(settled[t], settled[t + 1])
    spans = []
    for answer in answers:
        found = re.search(re.escape(answer), text, re.IGNORECASE)
        if found is None:
            spans.append(None)
            continue
        first = next(t for t, prefix in enumerate(prefixes) if len(prefix) > found.start())
        spans.append(range(first, bisect_left(settled, found.end()) + 1))
    return spans


def answer_scores(tokenizer, g_ids: list[int], hit1: torch.Tensor, answers: list[str]) -> dict:
    """``answers_in_base``: the share of ``answers`` the reference ``g_ids`` holds; ``answers_reproduced``: the share
    of those whose every token the method's teacher-forced argmax predicts (``hit1``), None when the base holds none."""
    spans = [span for span in answer_spans(tokenizer, g_ids, answers) if span is not None]
    reproduced = [bool(hit1[span.start : span.stop].all()) for span in spans]
    return {"answers_in_base": len(spans) / len(answers),
            "answers_reproduced": sum(reproduced) / len(reproduced) if reproduced else None}


def _means(samples: list, field: str, names: tuple[str, ...]) -> dict:
    """Each of the scores ``names`` in the samples' ``field`` (``free``, ``answers``) averaged over the samples that
    measured it (None where none did)."""
    out = {}
    for metric in names:
        values = [v for s in samples if (got := getattr(s, field)) is not None and (v := got[metric]) is not None]
        out[metric] = sum(values) / len(values) if values else None
    return out


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
    ppl = math.exp(nll) if nll < 700 else math.inf
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
        "ppl": ppl,
        "ppl_base": math.exp(nll_base) if nll_base < 700 else math.inf,
        "ppl_ratio": math.exp(nll - nll_base) if nll - nll_base < 700 else math.inf,
        "first_divergence": sum(first) / len(first),
        "exact_match": sum(f == len(s.hit1) for f, s in zip(first, samples)) / len(samples),
        **_means(samples, "free", FREE_RUN),
        **_means(samples, "answers", ANSWERS),
        "n_samples": len(samples),
        "n_tokens": len(hit1),
    }
    out["acc1_by_position"] = _by_position(samples)
    return out


def _summarize_partial(samples: list[PartialScores]) -> dict:
    """Token-weighted means of what the samples measured; None for every metric none of them did."""
    if not all(isinstance(s, PartialScores) for s in samples):
        raise ValueError("cannot aggregate a method's own partial scores with teacher-forced scores")
    out = _weighted(samples)
    out.update(n_samples=len(samples), n_tokens=sum(s.n_tokens for s in samples), acc1_by_position=None)
    counts = {len(s.heads) if s.heads is not None else None for s in samples}
    if len(counts) > 1:
        raise ValueError(f"cannot aggregate samples scored with different numbers of heads ({sorted(counts, key=str)})")
    if samples[0].heads is not None:  # per head: what it measured, token-weighted over the samples
        out["heads"] = [
            {"head": i + 1, **{k: v for k, v in _weighted([s.heads[i] for s in samples]).items() if v is not None},
             "n_tokens": sum(s.heads[i].n_tokens for s in samples)}
            for i in range(len(samples[0].heads))
        ]
    return out


def _weighted(samples: list[PartialScores]) -> dict:
    """Each metric's mean weighted by the samples' ``n_tokens``, over the samples that measured it (else None)."""
    out = {}
    for metric in sorted(_SCALARS):
        measured = [(s.values[metric], s.n_tokens) for s in samples if s.values.get(metric) is not None]
        weight = sum(n for _, n in measured)
        out[metric] = sum(v * n for v, n in measured) / weight if weight else None
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
    """The metrics a floor can bound: those with a better direction."""
    return {m.name for m in metric_table.METRICS if m.better is not None}


def floor_range(metric: str) -> tuple[float, float]:
    """The values ``metric`` can take (a fraction lies in [0, 1], a perplexity is at least 1)."""
    return metric_table.BY_NAME[metric].range


# The per-sample scalars of a summary.
_SCALARS = set(metric_table.names())
