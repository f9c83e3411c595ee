"""benchmarks/run.py: every target writes its records (no timings asserted), --shape builds real shapes in place,
a killed run keeps what it measured, CUDA peaks are reset per measurement."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, save_tiny

RUN = ROOT / "benchmarks" / "run.py"
TOKENIZER = ROOT / "benchmarks" / "gpu" / "tokenizer"


@pytest.fixture(scope="module")
def run():
    """benchmarks/run.py as a module."""
    spec = importlib.util.spec_from_file_location("benchmark_run", RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_target_writes_its_records(tmp_path, cache):
    model = save_tiny(tmp_path / "tiny", "llama")
    out = tmp_path / "last.json"
    cmd = [sys.executable, str(RUN), "--model", str(model), "--methods", "origin,topk,sage-attention,nosuch",
           "--repeats", "2", "--prompt-tokens", "64", "--reference-tokens", "8", "--long-tokens", "96",
           "--suite-limit", "1", "--threads", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "note: nosuch: not registered in this checkout" in run.stdout
    records = json.loads(out.read_text())
    assert sorted({(r["target"], r["method"], r["baseline"]) for r in records}) == [
        (1, "origin", "forward"), (1, "origin", "forwards"), (1, "origin", "stepwise"),
        (1, "sage-attention", "forward"), (1, "sage-attention", "origin step"), (1, "sage-attention", "stepwise"),
        (1, "topk", "forward"), (1, "topk", "origin step"), (1, "topk", "stepwise"),
        (2, "sage-attention", "origin"), (2, "topk", "origin"), (3, "sage-attention", "origin"), (3, "topk", "origin"),
        (4, "origin", "forward"), (4, "origin", "second case")]
    fields = {"target", "case", "baseline", "ours_s", "baseline_s", "ratio", "argmax_agreement", "device", "dtype",
              "model", "criterion", "met"}
    for r in records:
        assert fields <= set(r) and r["device"].startswith("cpu") and r["dtype"] == "fp32" and r["model"] == "tiny"
        assert r["ratio"] == r["ours_s"] / r["baseline_s"] and r["ours_s"] > 0
        if r["target"] in (2, 3):
            assert r["peak_rss_mb"] > 0 and r["kind"] == "attention"
    step = {r["method"]: r for r in records if r["baseline"] == "stepwise"}
    assert step["origin"]["argmax_agreement"] >= 0.99
    first = next(r for r in records if r["baseline"] == "second case")
    assert [sorted(t) for t in first["timing"]] == [["batch_size", "decode_s", "prefill_s"]] * 2
    assert next(r for r in records if r["target"] == 4 and r["baseline"] == "forward")["generated"] == 0
    # A rerun of one target and method replaces that method's records of the target and keeps the others.
    cmd[cmd.index("--methods") + 1] = "origin"
    subprocess.run(cmd + ["--targets", "1"], capture_output=True, text=True, timeout=600, check=True)
    again = json.loads(out.read_text())
    assert len(again) == len(records)
    assert [r for r in again if r["method"] != "origin"] == [r for r in records if r["method"] != "origin"]
    assert [r for r in again if r["target"] == 4] == [r for r in records if r["target"] == 4]
    assert [r["ours_s"] for r in again if r["method"] == "origin" and r["target"] == 1] != [
        r["ours_s"] for r in records if r["method"] == "origin" and r["target"] == 1]
    show = subprocess.run([sys.executable, str(RUN), "--show", "--out", str(out)], capture_output=True, text=True,
                          check=True)
    assert "| target |" in show.stdout and "origin: decode 8 tokens" in show.stdout


@pytest.mark.slow
def test_a_killed_run_keeps_the_records_it_wrote(tmp_path, cache):
    out = tmp_path / "last.json"
    cmd = [sys.executable, str(RUN), "--shape", "tiny", "--tokenizer", str(TOKENIZER), "--targets", "1,2",
           "--methods", "origin,topk", "--repeats", "2", "--prompt-tokens", "64", "--reference-tokens", "8",
           "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:  # a record is written before its line is printed
            if " vs forwards: " in line:
                break
    finally:
        proc.kill()
        proc.wait()
    records = json.loads(out.read_text())
    assert [(r["method"], r["baseline"]) for r in records][:2] == [("origin", "forward"), ("origin", "forwards")]
    assert all(r["model"] == "llama-tiny-random" for r in records)
    assert not any(r["target"] == 2 for r in records)  # killed during target 1


def test_shapes_are_the_llama_shapes_they_name(run):
    counts = {}
    for shape in ("8b", "3b", "1b"):
        args = run.parse(["--shape", shape, "--device", "meta", "--dtype", "bf16", "--tokenizer", str(TOKENIZER)])
        model, tok = run.make_model(args, run.model_spec(args))
        assert next(model.parameters()).dtype == torch.bfloat16 and model.config.vocab_size == len(tok) == 49152
        counts[shape] = sum(p.numel() for p in model.parameters())
    # Llama-3.1-8B, -3.2-3B, -3.2-1B with a 49,152-token vocabulary instead of 128,256 (1-3B tie their embeddings).
    assert round(counts["8b"] / 1e6) == 7382 and round(counts["3b"] / 1e6) == 2970 and round(counts["1b"] / 1e6) == 1074


def test_a_shape_is_built_the_same_in_every_process(run):
    args = run.parse(["--shape", "tiny", "--tokenizer", str(TOKENIZER)])
    a, _ = run.make_model(args, run.model_spec(args))
    b, _ = run.make_model(args, run.model_spec(args))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_cuda_peak_is_reset_before_each_measurement(run, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: calls.append("peak") or 3 * 2**20)
    m = run.measure("cuda", lambda: calls.append("work") or 7)
    assert calls == ["reset", "sync", "work", "sync", "peak"]
    assert m.out == 7 and m.cuda_mb == 3 and m.seconds >= m.host_s >= 0


def test_a_time_box_stops_a_measurement(run):
    with pytest.raises(run.TimeBox):
        with run.time_box(0.05):
            while True:
                pass


def test_suite_times_a_whole_pytest_run_and_reads_each_case_from_its_report(tmp_path):
    # benchmarks/suite.py: a fresh pytest process over a suite, this checkout's plugin switched in as for a worktree.
    from helpers import save_words, words_suite

    spec = importlib.util.spec_from_file_location("benchmark_suite", ROOT / "benchmarks" / "suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    assert suite.plugin_switch(ROOT) == ["-p", "no:fidbench", "-p", "fidbench.pytest_plugin"]
    with pytest.raises(SystemExit, match="no-such-revision: fatal"):  # a clear error, not a traceback
        suite.checkout("no-such-revision", tmp_path)
    path = words_suite(tmp_path, save_words(tmp_path / "base", "llama"),
                       {"origin": {}, "topk": {"method": "topk", "keep": 0.5}, "h2o": {"method": "h2o", "budget": 2}})
    r = suite.run(ROOT, ["tests/methods", "--fidbench-config", str(path), "--fidbench-free-run", "-k", "not h2o"],
                  tmp_path / "cache", tmp_path / "run.log")
    assert r["exit"] == 0 and "2 passed, 1 deselected" in r["summary"], (tmp_path / "run.log").read_text()
    assert sorted(r["cases"]) == ["tiny-origin", "tiny-topk"]
    for case in r["cases"].values():
        assert case["outcome"] == "passed" and case["acc1"] > 0
        assert case["prefill_s"] > 0 and case["decode_s"] > 0 and case["free_run_s"] > 0
