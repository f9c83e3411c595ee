"""Scaling out: each xdist worker on its own GPU (the GPUs mocked on CPU), a model's cases on one worker, and
shards of a run (--fidbench-shard) whose reports merged equal the whole run's, also run at once on one cache."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import checkpoints_fixture, fill_project

from fidbench import cli, models

SUITE = """
generation: {max_new_tokens: 4}
models:
  tiny-a: {path: a, max_length: 256, device: DEVICE}
  tiny-b: {path: b, max_length: 256, device: DEVICE}
datasets:
  chat: chat.jsonl
methods:
  origin: {}
  topk-10: {method: topk, keep: 0.1, min_keep: 2}
  streamingllm-25: {method: streamingllm, ratio: 0.25}
"""
ORDER = [f"tiny-{m}-{v}" for m in "ab" for v in ("origin", "topk-10", "streamingllm-25")]
# The project's conftest: CUDA "has" four GPUs, and every model load says where it was asked to go, then loads on CPU.
MOCK_GPUS = """
import json, os
import torch
from fidbench import models

real_count, real = torch.cuda.device_count, models.load
torch.cuda.device_count = lambda: 4


def load(path, tokenizer=None, dtype="fp32", device="cpu"):
    with open("loads.jsonl", "a") as f:
        f.write(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER"), "model": os.path.basename(path),
                            "device": device}) + "\\n")
    return real(path, tokenizer, dtype, "cpu")


models.load = load


def pytest_unconfigure(config):  # an inline run shares this process with the tests after it
    torch.cuda.device_count, models.load = real_count, real
