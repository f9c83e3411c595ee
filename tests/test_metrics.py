"""Scores on hand-made distributions: accuracy, first divergence, KL bound, floor directions."""

import pytest
import torch

from fidbench import metrics
from fidbench.reference import TOP_K, Reference


def ref_from(base_logits, g_ids):
    return Reference.from_logits([0], g_ids, base_logits)


def test_accuracy_and_first_divergence():
    base = torch.full((4, 64), -10.0)
    g = [3, 5, 7, 9]
    base[torch.arange(4), g] = 5.0
    method = base.clone()
    method[2, 7], method[2, 8] = 0.0, 6.0  # position 2: argmax 8, the base token 7 is still in the top 5
    method[3, 9], method[3, 1] = -20.0, 6.0  # position 3: the base token drops out of the top 5
    ref = ref_from(base, g)
    s = metrics.score(method, ref).summary()
    assert s["acc1"] == 0.5 and s["acc5"] == 0.75
    assert s["first_divergence"] == 2 and s["exact_match"] == 0.0
    assert s["acc1_by_position"] == [0.5]


def test_kl_is_exact_when_top_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    base, method = torch.randn(6, TOP_K), torch.randn(6, TOP_K)
    g = base.argmax(-1).tolist()
    ref = ref_from(base, g)
    full = torch.nn.functional.kl_div(method.log_softmax(-1), base.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)
    s = metrics.score(method, ref)
    torch.testing.assert_close(s.kl, full.double(), atol=1e-6, rtol=1e-6)

    base, method = torch.randn(6, 4 * TOP_K) * 3, torch.randn(6, 4 * TOP_K) * 3
    ref = ref_from(base, base.argmax(-1).tolist())
    full = torch.nn.functional.kl_div(method.log_softmax(-1), base.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)
    s = metrics.score(method, ref)
    assert (s.kl <= full.double() + 1e-9).all() and (s.kl > 0).all()


def test_identical_logits_score_perfectly():
    base = torch.randn(5, 100)
    ref = ref_from(base, base.argmax(-1).tolist())
    s = metrics.score(base, ref).summary()
    assert s["acc1"] == 1 and s["kl_max"] < 1e-9 and s["nll_ratio"] == pytest.approx(1.0)


def test_aggregate_weights_tokens_and_pools_percentiles():
    a = metrics.SampleScores(torch.tensor([True, True]), torch.tensor([True, True]), torch.tensor([0.0, 0.0]).double(),
                             torch.zeros(2).double(), torch.ones(2).double())
    b = metrics.SampleScores(torch.tensor([False] * 6), torch.tensor([True] * 6), torch.ones(6).double(),
                             torch.ones(6).double(), torch.ones(6).double())
    s = metrics.aggregate([a, b])
    assert s["acc1"] == 0.25 and s["kl_mean"] == 0.75 and s["kl_median"] == 1.0
    assert s["first_divergence"] == 1.0 and s["n_tokens"] == 8 and s["n_samples"] == 2


def test_floors_are_minima_for_accuracy_and_maxima_for_divergences():
    scores = {"acc1": 0.9, "kl_mean": 0.2}
    assert metrics.check_floors(scores, {"acc1": 0.85, "kl_mean": 0.3}) == []
    failures = metrics.check_floors(scores, {"acc1": 0.95, "kl_mean": 0.1})
    assert failures == ["acc1 = 0.9000 is below its floor 0.95", "kl_mean = 0.2000 is above its ceiling 0.1"]


def test_a_non_finite_score_never_passes_a_floor():
    scores = {"acc1": float("nan"), "kl_mean": float("nan"), "nll": float("inf"), "kl_max": float("-inf")}
    floors = {"acc1": 0.0, "kl_mean": 100.0, "nll": 100.0, "kl_max": 100.0}
    failures = metrics.check_floors(scores, floors)
    assert failures == ["acc1 = nan is not a finite number (floor 0.0)",
                        "kl_max = -inf is not a finite number (floor 100.0)",
                        "kl_mean = nan is not a finite number (floor 100.0)",
                        "nll = inf is not a finite number (floor 100.0)"]


def test_a_method_scoring_itself_must_give_finite_numbers():
    with pytest.raises(ValueError, match=r"m: score_sample gave acc1 = nan, not a finite number"):
        metrics.PartialScores.of({"acc1": float("nan"), "n_tokens": 3}, "m")
