"""The harness end to end on a tiny checkpoint: overlong policy in the results, cached references,
imported reference files."""

import contextlib
import json
import math

import pytest
import torch
from helpers import ROOT, save_tiny

from fidbench import Method, models, register, report
from fidbench.datasets import DatasetError
from fidbench.harness import Bench, SetupError
from fidbench.methods import REGISTRY
from fidbench.suite import load


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", "qwen2")


def suite(tmp_path, checkpoint, model_extra="", datasets=None, methods="methods:\n  origin: {}\n"):
    rows = (ROOT / "data" / "summarization.jsonl").read_text().splitlines()[:1]
    rows += (ROOT / "data" / "facts.jsonl").read_text().splitlines()[:2]
    (tmp_path / "mixed.jsonl").write_text("\n".join(rows) + "\n")
    datasets = datasets or {"mixed": "mixed.jsonl"}
    (tmp_path / "s.yaml").write_text(
        "generation: {max_new_tokens: 8}\n"
        f"models:\n  tiny: {{path: {checkpoint}{model_extra}}}\n"
        f"datasets: {json.dumps(datasets)}\n"
        + methods
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
    (tmp_path / "calib.jsonl").write_text((ROOT / "data" / "train.jsonl").read_text())
    s = suite(tmp_path, checkpoint, datasets={"mixed": "mixed.jsonl", "calib": {"path": "calib.jsonl", "score": False}})
    bench = Bench(s, limit=1, progress=False)
    record = bench.run(s.cases()[0])
    assert bench.generated == 1 and list(record["datasets"]) == ["mixed"]
    assert [x["dataset"] for x in record["samples"]] == ["mixed"]
    calib = bench.loaded.calibration("calib", 100)
    assert len(calib) == len((ROOT / "data" / "train.jsonl").read_text().splitlines()) == 98


def test_continued_calibration_appends_the_base_greedy_continuation_generated_once(tmp_path, checkpoint, cache):
    from fidbench.reference import eos_ids, greedy

    (tmp_path / "calib.jsonl").write_text((ROOT / "data" / "train.jsonl").read_text())
    s = suite(tmp_path, checkpoint, datasets={"mixed": "mixed.jsonl", "calib": {"path": "calib.jsonl", "score": False}})
    loaded = Bench(s, limit=1, progress=False).load(s.models[0])
    prompts = loaded.calibration("calib", 3)
    continued = loaded.calibration("calib", 3, continued=True)
    for p, c in zip(prompts, continued, strict=True):  # generated in one batch: greedy up to fp32 summation order
        assert c[: len(p)] == p and c[len(p):] == greedy(loaded.model, p, 8, eos_ids(loaded.model, loaded.tokenizer))[0]
    again = Bench(s, limit=1, progress=False).load(s.models[0])
    assert again.calibration("calib", 3, continued=True) == continued and again.continuations.generated == 0
    scored = loaded.calibration("mixed", 1, continued=True)  # a scored dataset's continuation is its reference
    assert scored == [loaded.prompts[0].p_ids + loaded.references[0].g_ids]


@pytest.mark.parametrize("method", ["gptq", "awq", "wanda", "sparsegpt"])
def test_every_calibrated_method_calibrates_on_continuations_when_asked(tmp_path, checkpoint, cache, method):
    (tmp_path / "calib.jsonl").write_text((ROOT / "data" / "train.jsonl").read_text())
    params = {"gptq": "bits: 4", "awq": "bits: 4", "wanda": "sparsity: 0.5", "sparsegpt": "sparsity: 0.5"}[method]
    methods = "methods:\n" + "".join(
        f"  {name}: {{method: {method}, {params}, dataset: calib, samples: 2, continued: {c}}}\n"
        for name, c in (("p", "false"), ("c", "true")))
    s = suite(tmp_path, checkpoint, datasets={"mixed": "mixed.jsonl", "calib": {"path": "calib.jsonl", "score": False}},
              methods=methods)
    bench = Bench(s, limit=1, progress=False)
    prompt, continued = (bench.run(case)["kept"]["calibration_tokens"] for case in s.cases())
    assert continued == prompt + sum(len(c) - len(p) for p, c in zip(bench.loaded.calibration("calib", 2),
                                                                      bench.loaded.calibration("calib", 2, True)))
    assert continued > prompt


@pytest.fixture
def nan_method():
    """A method whose last layer's decode attention output turns NaN from the third decode query on (reference
    positions 3.. ; an earlier layer would spread it to every decode position: masked-out NaN values times 0)."""
    saved = dict(REGISTRY)

    @register
    class Poison(Method):
        name = "poison-test"

        def attend(self, call):
            out = call.dense()
            if call.phase.name == "decode" and call.layer_idx == call.module.config.num_hidden_layers - 1:
                out = out.clone()
                out[:, 2:] = float("nan")
            return out

    yield Poison
    REGISTRY.clear()
    REGISTRY.update(saved)


def test_non_finite_logits_fail_the_case_naming_method_sample_and_position_and_the_report_stays_json(
        tmp_path, checkpoint, cache, nan_method):
    s = suite(tmp_path, checkpoint, methods="methods:\n  poisoned: {method: poison-test, floors: {kl_mean: 100}}\n")
    record = Bench(s, progress=False).run(s.cases()[0])
    assert record["outcome"] == "failed" and record["non_finite"] == 3 * 5  # positions 3..7 of each sample
    assert record["failures"][0] == ("method 'poison-test' (variant 'poisoned') gave non-finite logits (NaN or inf) at "
                                     "15 position(s) of 3 sample(s); first: sample mixed[0], position 3")
    assert "kl_mean = nan is not a finite number (floor 100)" in record["failures"]
    assert [x["first_non_finite"] for x in record["samples"]] == [3, 3, 3]
    path = tmp_path / "r.json"
    report.Report(str(path), {}, [record["id"]]).add(record)

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    saved = json.loads(path.read_text(), parse_constant=refuse)["cases"][0]  # strict JSON: no NaN
    assert saved["scores"]["kl_mean"] is None and saved["non_finite"] == 15
    assert math.isnan(record["scores"]["kl_mean"])
    assert report.table([saved], datasets=False).splitlines()[1].split()[-1] == "FAIL"


def test_a_model_whose_prompts_are_all_skipped_fails_with_the_reasons(tmp_path, checkpoint, cache):
    s = suite(tmp_path, checkpoint, ", max_length: 200, overlong: skip")
    record = Bench(s, max_new_tokens=199, progress=False).run(s.cases()[0])
    assert record["outcome"] == "failed" and len(record["skipped"]) == 3
    reasons = sorted({x["reason"] for x in record["skipped"]})
    assert record["failures"] == [f"no prompt was scored: 3 skipped ({'; '.join(reasons)})"]
    assert all("exceeds max_length 200" in r for r in reasons)
    assert record["scores"]["acc1"] is None and record["scores"]["n_tokens"] == 0
    assert report.table([record]).splitlines()[1].split()[-1] == "FAIL"


def test_a_model_that_cannot_be_set_up_is_tried_once(tmp_path, checkpoint, cache, monkeypatch):
    (tmp_path / "empty.jsonl").write_text("\n")
    s = suite(tmp_path, checkpoint, datasets={"empty": "empty.jsonl"})
    calls = []
    real = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: calls.append(1) or real(*a, **k))
    bench = Bench(s, progress=False)
    with pytest.raises(DatasetError, match="empty.jsonl: no prompts"):
        bench.load(s.models[0], "tiny-origin")
    with pytest.raises(SetupError) as e:
        bench.load(s.models[0], "tiny-other")
    assert str(e.value) == (f"model 'tiny' could not be set up (see tiny-origin): DatasetError: "
                            f"{tmp_path / 'empty.jsonl'}: no prompts")
    assert len(calls) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_cuda_device_on_a_cpu_only_torch_is_a_clear_error(checkpoint):
    with pytest.raises(RuntimeError, match=r"device 'cuda': this torch \(.*\) sees no CUDA device"):
        models.load(str(checkpoint), device="cuda")


