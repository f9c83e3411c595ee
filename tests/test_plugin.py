"""The pytest plugin end to end, on tiny checkpoints: ids and -k selection, floors, reports, xdist."""

import json
import shutil

import pytest
from helpers import ROOT, save_tiny

SUITE = """
generation: {max_new_tokens: 12}
models:
  tiny-a: {path: a, max_length: 256}
  tiny-b: {path: b, max_length: 256}
datasets:
  chat: chat.jsonl
methods:
  origin: {floors: {acc1: 0.9}}
  topk-10: {method: topk, keep: 0.1, min_keep: 2}
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    save_tiny(root / "a", "llama")
    save_tiny(root / "b", "qwen2")
    return root


@pytest.fixture
def project(pytester, checkpoints, monkeypatch):
    monkeypatch.setenv("FIDBENCH_CACHE", str(pytester.path / "cache"))
    for name in ("a", "b"):
        shutil.copytree(checkpoints / name, pytester.path / name)
    shutil.copy(ROOT / "tests" / "methods" / "test_fidelity.py", pytester.path / "test_fidelity.py")
    lines = (ROOT / "data" / "chat.jsonl").read_text().splitlines()[:2]
    (pytester.path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    (pytester.path / "fidbench.yaml").write_text(SUITE)
    return pytester


def ids(result):
    return sorted(r.nodeid.split("[")[1].rstrip("]") for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call")


def test_cases_are_model_times_variant_and_k_selects_family_and_method(project):
    result = project.runpytest("--fidbench-quiet", "-p", "no:cacheprovider", "--benchmark-disable")
    result.assert_outcomes(passed=4)
    assert ids(result) == ["tiny-a-origin", "tiny-a-topk-10", "tiny-b-origin", "tiny-b-topk-10"]
    result = project.runpytest("-k", "llama and topk", "--fidbench-quiet", "--benchmark-disable")
    result.assert_outcomes(passed=1)
    assert ids(result) == ["tiny-a-topk-10"]
    result = project.runpytest("-k", "qwen2 and not topk", "--fidbench-quiet", "--benchmark-disable")
    assert ids(result) == ["tiny-b-origin"]
    result.stdout.fnmatch_lines(["*fidbench results*", "tiny-b-origin*chat*", "tiny-b-origin*all*ok"])


def test_variant_tags_are_markers(project):
    (project.path / "fidbench.yaml").write_text(SUITE.replace("keep: 0.1,", "keep: 0.1, tags: [quick],"))
    result = project.runpytest("-m", "quick", "--fidbench-quiet", "--benchmark-disable")
    assert ids(result) == ["tiny-a-topk-10", "tiny-b-topk-10"]
    (project.path / "fidbench.yaml").write_text(SUITE.replace("keep: 0.1,", "keep: 0.1, tags: [not-a-name],"))
    result = project.runpytest("--fidbench-quiet")
    result.stdout.fnmatch_lines(["*methods.topk-10.tags: must be a list of marker names*"])


def test_floor_violation_fails_its_case_with_metric_value_and_floor(project):
    (project.path / "fidbench.yaml").write_text(SUITE + "floors:\n  tiny-a:\n    topk-10: {kl_mean: 0.0}\n")
    result = project.runpytest("--fidbench-quiet", "--benchmark-disable")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["*tiny-a-topk-10: kl_mean = * is above its ceiling 0.0*"])


@pytest.mark.parametrize(
    "old,new,message",
    [
        ("keep: 0.1", "kep: 0.1", "fidbench.yaml: methods.topk-10: unknown parameter(s) kep for method 'topk'"),
        ("path: b,", "path: nowhere,", "fidbench.yaml: models.tiny-b: *nowhere*"),
    ],
)
def test_bad_suite_is_a_collection_error_naming_the_key(project, old, new, message):
    (project.path / "fidbench.yaml").write_text(SUITE.replace(old, new))
    result = project.runpytest("--fidbench-quiet")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"*{message}*"])
    assert "Traceback" not in result.stdout.str() and "plugin.py" not in result.stdout.str()


def test_benchmark_json_holds_timings_and_scores(project, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # this test may itself run under xdist
    result = project.runpytest("-k", "llama and topk", "--fidbench-quiet", "--benchmark-json", "out.json")
    result.assert_outcomes(passed=1)
    bench = json.loads((project.path / "out.json").read_text())["benchmarks"]
    assert [b["name"] for b in bench] == ["test_fidelity[tiny-a-topk-10]"]
    extra = bench[0]["extra_info"]
    assert {"prefill_s", "decode_s", "acc1", "acc5", "kl_mean", "first_divergence"} <= set(extra)
    assert 0 < extra["kept"]["kv_fraction"] < 1


@pytest.mark.slow
def test_report_is_the_same_with_and_without_xdist(project):
    project.runpytest_subprocess("--fidbench-quiet", "--fidbench-report", "serial.json", "-p", "no:randomly").assert_outcomes(passed=4)
    result = project.runpytest_subprocess("--fidbench-quiet", "--fidbench-report", "xdist.json", "-n", "2")
    result.assert_outcomes(passed=4)
    serial = json.loads((project.path / "serial.json").read_text())
    xdist = json.loads((project.path / "xdist.json").read_text())
    assert {"versions", "machine", "commit", "dirty"} <= set(serial["environment"])
    assert serial["environment"]["machine"]["workers"] == 1 and xdist["environment"]["machine"]["workers"] == 2
    assert [c["id"] for c in serial["cases"]] == [c["id"] for c in xdist["cases"]] == [
        "tiny-a-origin", "tiny-a-topk-10", "tiny-b-origin", "tiny-b-topk-10"]
    for a, b in zip(serial["cases"], xdist["cases"]):
        assert {"id", "model", "method", "variant", "params", "scores", "datasets", "timing", "kept", "samples"} <= set(a)
        assert a["scores"] == b["scores"] and a["samples"] == b["samples"]
    assert serial["cases"][1]["method"] == "topk" and serial["cases"][1]["params"] == {"keep": 0.1, "min_keep": 2}
    assert serial["cases"][0]["scores"]["acc1"] >= 0.9


def test_batch_size_option_generates_batched_references_apart(project):
    result = project.runpytest("-k", "llama and origin", "--fidbench-quiet", "--benchmark-disable",
                               "--fidbench-batch-size", "2", "--fidbench-report", "b2.json")
    result.assert_outcomes(passed=1)
    report = json.loads((project.path / "b2.json").read_text())
    assert report["settings"]["batch_size"] == 2 and report["cases"][0]["scores"]["acc1"] >= 0.9
    refs = list((project.path / "cache" / "references").glob("tiny-a-*/*.safetensors"))
    assert len(refs) == 2  # the two chat prompts, generated together
    project.runpytest("-k", "llama and origin", "--fidbench-quiet", "--benchmark-disable").assert_outcomes(passed=1)
    assert len(list((project.path / "cache" / "references").glob("tiny-a-*/*.safetensors"))) == 4
    result = project.runpytest("--fidbench-quiet", "--fidbench-batch-size", "0")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*--fidbench-batch-size must be a positive integer*"])
