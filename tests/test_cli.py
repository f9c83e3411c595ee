"""The ``fidbench`` command: the methods listing and ``import-runs``."""

import dataclasses
import json
import re

import pytest
from helpers import ROOT

from fidbench import cli
from fidbench.legacy import runs
from fidbench.methods import REGISTRY
from fidbench.suite import load

TOPK = {
    "draft_kwargs": {"enable": True, "mask_out": 0.9, "bench_mark": False, "min_remain": 8},
    "enable_lora": False,
    "lora_kwargs": {"lora_rank": 128, "lora_alpha": 512, "lora_dropout": 0.1},
}


def run_config(path, method, config=None, nested=True, **model):
    conf = {"model_name": "/models/Llama-3.1-8B-Instruct", "model_dtype": "bf16", "model_method": method,
            "save_ckp": None, "load_ckp": None, "config": config, "device_map": None, "max_length": 131072, **model}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": conf, "generation_kwargs": {}} if nested else conf))


@pytest.fixture
def scripts(tmp_path):
    """A directory laid out like the original scripts: runs/ (with a subfolder) and config/."""
    root = tmp_path / "scripts"
    (root / "config").mkdir(parents=True)
    (root / "config" / "topk.json").write_text(json.dumps(TOPK))
    runs = root / "runs"
    run_config(runs / "llama3.1-8b-instruct-origin.json", "origin")
    run_config(runs / "llama3.1-8b-instruct-topk-llama.json", "topk-llama", "config/topk.json")
    qwen = {"model_name": "/models/Qwen2.5-7B-Instruct", "tokenizer_name": "/models/qwen-tok",
            "model_dtype": "fp16", "device_map": "cuda:0", "max_length": 32768}
    run_config(runs / "sage" / "qwen2.5-7b-instruct-sage-attention.json", "sage-attention", nested=False, **qwen)
    run_config(runs / "qwen2.5-7b-instruct-flash-attention-fp8.json", "flash-attention-fp8", **qwen)
    run_config(runs / "qwen2.5-7b-instruct-topk.json", "topk", {"mask_out": 0.75, "min_remain": 16}, **qwen)
    return root


def test_methods_lists_every_method_with_its_parameters_and_defaults(capsys):
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in REGISTRY.items():
        assert f"{name}  (" in out and cls.description in out
        assert len(cls.defaults_from) > 20 and f"    defaults from: {cls.defaults_from}\n" in out  # a real source
        for field in dataclasses.fields(cls):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            assert f"    {field.name}: " in out and f"= {default!r}" in out
    assert "keep: float = 0.1" in out


def test_import_runs_writes_a_suite_that_loads(scripts, tmp_path, capsys):
    out = tmp_path / "suite.yaml"
    assert cli.main(["import-runs", str(scripts), "-o", str(out)]) == 0
    assert "2 model(s), 5 variant(s)" in capsys.readouterr().out
    suite = load(out)
    models = {m.name: m for m in suite.models}
    assert sorted(models) == ["llama3.1-8b-instruct", "qwen2.5-7b-instruct"]
    llama, qwen = models["llama3.1-8b-instruct"], models["qwen2.5-7b-instruct"]
    # device_map null: the scripts loaded with device_map="auto".
    assert (llama.path, llama.dtype, llama.device, llama.max_length, llama.tokenizer) == \
        ("/models/Llama-3.1-8B-Instruct", "bf16", "auto", 131072, None)
    assert (qwen.path, qwen.tokenizer, qwen.dtype, qwen.device, qwen.max_length) == \
        ("/models/Qwen2.5-7B-Instruct", "/models/qwen-tok", "fp16", "cuda:0", 32768)
    assert {v.name: (v.method, v.params) for v in suite.variants} == {
        "flash-attention-fp8": ("fp8-attention", {}),
        "origin": ("origin", {}),
        "topk-llama": ("topk", {"keep": 0.1, "min_keep": 8}),
        "sage-attention": ("sage-attention", {}),
        "topk": ("topk", {"keep": 0.25, "min_keep": 16}),
    }
    default = load(ROOT / "fidbench.yaml")
    # every dataset of the default suite, of the same kind, with its flags and window sizes
    assert suite.datasets == default.datasets