"""


checkpoints = checkpoints_fixture(a="llama", b="qwen2")


@pytest.fixture
def project(pytester, checkpoints, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # this test may itself run in an xdist worker
    return fill_project(pytester, monkeypatch, checkpoints, "suite.yaml", SUITE.replace("DEVICE", "cpu"), prompts=1)


def loads(project) -> list[dict]:
    return [json.loads(line) for line in (project.path / "loads.jsonl").read_text().splitlines()]


def test_cuda_means_the_worker_s_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    device = models.worker_device
    assert [device("cuda", f"gw{n}") for n in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert device("cuda", None) == "cuda"  # not under xdist: the current device
    assert [device("cuda", f"gw{n}", ["cuda:4", "cuda:6"]) for n in range(3)] == ["cuda:4", "cuda:6", "cuda:4"]
    assert device("cuda", None, ["cuda:5"]) == "cuda:5"
    for pinned in ("cpu", "cuda:2", "auto"):  # a pinned device, and auto for a model larger than one GPU, stay
        assert device(pinned, "gw3", ["cuda:0"]) == pinned
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a worker whose CUDA_VISIBLE_DEVICES shows one GPU
    assert device("cuda", "gw5") == "cuda"


def test_a_worker_loads_cuda_models_on_its_gpu(project, monkeypatch):
    (project.path / "suite.yaml").write_text(SUITE.replace("DEVICE", "cuda"))
    (project.path / "conftest.py").write_text(MOCK_GPUS)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")  # what xdist sets in worker gw3
    before = (models.load, torch.cuda.device_count())
    project.runpytest("suite.yaml", "-k", "origin", "--fidbench-quiet", "--benchmark-disable").assert_outcomes(passed=2)
    assert [(r["model"], r["device"]) for r in loads(project)] == [("a", "cuda:3"), ("b", "cuda:3")]
    result = project.runpytest("suite.yaml", "--fidbench-devices", "cuda:0, nowhere")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--fidbench-devices: 'nowhere' is not a torch device (expected e.g. cuda:0,cuda:1)*"])
    assert (models.load, torch.cuda.device_count()) == before  # the mocks end with the inline run: later tests' own


@pytest.mark.slow
def test_xdist_workers_load_each_model_once_on_their_own_gpus(project):
    (project.path / "suite.yaml").write_text(SUITE.replace("DEVICE", "cuda"))
    (project.path / "conftest.py").write_text(MOCK_GPUS)
    result = project.runpytest_subprocess("suite.yaml", "-n", "2", "--dist", "loadgroup", "--fidbench-devices",
                                          "cuda:2,cuda:3", "--fidbench-quiet", "--fidbench-report", "r.json")
    result.assert_outcomes(passed=6)
    done = loads(project)
    assert sorted(r["model"] for r in done) == ["a", "b"]  # each model loaded once: its cases stayed on one worker
    assert sorted((r["worker"], r["device"]) for r in done) == [("gw0", "cuda:2"), ("gw1", "cuda:3")]
    assert [c["id"] for c in json.loads((project.path / "r.json").read_text())["cases"]] == ORDER


def ids(result) -> list[str]:
    return [line.split("[")[1].rstrip("]") for line in result.stdout.lines if "::test_fidelity[" in line]


def test_a_shard_is_a_fixed_share_of_the_suite_and_the_rest_is_deselected(project):
    result = project.runpytest("suite.yaml", "--collect-only", "-q", "--fidbench-shard", "1/2")
    assert ids(result) == ORDER[0::2]  # round-robin over the suite's order
    result.stdout.fnmatch_lines(["3/6 tests collected (3 deselected)*"])
    assert ids(project.runpytest("suite.yaml", "--collect-only", "-q", "--fidbench-shard", "2/2")) == ORDER[1::2]
    # A case's shard depends on its place in the suite, not on what else is selected.
    assert ids(project.runpytest("suite.yaml", "--collect-only", "-q", "-k", "tiny-b", "--fidbench-shard", "1/2")) == [
        "tiny-b-topk-10"]
    assert ids(project.runpytest("suite.yaml", "--collect-only", "-q", "--fidbench-shard", "3/3")) == ORDER[2::3]


@pytest.mark.parametrize("value", ["0/2", "3/2", "2", "a/b", "1/0"])
def test_a_bad_shard_is_a_usage_error(project, value):
    result = project.runpytest("suite.yaml", "--fidbench-shard", value)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*--fidbench-shard: must be I/N, shard I of N with 1 <= I <= N, got '{value}'*"])


def merged(project, *reports: str) -> list[dict]:
    """The cases of ``fidbench merge <reports> -o merged.json``."""
    assert cli.main(["merge", *reports, "-o", "merged.json"]) == 0
    return json.loads((project.path / "merged.json").read_text())["cases"]


def untimed(cases: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "timing"} for c in cases]  # timing differs from run to run


def test_shards_merged_equal_the_whole_run(project):
    args = ("suite.yaml", "--fidbench-quiet", "--benchmark-disable")
    project.runpytest(*args, "--fidbench-report", "all.json").assert_outcomes(passed=6)
    for i in (1, 2):
        shard = project.runpytest(*args, "--fidbench-shard", f"{i}/2", "--fidbench-report", f"s{i}.json")
        shard.assert_outcomes(passed=3)
    whole = json.loads((project.path / "all.json").read_text())
    shards = [json.loads((project.path / f"s{i}.json").read_text()) for i in (1, 2)]
    assert [s["settings"]["shard"] for s in shards] == ["1/2", "2/2"] and "shard" not in whole["settings"]
    assert [[c["id"] for c in s["cases"]] for s in shards] == [ORDER[0::2], ORDER[1::2]]
    assert untimed(merged(project, "s1.json", "s2.json")) == untimed(whole["cases"])


@pytest.mark.slow
def test_two_shards_at_once_on_one_cache_with_lock_files(project):
    """Two processes, as two machines on a network filesystem would: FIDBENCH_LOCK=file, one reference cache."""
    env = {**os.environ, "FIDBENCH_LOCK": "file", "FIDBENCH_CACHE": str(project.path / "cache")}
    env.pop("PYTEST_XDIST_WORKER", None)
    cmd = [sys.executable, "-m", "pytest", "suite.yaml", "--fidbench-quiet", "--benchmark-disable",
           "-p", "no:cacheprovider"]
    shards = [subprocess.Popen([*cmd, "--fidbench-shard", f"{i}/2", "--fidbench-report", f"s{i}.json"],
                               cwd=project.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for i in (1, 2)]
    for shard in shards:
        out, _ = shard.communicate(timeout=600)
        assert shard.returncode == 0, out[-3000:]
    references = sorted((project.path / "cache" / "references").glob("*/*.safetensors"))
    assert len(references) == 2 and not list((project.path / "cache").glob("**/*.lock"))  # one per model; locks gone
    whole = subprocess.run([*cmd, "--fidbench-report", "all.json"], cwd=project.path, env=env, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stdout[-3000:]
    whole = json.loads((project.path / "all.json").read_text())
    assert untimed(merged(project, "s1.json", "s2.json")) == untimed(whole["cases"])
