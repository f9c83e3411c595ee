"""legacy: an original-scripts Modifier runs unchanged through the harness and scores exactly what
the seed-style loop (fidbench's stepwise engine over reference tokens 1..N-1) scores."""

import copy
import json
from pathlib import Path

import legacy_modifier
import pytest
import torch
from helpers import FAMILIES, save_words, words_suite

from fidbench import engine, metrics, models, report
from fidbench.harness import Bench
from fidbench.methods import build
from fidbench.suite import load

MODULE = str(Path(__file__).with_name("legacy_modifier.py"))
NOISE = {"noise": 2.0, "seed": 0}


@pytest.fixture
def bench_for(tmp_path, monkeypatch):
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))

    def make(family, methods):
        suite = load(words_suite(tmp_path, save_words(tmp_path / family, family), methods))
        return Bench(suite, progress=False), {c.variant.name: c for c in suite.cases()}

    return make


def seed_style(model, refs):
    """Per sample (acc1, acc5) over reference tokens 1..N-1, from fidbench's own stepwise origin."""
    out = []
    for ref in refs:
        forced = engine.teacher_force(model, build("origin", {}), ref.p_ids, ref.g_ids, "stepwise").logits[1:]
        gold = torch.tensor(ref.g_ids[1:])
        out.append(((forced.argmax(-1) == gold).double().mean().item(),
                    (forced.topk(5, -1).indices == gold[:, None]).any(-1).double().mean().item()))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))  # the family matrix for this method (tests/test_families.py)
def test_legacy_modifier_scores_what_the_seed_style_loop_scores(bench_for, family, tmp_path):
    config = tmp_path / "noisy.json"
    config.write_text(json.dumps(NOISE))
    bench, cases = bench_for(family, {
        "legacy-origin": {"method": "legacy", "module": MODULE, "cls": "Origin"},
        "legacy-noisy": {"method": "legacy", "module": MODULE, "cls": "NoisyNorm", "config": str(config)},
    })
    origin = bench.run(cases["legacy-origin"])
    loaded = bench.loaded
    before = models.fingerprint(loaded.model)
    noisy = bench.run(cases["legacy-noisy"])
    assert models.fingerprint(loaded.model) == before  # the Modifier changed a copy

    # The references are the base's greedy output: its own loop reproduces every token.
    assert [s["acc1"] for s in origin["samples"]] == [1.0] * len(loaded.references)
    # The noisy Modifier against fidbench's engine on the same perturbed weights.
    perturbed = load_perturbed(loaded.model, config)
    expected = seed_style(perturbed, loaded.references)
    assert [(s["acc1"], s["acc5"]) for s in noisy["samples"]] == expected
    assert any(acc1 < 1.0 for acc1, _ in expected)  # the perturbation is visible: the comparison means something
    n = [len(r.g_ids) - 1 for r in loaded.references]
    assert noisy["scores"]["acc1"] == pytest.approx(sum(a * k for (a, _), k in zip(expected, n)) / sum(n), abs=1e-12)
    assert noisy["scores"]["n_tokens"] == sum(n)
    assert noisy["decode"] == "stepwise" and noisy["timing"]["prefill_s"] is None
    for metric in ("kl_mean", "nll", "first_divergence", "acc1_by_position"):
        assert noisy["scores"][metric] is None  # not measured, never faked
    assert "-" in report.table([noisy])


def load_perturbed(model, config):
    """A copy of ``model`` changed by the NoisyNorm Modifier, outside fidbench."""
    other = copy.deepcopy(model)
    legacy_modifier.NoisyNorm(other, None, None, str(config))
    return other


def test_legacy_inline_config_and_no_copy(bench_for):
    bench, cases = bench_for("llama", {
        "inline": {"method": "legacy", "module": MODULE, "cls": "NoisyNorm", "config": NOISE},
        "in-place": {"method": "legacy", "module": MODULE, "cls": "NoisyNorm", "config": NOISE, "copy": False},
    })
    inline = bench.run(cases["inline"])
    before = models.fingerprint(bench.loaded.model)
    in_place = bench.run(cases["in-place"])
    assert inline["scores"] == in_place["scores"]
    assert models.fingerprint(bench.loaded.model) != before  # copy: false leaves the Modifier's change behind


def test_legacy_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="module .* and cls .* are required"):
        build("legacy", {"module": MODULE})
    with pytest.raises(ValueError, match="config file .* does not exist"):
        build("legacy", {"module": MODULE, "cls": "Origin", "config": str(tmp_path / "none.json")})
    method = build("legacy", {"module": MODULE, "cls": "Missing"})
    with pytest.raises(ValueError, match="has no class 'Missing'"):
        with method.apply(torch.nn.Linear(1, 1)):
            pass
    with pytest.raises(ValueError, match="not exact under parallel"):
        engine.resolve_mode(build("legacy", {"module": MODULE, "cls": "Origin"}), "parallel")


def test_partial_scores_aggregate_token_weighted_and_floors_on_unmeasured_metrics_fail():
    samples = [metrics.PartialScores.of({"acc1": 1.0, "acc5": 1.0, "n_tokens": 3}, "m"),
               metrics.PartialScores.of({"acc1": 0.0, "acc5": 0.5, "n_tokens": 1}, "m"),
               metrics.PartialScores.of({"n_tokens": 0}, "m")]
    scores = metrics.aggregate(samples)
    assert scores["acc1"] == 0.75 and scores["acc5"] == 0.875 and scores["n_tokens"] == 4
    assert scores["kl_mean"] is None and scores["nll_ratio"] is None
    assert metrics.check_floors(scores, {"acc1": 0.7}) == []
    assert metrics.check_floors(scores, {"kl_mean": 0.1}) == ["kl_mean has a floor (0.1) but this method does not measure it"]
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.PartialScores.of({"accuracy": 1.0, "n_tokens": 1}, "m")
    with pytest.raises(ValueError, match="n_tokens"):
        metrics.PartialScores.of({"acc1": 1.0}, "m")