def test_the_end_of_sequence_ids_are_part_of_the_reference_key(tmp_path, cache):
    model_dir = save_tiny(tmp_path / "eos", "qwen2", eos=5)
    s = suite(tmp_path, model_dir)
    first = Bench(s, progress=False)
    first.load(s.models[0])
    assert first.generated == 3
    again = Bench(s, progress=False)
    again.load(s.models[0])
    assert again.generated == 0
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": 6}))
    changed = Bench(s, progress=False)
    changed.load(s.models[0])
    assert changed.generated == 3  # only the end-of-sequence id changed: the references are made anew


def test_a_model_built_in_process_is_used_as_given_and_warmed_up_once(tmp_path, checkpoint, cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fidbench import engine

    s = suite(tmp_path, checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    warmed = []
    monkeypatch.setattr(engine, "warm_up", warmed.append)
    monkeypatch.setattr(models, "load", lambda *a, **k: pytest.fail("Bench.load loaded a model it was given"))
    bench = Bench(s, progress=False)
    loaded = bench.load(s.models[0], model=model, tokenizer=tokenizer)
    assert loaded.model is model and loaded.tokenizer is tokenizer and warmed == [model]
    assert bench.load(s.models[0]) is loaded and warmed == [model]  # the same model: no second warm-up
    assert bench.run(s.cases()[0])["scores"]["acc1"] >= 0.95
    with pytest.raises(ValueError, match="needs its tokenizer"):
        Bench(s, progress=False).load(s.models[0], model=model)


def test_on_a_gpu_the_model_is_warmed_at_every_reference_s_shapes(tmp_path, checkpoint, cache, monkeypatch):
    from fidbench import engine

    s = suite(tmp_path, checkpoint)
    warmed = []
    monkeypatch.setattr(engine, "warm_up_shapes", lambda model, samples: warmed.append(samples))
    loaded = Bench(s, progress=False).load(s.models[0])
    assert warmed == []  # a CPU: nothing per shape
    monkeypatch.setattr(engine, "plans_per_shape", lambda device: True)
    loaded = Bench(s, progress=False).load(s.models[0])
    assert warmed == [[r for r in loaded.references if r is not None]] and warmed[0]


def test_on_sample_sees_every_scored_sample_s_logits(tmp_path, checkpoint, cache):
    s = suite(tmp_path, checkpoint, ", max_length: 200, overlong: skip")
    seen = []
    record = Bench(s, progress=False).run(s.cases()[0], on_sample=seen.append)
    assert [logits.shape[0] for logits in seen] == [x["n_tokens"] for x in record["samples"]] and len(seen) == 2


def test_a_method_that_does_not_restore_the_weights_fails_its_case_and_later_cases_score_the_base(
        tmp_path, checkpoint, cache):
    saved = dict(REGISTRY)

    @register
    class Careless(Method):
        name = "careless-test"
        kind = "weights"

        @contextlib.contextmanager
        def apply(self, model, context=None):
            with torch.no_grad():
                model.get_output_embeddings().weight.mul_(-1)  # never undone
            yield model

    try:
        s = suite(tmp_path, checkpoint, methods="methods:\n  careless: {method: careless-test}\n  origin: {}\n")
        bench = Bench(s, progress=False)
        careless, origin = (bench.run(case) for case in s.cases())
    finally:
        REGISTRY.clear()
        REGISTRY.update(saved)
    assert careless["outcome"] == "failed" and careless["failures"][0] == (
        "method 'careless-test' (variant 'careless') left the model's weights changed after its apply() exited (it "
        "must restore them); the model is reloaded for the next case")
    assert origin["outcome"] == "passed" and origin["scores"]["acc1"] == 1.0 and origin["failures"] == []
