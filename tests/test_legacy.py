"""legacy: an original-scripts Modifier runs unchanged through the harness and scores exactly what
the seed-style loop (fidbench's stepwise engine over reference tokens 1..N-1) scores."""

import copy
import json
from pathlib import Path

import legacy_modifier
import pytest
import torch
from helpers import FAMILIES, save_words, words_suite

from fidbench import engine, legacy, metrics, models, report
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
    loaded = bench.loaded
    before = models.fingerprint(loaded.model)
    in_place = bench.run(cases["in-place"])
    assert inline["scores"] == in_place["scores"] and in_place["failures"] == []
    assert models.fingerprint(loaded.model) != before  # copy: false leaves the Modifier's change behind
    assert bench.loaded is None and bench.run(cases["inline"])["scores"] == inline["scores"]  # so the model reloads


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


def test_a_modifier_scoring_out_of_range_fails_its_case(bench_for):
    bench, cases = bench_for("llama", {"over": {"method": "legacy", "module": MODULE, "cls": "Overcount",
                                                "floors": {"acc5": 0.9}}})
    with pytest.raises(ValueError, match=r"method 'legacy': score_sample gave acc5 = 1.5, outside its range \[0, 1\]"):
        bench.run(cases["over"])
    for scores in ({"acc1": -0.1}, {"kl_mean": -1.0}, {"ppl": 0.5}):
        with pytest.raises(ValueError, match="outside its range"):
            metrics.PartialScores.of({**scores, "n_tokens": 1}, "m")
    assert metrics.PartialScores.of({"acc1": 1.0, "acc5": 0.0, "n_tokens": 1}, "m").values["acc1"] == 1.0


def test_partial_scores_aggregate_token_weighted_and_floors_on_unmeasured_metrics_fail():
    samples = [metrics.PartialScores.of({"acc1": 1.0, "acc5": 1.0, "n_tokens": 3}, "m"),
               metrics.PartialScores.of({"acc1": 0.0, "acc5": 0.5, "n_tokens": 1}, "m"),
               metrics.PartialScores.of({"n_tokens": 0}, "m")]
    scores = metrics.aggregate(samples)
    assert scores["acc1"] == 0.75 and scores["acc5"] == 0.875 and scores["n_tokens"] == 4
    assert scores["kl_mean"] is None and scores["nll_ratio"] is None
    assert metrics.check_floors(scores, {"acc1": 0.7}) == []
    assert metrics.check_floors(scores, {"kl_mean": 0.1}) == [
        "kl_mean has a floor (0.1) but this method does not measure it"]
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.PartialScores.of({"accuracy": 1.0, "n_tokens": 1}, "m")
    with pytest.raises(ValueError, match="n_tokens"):
        metrics.PartialScores.of({"acc1": 1.0}, "m")


def test_modifier_base_class_members(bench_for, tmp_path):
    """A Modifier using every member of fidbench.legacy.Modifier runs under legacy: its checkpoint (saved by
    save_checkpoint, loaded through load_ckp) and its config are what it scores with."""
    bench, cases = bench_for("llama", {"origin": {}})
    bench.run(cases["origin"])
    model, refs = bench.loaded.model, bench.loaded.references
    trained = copy.deepcopy(model)
    config = tmp_path / "first.json"
    config.write_text(json.dumps(NOISE))
    ckp = tmp_path / "norm.pt"
    writer = legacy_modifier.TrainedNorm(trained, str(ckp), None, str(config))  # the norm weight "trained"
    assert writer.conf == NOISE
    assert [p.requires_grad for p in trained.parameters()].count(True) == 1 and writer.ft_params()[0].requires_grad
    writer.save_checkpoint()
    assert torch.equal(torch.load(ckp, weights_only=True)[0], trained.model.norm.weight)
    ids = torch.tensor([refs[0].p_ids])
    assert torch.equal(writer.generate(ids, max_new_tokens=3, do_sample=False),
                       trained.generate(ids, max_new_tokens=3, do_sample=False))
    assert torch.equal(writer(input_ids=ids).logits, trained(input_ids=ids).logits)

    # Under legacy: the checkpoint is loaded, then the config's noise (another seed) is added on top.
    again = tmp_path / "second.json"
    again.write_text(json.dumps({"noise": 1.0, "seed": 1}))
    bench, cases = bench_for("llama", {"trained": {"method": "legacy", "module": MODULE, "cls": "TrainedNorm",
                                                    "config": str(again), "load_ckp": str(ckp)}})
    record = bench.run(cases["trained"])
    expected_model = copy.deepcopy(trained)
    with torch.no_grad():
        expected_model.model.norm.weight += torch.randn(64, generator=torch.Generator().manual_seed(1))
    expected = seed_style(expected_model, bench.loaded.references)
    assert [(s["acc1"], s["acc5"]) for s in record["samples"]] == expected
    without_ckp = seed_style(load_perturbed(model, again), bench.loaded.references)
    assert expected != without_ckp  # the checkpoint counts
    assert expected != seed_style(trained, bench.loaded.references)  # and so does the config
    assert models.fingerprint(bench.loaded.model) == models.fingerprint(model)  # the Modifier changed a copy


def test_modifier_checkpoints_refuse_code_and_mismatches(tmp_path):
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.norm = torch.nn.Linear(2, 2)  # norm.weight: (2, 2)
    config = tmp_path / "noise.json"
    config.write_text(json.dumps(NOISE))
    pickled = tmp_path / "code.pt"
    torch.save([torch.zeros(2, 2), Path("not a tensor")], pickled)  # an object weights_only refuses to unpickle
    with pytest.raises(ValueError, match="code.pt holds more than tensors, refused"):
        legacy_modifier.TrainedNorm(model, None, str(pickled), str(config))
    wrong = tmp_path / "wrong.pt"
    torch.save([torch.zeros(3)], wrong)
    with pytest.raises(ValueError, match=r"wrong.pt tensor 0 has shape \(3,\), ft_params\(\)\[0\] has \(2, 2\)"):
        legacy_modifier.TrainedNorm(model, None, str(wrong), str(config))
    torch.save([torch.zeros(2, 2)] * 2, wrong)
    with pytest.raises(ValueError, match="holds 2 tensors, ft_params\\(\\) has 1"):
        legacy_modifier.TrainedNorm(model, None, str(wrong), str(config))
    with pytest.raises(ValueError, match="save_ckp is None"):
        legacy_modifier.Origin(model).save_checkpoint()
    with pytest.raises(NotImplementedError):
        legacy.Modifier(model, None, None).ft_params()
    with pytest.raises(ValueError, match="load_ckp .* is not a file"):
        build("legacy", {"module": MODULE, "cls": "Origin", "load_ckp": str(tmp_path / "none.pt")})