def test_import_runs_merges_identical_configs_and_takes_datasets(scripts, tmp_path):
    run_config(scripts / "runs" / "qwen2.5-7b-instruct-topk-qwen.json", "topk-qwen", "config/topk.json",
               model_name="/models/Qwen2.5-7B-Instruct", tokenizer_name="/models/qwen-tok",
               model_dtype="fp16", device_map="cuda:0", max_length=32768)
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out" / "suite.yaml"
    out.parent.mkdir()
    assert cli.main(["import-runs", str(scripts / "runs"), "-o", str(out), "--datasets", f"chat={data}",
                     str(data)]) == 0
    suite = load(out)
    assert len(suite.variants) == 5  # topk-qwen has topk-llama's config: one variant
    assert [(d.name, d.path) for d in suite.datasets] == [("chat", data), ("mine", data)]


@pytest.mark.parametrize("method,config,message", [
    ("topk", {"mask_out": "0.9", "min_remain": 8}, r"mask_out must be a number in \[0, 1\), got \"0.9\""),
    ("topk", {"mask_out": 0.9, "min_remain": True}, "min_remain must be a positive integer, got true"),
    ("topk", {"draft_kwargs": [0.9]}, r"draft_kwargs must be an object, got \[0.9\]"),
    ("origin", 7, "config must be null, an object or a JSON file path, got 7"),
    ("transmla", None, r"unknown method 'transmla'.*method: legacy"),
    ("medusa", {"checkpoint": "/heads", "heads": 3}, r"must be exactly \{\"checkpoint\": <heads directory>\}"),
    ("awq", {"w_bit": 4}, "method 'awq'"),  # with a config it is no pre-made checkpoint: a method to convert
    ("topk", {"draft_kwargs": {"mask_out": 0.9, "min_remain": 8, "fix_layers": [0, 1]}}, "fix_layers"),
    ("topk", {"mask_out": 0.9}, "no min_remain"),
    ("sage-attention", {"smooth": True}, "takes no config"),
    ("origin", "config/missing.json", "config file 'config/missing.json' not found"),
])
def test_import_runs_errors_name_the_file_and_the_problem(scripts, tmp_path, capsys, method, config, message):
    bad = scripts / "runs" / f"qwen2.5-7b-instruct-{method}-bad.json"
    run_config(bad, method, config)
    out = tmp_path / "suite.yaml"
    assert cli.main(["import-runs", str(scripts), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and re.search(message, err)
    assert not out.exists()


@pytest.mark.parametrize("field,value,message", [
    ("model_name", ["x"], 'model_name must be a string, got ["x"]'),
    ("model_method", ["topk"], 'model_method must be a string, got ["topk"]'),
    ("max_length", "long", 'max_length must be an integer or null, got "long"'),
    ("tokenizer_name", 3, "tokenizer_name must be a string or null, got 3"),
])
def test_import_runs_names_the_file_and_the_field_of_a_wrong_type(scripts, tmp_path, capsys, field, value, message):
    bad = scripts / "runs" / "bad-origin.json"
    run_config(bad, "origin", **{field: value})
    assert cli.main(["import-runs", str(scripts), "-o", str(tmp_path / "suite.yaml")]) == 2
    err = capsys.readouterr().err
    assert err == f"fidbench import-runs: error: {bad}: {message}\n"


def test_import_runs_names_a_file_that_is_not_utf8(scripts, tmp_path, capsys):
    bad = scripts / "runs" / "bad-origin.json"
    bad.write_bytes(b'{"model_name": "caf\xe9", "model_method": "origin"}')
    assert cli.main(["import-runs", str(scripts), "-o", str(tmp_path / "suite.yaml")]) == 2
    assert capsys.readouterr().err == f"fidbench import-runs: error: {bad}: not UTF-8 text (byte 19)\n"


def test_import_runs_does_not_overwrite_without_force(scripts, tmp_path):
    out = tmp_path / "suite.yaml"
    out.write_text("keep me")
    with pytest.raises(SystemExit):
        cli.main(["import-runs", str(scripts), "-o", str(out)])
    assert out.read_text() == "keep me"
    assert cli.main(["import-runs", str(scripts), "-o", str(out), "--force"]) == 0
    assert load(out).variants


def _case(case_id: str, acc1: float, failures: list) -> dict:
    scores = {"n_tokens": 10, "acc1": acc1, "acc5": 1.0, "kl_mean": 0.5, "kl_p99": 2.0, "nll_ratio": 1.1,
              "first_divergence": 3.0}
    return {"id": case_id, "kept": {"kv_fraction": 0.25}, "scores": scores,
            "datasets": {"code": scores, "math": {**scores, "n_tokens": 0}},
            "timing": {"prefill_s": 0.5, "decode_s": 0.25}, "failures": failures}


def test_report_prints_a_saved_report(tmp_path, capsys):
    path = tmp_path / "r.json"
    cases = [_case("m-origin", 1.0, []), _case("m-topk", 0.75, ["acc1"])]
    path.write_text(json.dumps({"environment": {}, "cases": cases}))
    assert cli.main(["report", str(path)]) == 0
    text = capsys.readouterr().out.splitlines()
    # per-dataset rows for datasets with tokens, then the overall row with the verdict
    assert [line.split()[:2] for line in text[1:]] == [["m-origin", "code"], ["m-origin", "all"],
                                                       ["m-topk", "code"], ["m-topk", "all"]]
    assert text[2].split()[-1] == "ok" and text[4].split()[-1] == "FAIL"
    assert cli.main(["report", str(path), "--overall", "--markdown"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[1].startswith("| --- |") and len(rows) == 4
    assert rows[3].startswith("| m-topk | all | 0.7500 | 1.0000 |") and rows[3].endswith("| FAIL |")


def test_report_of_a_file_that_is_not_a_report_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text("[1, 2]")
    assert cli.main(["report", str(path)]) == 2
    assert "is not a fidbench report" in capsys.readouterr().err


def test_environment_names_the_commit_and_uncommitted_changes(tmp_path, monkeypatch):
    import subprocess

    from fidbench import report

    monkeypatch.chdir(tmp_path)
    assert report.environment()["commit"] is None  # not a git checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.py").write_text("a = 1\n")
    subprocess.run([*git, "add", "f.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    env = report.environment()
    assert len(env["commit"]) == 40 and env["dirty"] is False
    (tmp_path / "f.py").write_text("a = 2\n")
    assert report.environment()["dirty"] is True


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("kept"), "cases[1].kept: missing"),
    (lambda c: c.update(scores={**c["scores"], "acc1": "0.9"}),
     'cases[1].scores.acc1: expected a number or null, got "0.9"'),
    (lambda c: c["datasets"].update(code=[1]), "cases[1].datasets.code: expected an object of scores, got [1]"),
    (lambda c: c.update(failures="acc1"), 'cases[1].failures: expected a list of strings, got "acc1"'),
    (lambda c: c["timing"].pop("decode_s"), "cases[1].timing.decode_s: missing"),
    (lambda c: c.update(outcome="great"),
     'cases[1].outcome: expected passed or failed or error or skipped, got "great"'),
    (lambda c: c.update(id=5), "cases[1].id: expected a string, got 5"),
])
def test_report_names_the_file_and_the_field_of_a_malformed_report(tmp_path, capsys, change, message):
    path = tmp_path / "r.json"
    doc = {"environment": {}, "cases": [_case("m-origin", 1.0, []), _case("m-topk", 0.75, [])]}
    change(doc["cases"][1])
    path.write_text(json.dumps(doc))
    assert cli.main(["report", str(path)]) == 2
    assert capsys.readouterr().err == f"fidbench report: error: {path}: {message}\n"


def _sampled(case: dict) -> dict:
    return {**case, "samples": [{"dataset": "code", "index": i, "n_tokens": 5, "acc1": 0.5, "acc5": 1.0,
                                 "kl_mean": 0.5} for i in range(2)]}


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format=99), "format: expected a report format 1 to 4 (this fidbench's), got 99: written by a "
                                    "newer fidbench, or not by fidbench"),
    (lambda d: d.update(format="4"), 'format: expected a report format 1 to 4 (this fidbench\'s), got "4"'),
    (lambda d: d["cases"][1]["scores"].update(acc1=7.5), "cases[1].scores.acc1: 7.5 is outside its range [0, 1]"),
    (lambda d: d["cases"][1]["datasets"]["math"].update(kl_mean=-0.5),
     "cases[1].datasets.math.kl_mean: -0.5 is outside its range [0, inf]"),
    (lambda d: d["cases"][1]["kept"].update(kv_fraction=-0.25),
     "cases[1].kept.kv_fraction: expected a fraction in [0, 1] or null, got -0.25"),
    (lambda d: d["cases"][1].update(id="m-origin"), "cases[1].id: 'm-origin' is also cases[0]'s: a case appears once"),
    (lambda d: d["cases"][1].update(samples="oops"), 'cases[1].samples: expected a list of samples, got "oops"'),
    (lambda d: d["cases"][1]["samples"].append(3), "cases[1].samples[2]: expected an object, got 3"),
    (lambda d: d["cases"][1]["samples"][0].pop("dataset"), "cases[1].samples[0].dataset: missing"),
    (lambda d: d["cases"][1]["samples"][1].update(index="1"),
     'cases[1].samples[1].index: expected a count (an integer >= 0), got "1"'),
    (lambda d: d["cases"][1]["samples"][1].update(acc5=1.5), "cases[1].samples[1].acc5: 1.5 is outside its range"),
    (lambda d: d["cases"][1]["samples"][1].update(kl_mean="x"),
     'cases[1].samples[1].kl_mean: expected a number or null, got "x"'),
    (lambda d: d.update(settings=[1]), "settings: expected an object, got [1]"),
])
@pytest.mark.parametrize("command", ["report", "floors", "compare"])
def test_a_report_out_of_its_format_is_refused_by_every_command_with_status_2(tmp_path, capsys, change, message,
                                                                               command):
    """Status 2 (cannot read the input), never 1 (compare: the gate failed) nor a traceback."""
    doc = {"environment": {}, "cases": [_sampled(_case("m-origin", 1.0, [])), _sampled(_case("m-topk", 0.75, []))]}
    good = tmp_path / "good.json"
    good.write_text(json.dumps(doc))
    change(doc)
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    extra = [str(good), "--max-drop", "acc1=0.1"] if command == "compare" else []
    assert cli.main([command, *extra, str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"fidbench {command}: error: {path}: {message}")
    assert cli.main([command, *extra, str(good)]) == 0  # the same document unchanged is read


def test_a_deeply_nested_report_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text('{"cases": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert cli.main(["report", str(path)]) == 2
    assert capsys.readouterr().err == f"fidbench report: error: {path}: not a fidbench report (JSON nested too " \
                                      "deeply to read)\n"


@pytest.mark.parametrize("content,message", [
    (b'{"cases": 5}', "{path}: cases: expected a list of cases, got 5"),
    (b'{"environment": {}}', "{path}: cases: missing"),
    (b'{"cases": []}\xff', "{path}: not UTF-8 text (byte 13)"),
    (b'{"cases": [', "{path}: not valid JSON (Expecting value: line 1 column 12 (char 11))"),
])
def test_report_of_a_broken_file_is_one_line_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "r.json"
    path.write_bytes(content)
    assert cli.main(["report", str(path)]) == 2
    assert capsys.readouterr().err == f"fidbench report: error: {message.format(path=path)}\n"


def test_report_shows_every_case_with_its_outcome_and_never_nan_ok(tmp_path, capsys):
    nan = _case("m-nan", 1.0, [])
    nan["scores"]["kl_mean"] = float("nan")  # as reports before the format 3 could hold it
    stub = {"id": "m-broken", "model": "m", "method": "checkpoint", "variant": "broken", "outcome": "error",
            "error": "ValueError: checkpoint: cannot load 'nowhere'"}
    skipped = {**stub, "id": "m-skipped", "outcome": "skipped", "error": "not run"}
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"cases": [nan, stub, skipped]}))
    assert cli.main(["report", str(path), "--overall"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[-1]) for r in rows] == [("m-nan", "FAIL"), ("m-broken", "ERROR"), ("m-skipped", "SKIP")]


