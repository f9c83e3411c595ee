"""benchmarks/run.py end to end on a tiny checkpoint: every target writes its records (no timings asserted)."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT, save_tiny


@pytest.mark.slow
def test_every_target_writes_its_records(tmp_path, cache):
    model = save_tiny(tmp_path / "tiny", "llama")
    out = tmp_path / "last.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--model", str(model), "--methods", "origin,topk,nosuch",
           "--repeats", "2", "--prompt-tokens", "64", "--reference-tokens", "8", "--long-tokens", "96",
           "--suite-limit", "1", "--threads", "1", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "note: nosuch: not registered in this checkout" in run.stdout
    records = json.loads(out.read_text())
    assert sorted({(r["target"], r["baseline"]) for r in records}) == [(1, "forward"), (1, "stepwise"), (2, "origin"), (3, "origin"), (4, "forward")]
    fields = {"target", "case", "baseline", "ours_s", "baseline_s", "ratio", "argmax_agreement", "peak_rss_mb",
              "baseline_peak_rss_mb", "device", "dtype", "criterion", "met"}
    for r in records:
        assert fields <= set(r) and r["device"].startswith("cpu") and r["dtype"] == "fp32"
        if r["target"] == 4:
            assert r["ratio"] == (r["ours_s"] - r["baseline_s"]) / r["ours_s"] and r["generated"] == 0
        else:
            assert r["ratio"] == r["ours_s"] / r["baseline_s"] and r["peak_rss_mb"] > 0
    step = {r["case"].split(":")[0]: r for r in records if r["baseline"] == "stepwise"}
    assert sorted(step) == ["origin", "topk"] and step["origin"]["argmax_agreement"] >= 0.99
    assert [r["case"].split(":")[0] for r in records if r["target"] in (2, 3)] == ["topk", "topk"]
    # A rerun of one target and method replaces that method's records of the target and keeps the others.
    cmd[cmd.index("--methods") + 1] = "origin"
    subprocess.run(cmd + ["--targets", "1"], capture_output=True, text=True, timeout=600, check=True)
    again = json.loads(out.read_text())
    assert len(again) == len(records)
    assert [r for r in again if r["method"] != "origin"] == [r for r in records if r["method"] != "origin"]
    assert [r for r in again if r["method"] == "origin" and r["target"] == 4] == [r for r in records if r["target"] == 4]
    assert [r["ours_s"] for r in again if r["method"] == "origin" and r["target"] == 1] != [
        r["ours_s"] for r in records if r["method"] == "origin" and r["target"] == 1]
    show = subprocess.run(cmd[:2] + ["--show", "--out", str(out)], capture_output=True, text=True, check=True)
    assert "| target |" in show.stdout and "origin: decode 8 tokens" in show.stdout
