"""The ``fidbench`` command: the methods listing and ``import-runs``."""

import dataclasses
import json
import re

import pytest
from helpers import ROOT

from fidbench import cli
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
        for field in dataclasses.fields(cls):
            assert f"    {field.name}: " in out and f"= {field.default!r}" in out
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
    assert [(d.name, d.path) for d in suite.datasets] == [(d.name, d.path) for d in default.datasets]


def test_import_runs_merges_identical_configs_and_takes_datasets(scripts, tmp_path):
    run_config(scripts / "runs" / "qwen2.5-7b-instruct-topk-qwen.json", "topk-qwen", "config/topk.json",
               model_name="/models/Qwen2.5-7B-Instruct", tokenizer_name="/models/qwen-tok",
               model_dtype="fp16", device_map="cuda:0", max_length=32768)
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"conversations": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out" / "suite.yaml"
    out.parent.mkdir()
    assert cli.main(["import-runs", str(scripts / "runs"), "-o", str(out), "--datasets", f"chat={data}", str(data)]) == 0
    suite = load(out)
    assert len(suite.variants) == 5  # topk-qwen has topk-llama's config: one variant
    assert [(d.name, d.path) for d in suite.datasets] == [("chat", data), ("mine", data)]


@pytest.mark.parametrize("method,config,message", [
    ("medusa", None, r"unknown method 'medusa'.*method: legacy"),
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
    path.write_text(json.dumps({"environment": {}, "cases": [_case("m-origin", 1.0, []), _case("m-topk", 0.75, ["acc1"])]}))
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