@pytest.fixture
def original(tmp_path):
    """The original scripts' runs of the new methods, laid out as in wenhaoli-xmu/fidbench (paths shortened)."""
    root = tmp_path / "orig"
    (root / "config").mkdir(parents=True)
    (root / "config" / "medusa-qwen2.5-7b.json").write_text(json.dumps({"checkpoint": "/ckpt/medusa_3_qwen7b"}))
    runs = root / "runs"
    base = {"model_name": "/models/Qwen2.5-7B-Instruct", "max_length": 32768}
    run_config(runs / "qwen2.5-7b-instruct.json", "origin", **base)
    run_config(runs / "llama-8b.json", "origin")
    run_config(runs / "medusa" / "qwen2.5-7b-instruct-medusa.json", "medusa", "config/medusa-qwen2.5-7b.json", **base)
    run_config(runs / "awq" / "qwen2.5-7b-instruct-awq.json", "awq", model_name="/ckpt/Qwen2.5-7B-Instruct-AWQ",
               max_length=32768)
    run_config(runs / "sparsegpt" / "qwen2.5-7b-instruct-sparsegpt.json", "sparsegpt",
               model_name="/ckpt/Qwen2.5-7B-Instruct-SparseGPT/", tokenizer_name="/models/Qwen2.5-7B-Instruct",
               model_dtype="fp16", max_length=32768)
    run_config(runs / "gptq" / "qwen2.5-7b-instruct-gptq.json", "gptq",
               model_name="/ckpt/Qwen2.5-7B-Instruct-GPTQ-Int4",
               max_length=32768)
    return root


