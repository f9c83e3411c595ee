"""The harness end to end on a tiny checkpoint: overlong policy in the results, cached references,
imported reference files."""

import json

import pytest
from helpers import ROOT, save_tiny

from fidbench.harness import Bench
from fidbench.suite import load


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", "qwen2")


def suite(tmp_path, checkpoint, model_extra="", datasets=None):
    rows = (ROOT / "data" / "summarization.jsonl").read_text().splitlines()[:1]
    rows += (ROOT / "data" / "facts.jsonl").read_text().splitlines()[:2]
    (tmp_path / "mixed.jsonl").write_text("\n".join(rows) + "\n")
    datasets = datasets or {"mixed": "mixed.jsonl"}
    (tmp_path / "s.yaml").write_text(
        "generation: {max_new_tokens: 8}\n"
        f"models:\n  tiny: {{path: {checkpoint}{model_extra}}}\n"
        f"datasets: {json.dumps(datasets)}\n"
        "methods:\n  origin: {}\n"
    )
    return load(tmp_path / "s.yaml")


def test_overlong_prompts_are_truncated_and_reported(tmp_path, checkpoint, cache):
    s = suite(tmp_path, checkpoint, ", max_length: 200")
    record = Bench(s, progress=False).run(s.cases()[0])
    long, *short = record["samples"]
    assert long["truncated_from"] > 200 - 8 and long["prompt_tokens"] == 200 - 8
    assert all(x["truncated_from"] is None for x in short) and record["skipped"] == []


def test_overlong_prompts_can_be_skipped_with_the_reason(tmp_path, checkpoint, cache):
    s = suite(tmp_path, checkpoint, ", max_length: 200, overlong: skip")
    record = Bench(s, progress=False).run(s.cases()[0])
    assert [x["index"] for x in record["samples"]] == [1, 2]
    assert record["skipped"][0]["index"] == 0 and "exceeds max_length 200" in record["skipped"][0]["reason"]
    assert record["scores"]["n_samples"] == 2


def test_second_load_generates_nothing_and_scores_the_same(tmp_path, checkpoint, cache):
    s = suite(tmp_path, checkpoint)
    first = Bench(s, progress=False)
    a = first.run(s.cases()[0])
    again = Bench(s, progress=False)
    b = again.run(s.cases()[0])
    assert first.generated == 3 and again.generated == 0
    assert a["scores"] == b["scores"] and a["scores"]["acc1"] >= 0.95


def test_imported_references_are_scored_against_their_own_tokens(tmp_path, checkpoint, cache):
    s = suite(tmp_path, checkpoint)
    loaded = Bench(s, progress=False).load(s.models[0])
    own = [{"p_ids": r.p_ids, "g_ids": r.g_ids} for r in loaded.references]
    other = [{"p_ids": own[0]["p_ids"], "g_ids": [(g + 1) % 283 for g in own[0]["g_ids"]]}]
    (tmp_path / "refs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in own + other))
    s = suite(tmp_path, checkpoint, datasets={"imported": {"references": "refs.jsonl"}})
    bench = Bench(s, decode="stepwise", progress=False)
    record = bench.run(s.cases()[0])
    accs = [x["acc1"] for x in record["samples"]]
    assert accs[:3] == [1.0, 1.0, 1.0] and accs[3] == 0.0
    assert record["samples"][0]["template"] == "ids"


def test_calibration_only_datasets_are_neither_referenced_nor_scored_nor_limited(tmp_path, checkpoint, cache):
    (tmp_path / "calib.jsonl").write_text((ROOT / "data" / "calibration.jsonl").read_text())
    s = suite(tmp_path, checkpoint, datasets={"mixed": "mixed.jsonl", "calib": {"path": "calib.jsonl", "score": False}})
    bench = Bench(s, limit=1, progress=False)
    record = bench.run(s.cases()[0])
    assert bench.generated == 1 and list(record["datasets"]) == ["mixed"]
    assert [x["dataset"] for x in record["samples"]] == ["mixed"]
    calib = bench.loaded.calibration("calib", 100)
    assert len(calib) == len((ROOT / "data" / "calibration.jsonl").read_text().splitlines()) == 16


def test_a_model_built_in_process_is_used_as_given_and_warmed_up_once(tmp_path, checkpoint, cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fidbench import engine, models

    s = suite(tmp_path, checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    warmed = []
    monkeypatch.setattr(engine, "warm_up", warmed.append)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("Bench.load loaded a model it was given"))
    bench = Bench(s, progress=False)
    loaded = bench.load(s.models[0], model, tokenizer)
    assert loaded.model is model and loaded.tokenizer is tokenizer and warmed == [model]
    assert bench.load(s.models[0]) is loaded and warmed == [model]  # the same model: no second warm-up
    assert bench.run(s.cases()[0])["scores"]["acc1"] >= 0.95
    with pytest.raises(ValueError, match="needs its tokenizer"):
        Bench(s, progress=False).load(s.models[0], model)


def test_on_sample_sees_every_scored_sample_s_logits(tmp_path, checkpoint, cache):
    s = suite(tmp_path, checkpoint, ", max_length: 200, overlong: skip")
    seen = []
    record = Bench(s, progress=False).run(s.cases()[0], on_sample=seen.append)
    assert [f.logits.shape[0] for f in seen] == [x["n_tokens"] for x in record["samples"]] and len(seen) == 2