def test_import_runs_converts_medusa_and_checkpoint_runs(original):
    suite = runs.convert(original, {"chat": "data/chat.jsonl"})
    assert sorted(suite["models"]) == ["llama-8b", "qwen2.5-7b-instruct"]  # checkpoint runs define no model
    assert suite["methods"] == {
        "awq": {"method": "checkpoint", "path": "/ckpt/Qwen2.5-7B-Instruct-AWQ", "models": ["qwen2.5-7b-instruct"]},
        "gptq": {"method": "checkpoint", "path": "/ckpt/Qwen2.5-7B-Instruct-GPTQ-Int4",
                 "models": ["qwen2.5-7b-instruct"]},
        "medusa": {"method": "medusa", "path": "/ckpt/medusa_3_qwen7b", "models": ["qwen2.5-7b-instruct"]},
        "origin": {"method": "origin"},
        "sparsegpt": {"method": "checkpoint", "path": "/ckpt/Qwen2.5-7B-Instruct-SparseGPT/",
                      "tokenizer": "/models/Qwen2.5-7B-Instruct", "dtype": "fp16", "models": ["qwen2.5-7b-instruct"]},
    }


def test_import_runs_keeps_paths_relative_to_the_scripts_meaning_the_same_beside_the_suite(original, tmp_path):
    (original / "config" / "medusa-qwen2.5-7b.json").write_text(json.dumps({"checkpoint": "heads/qwen"}))
    (original / "heads" / "qwen").mkdir(parents=True)  # the scripts read it from their root; the suite reads
    (original / "models" / "qwen").mkdir(parents=True)  # its paths from its own directory, elsewhere
    run_config(original / "runs" / "awq" / "qwen2.5-7b-instruct-awq.json", "awq", model_name="models/qwen",
               max_length=32768)
    suite = runs.convert(original, {"chat": "data/chat.jsonl"})
    assert suite["methods"]["medusa"]["path"] == str(original / "heads" / "qwen")
    assert suite["methods"]["awq"]["path"] == str(original / "models" / "qwen")
    assert suite["models"]["llama-8b"]["path"] == "/models/Llama-3.1-8B-Instruct"  # not under the root: as written


def test_import_runs_suite_runs_model_specific_variants_on_their_model_only(original, tmp_path):
    out = tmp_path / "suite.yaml"
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    assert cli.main(["import-runs", str(original), "-o", str(out), "--datasets", str(data)]) == 0
    cases = [c.id for c in load(out).cases()]
    assert cases == ["llama-8b-origin", "qwen2.5-7b-instruct-awq", "qwen2.5-7b-instruct-gptq",
                     "qwen2.5-7b-instruct-origin",
                     "qwen2.5-7b-instruct-medusa", "qwen2.5-7b-instruct-sparsegpt"]


def test_import_runs_needs_the_base_model_of_a_checkpoint_run(original, capsys, tmp_path):
    (original / "runs" / "qwen2.5-7b-instruct.json").unlink()
    for f in (original / "runs" / "medusa").iterdir():
        f.unlink()
    assert cli.main(["import-runs", str(original), "-o", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "awq run loads the checkpoint '/ckpt/Qwen2.5-7B-Instruct-AWQ' as its model" in err
    assert "base model 'qwen2.5-7b-instruct', which no other run defines" in err
