"""The pytest plugin end to end, on tiny checkpoints: ids and -k selection, floors, reports, xdist."""

import errno
import json
import shutil
import signal
import sys
from pathlib import Path

import pytest
from helpers import ROOT, checkpoints_fixture, fill_project, origin_topk_suite

from fidbench import cli

SUITE = origin_topk_suite({"tiny-a": "a", "tiny-b": "b"}, max_new_tokens=12)


checkpoints = checkpoints_fixture(a="llama", b="qwen2")


@pytest.fixture
def project(pytester, checkpoints, monkeypatch):
    shutil.copy(ROOT / "tests" / "methods" / "test_fidelity.py", pytester.path / "test_fidelity.py")
    return fill_project(pytester, monkeypatch, checkpoints, "fidbench.yaml", SUITE, prompts=2)


def ids(result):
    return sorted(r.nodeid.split("[")[1].rstrip("]")
                  for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call")


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


def test_the_suite_runs_with_xdist_switched_off(project):
    # the plugin implements xdist's hooks; pytest refuses a plugin's unknown hook unless it is marked optional
    result = project.runpytest_subprocess("-p", "no:xdist", "-k", "llama and topk", "--fidbench-quiet",
                                          "--benchmark-disable")
    result.assert_outcomes(passed=1)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


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
    ],
)
def test_bad_suite_is_a_collection_error_naming_the_key(project, old, new, message):
    (project.path / "fidbench.yaml").write_text(SUITE.replace(old, new))
    result = project.runpytest("--fidbench-quiet")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([f"*{message}*"])
    assert "Traceback" not in result.stdout.str() and "pytest_plugin" not in result.stdout.str()


def test_a_model_that_is_not_there_errors_its_own_cases_and_the_others_run(project):
    (project.path / "fidbench.yaml").write_text(SUITE.replace("path: b,", "path: nowhere,"))
    result = project.runpytest("--fidbench-quiet", "--benchmark-disable", "--fidbench-report", "r.json")
    result.assert_outcomes(passed=2, errors=2)  # not a collection error that runs nothing and writes no report
    cases = json.loads((project.path / "r.json").read_text())["cases"]
    assert [(c["id"], c["outcome"]) for c in cases] == [("tiny-a-origin", "passed"), ("tiny-a-topk-10", "passed"),
                                                        ("tiny-b-origin", "error"), ("tiny-b-topk-10", "error")]
    assert {c["error"] for c in cases[2:]} == {f"fidbench: {project.path / 'fidbench.yaml'}: models.tiny-b: 'nowhere' "
                                               f"is neither a model directory nor a hub id in the local Hugging Face "
                                               f"cache"}


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
    serial = project.runpytest_subprocess("--fidbench-quiet", "--fidbench-report", "serial.json", "-p", "no:randomly")
    serial.assert_outcomes(passed=4)
    result = project.runpytest_subprocess("--fidbench-quiet", "--fidbench-report", "xdist.json", "-n", "2")
    result.assert_outcomes(passed=4)
    serial = json.loads((project.path / "serial.json").read_text())
    xdist = json.loads((project.path / "xdist.json").read_text())
    assert {"versions", "machine", "commit", "dirty"} <= set(serial["environment"])
    assert serial["environment"]["machine"]["workers"] == 1 and xdist["environment"]["machine"]["workers"] == 2
    assert [c["id"] for c in serial["cases"]] == [c["id"] for c in xdist["cases"]] == [
        "tiny-a-origin", "tiny-a-topk-10", "tiny-b-origin", "tiny-b-topk-10"]
    for a, b in zip(serial["cases"], xdist["cases"]):
        assert {"id", "model", "method", "variant", "params", "scores", "datasets", "timing", "kept",
                "samples"} <= set(a)
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
    result.stderr.fnmatch_lines(["*--fidbench-batch-size: must be a positive integer*"])


SMALL = """
generation: {max_new_tokens: 4}
models:
  tiny-a: {path: a, max_length: 256}
datasets:
  chat: chat.jsonl
methods:
"""


@pytest.fixture
def small(pytester, checkpoints, monkeypatch):
    """One tiny model, one prompt, 4-token references: for what needs a session, not scores."""
    monkeypatch.setenv("FIDBENCH_CACHE", str(pytester.path / "cache"))
    shutil.copytree(checkpoints / "a", pytester.path / "a")
    shutil.copy(ROOT / "tests" / "methods" / "test_fidelity.py", pytester.path / "test_fidelity.py")
    (pytester.path / "chat.jsonl").write_text((ROOT / "data" / "chat.jsonl").read_text().splitlines()[0] + "\n")
    return pytester


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_every_case_is_in_the_report_with_its_outcome_and_non_finite_logits_fail(small, capsys):
    from safetensors.torch import load_file, save_file

    shutil.copytree(small.path / "a", small.path / "nan")
    weights = load_file(str(small.path / "nan" / "model.safetensors"))
    weights["model.norm.weight"][:] = float("nan")
    save_file(weights, str(small.path / "nan" / "model.safetensors"), metadata={"format": "pt"})
    (small.path / "conftest.py").write_text(
        "import pytest\n\n\n@pytest.fixture(autouse=True)\ndef skip_some(request):\n"
        "    if request.node.name.endswith('-skipme]'):\n        pytest.skip('skipped on purpose')\n")
    (small.path / "fidbench.yaml").write_text(
        SMALL.replace("models:\n", "models:\n  tiny-short: {path: a, max_length: 8, overlong: skip}\n")
        + "  origin: {floors: {acc1: 0.9}}\n  nan: {method: checkpoint, path: nan, floors: {kl_mean: 10}}\n"
          "  broken: {method: checkpoint, path: nowhere}\n  skipme: {method: origin}\n")
    result = small.runpytest("--fidbench-quiet", "--benchmark-disable", "--fidbench-report", "r.json",
                             "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=5, skipped=2)
    cases = strict_json(small.path / "r.json")["cases"]  # strict JSON: no NaN
    outcomes = {c["id"]: (c["outcome"], c["error"]) for c in cases}
    assert [c["id"] for c in cases] == [f"{m}-{v}" for m in ("tiny-short", "tiny-a")
                                        for v in ("origin", "nan", "broken", "skipme")]
    assert outcomes["tiny-a-origin"] == ("passed", None)
    assert outcomes["tiny-a-nan"] == ("failed", None)
    assert outcomes["tiny-a-skipme"] == outcomes["tiny-short-skipme"] == ("skipped", "skipped on purpose")
    for case_id in ("tiny-a-broken", "tiny-short-broken"):  # the method raised: no scores, the error kept
        assert outcomes[case_id][0] == "error" and "checkpoint: cannot load 'nowhere'" in outcomes[case_id][1]
    nan = cases[5]
    assert nan["failures"][0] == ("method 'checkpoint' (variant 'nan') gave non-finite logits (NaN or inf) at 4 "
                                  "position(s) of 1 sample(s); first: sample chat[0], position 0")
    assert nan["non_finite"] == 4 and nan["scores"]["kl_mean"] is None
    for case_id in ("tiny-short-origin", "tiny-short-nan"):  # every prompt skipped: fails, with the reason
        record = cases[[c["id"] for c in cases].index(case_id)]
        assert record["outcome"] == "failed"
        assert record["failures"][0].startswith("no prompt was scored: 1 skipped (prompt of ")
    result.stdout.fnmatch_lines(["*tiny-a-nan: method 'checkpoint' (variant 'nan') gave non-finite logits*",
                                 "*fidbench results*"])
    result.stdout.fnmatch_lines(["fidbench: warning: model tiny-short: 1 of 1 prompts were not scored (overlong: "
                                 "skip; e.g. prompt of * tokens + generation exceeds max_length 8); each case's "
                                 "report record lists them under 'skipped'"])
    # The short test summary after the table repeats failure messages at the terminal's width: not the table.
    table = result.stdout.str().split("fidbench results")[1].split("short test summary info")[0]
    assert "nan" not in table.replace("tiny-a-nan", "").replace("tiny-short-nan", "")
    assert {line.split()[0]: line.split()[-1] for line in table.splitlines()[1:] if line.startswith("tiny-")} == {
        "tiny-short-origin": "FAIL", "tiny-short-nan": "FAIL", "tiny-short-broken": "ERROR",
        "tiny-short-skipme": "SKIP",
        "tiny-a-origin": "ok", "tiny-a-nan": "FAIL", "tiny-a-broken": "ERROR", "tiny-a-skipme": "SKIP"}


@pytest.mark.parametrize("option", ["--benchmark-skip", "--benchmark-only", "--benchmark-disable"])
def test_fidelity_cases_run_and_gate_whatever_pytest_benchmark_is_told(small, monkeypatch, option):
    # else pytest-benchmark, seeing xdist, refuses --benchmark-only
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    strict = "  strict: {method: topk, keep: 0.1, min_keep: 1, floors: {kl_mean: 0.0}}\n"
    (small.path / "fidbench.yaml").write_text(SMALL + "  origin: {floors: {acc1: 0.9}}\n" + strict)
    result = small.runpytest("--fidbench-quiet", option, "--fidbench-report", "r.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    assert [(c["id"], c["outcome"]) for c in strict_json(small.path / "r.json")["cases"]] == [
        ("tiny-a-origin", "passed"), ("tiny-a-strict", "failed")]


def test_cases_a_stopped_session_never_ran_are_in_the_report(small):
    (small.path / "fidbench.yaml").write_text(SMALL + "  strict: {method: topk, keep: 0.1, min_keep: 1, "
                                                      "floors: {kl_mean: 0.0}}\n  origin: {}\n")
    result = small.runpytest("--fidbench-quiet", "-x", "--benchmark-disable", "--fidbench-report", "r.json")
    result.assert_outcomes(failed=1)
    cases = strict_json(small.path / "r.json")["cases"]
    assert [(c["id"], c["outcome"], c["error"]) for c in cases] == [
        ("tiny-a-strict", "failed", None), ("tiny-a-origin", "skipped", "not run: the session ended before this case")]


@pytest.mark.parametrize("args,env,message", [
    (["--fidbench-max-new-tokens", "-5"], {},
     "*argument --fidbench-max-new-tokens: must be a positive integer, got '-5'*"),
    (["--fidbench-max-new-tokens", "0"], {},
     "*argument --fidbench-max-new-tokens: must be a positive integer, got '0'*"),
    (["--fidbench-limit", "0"], {}, "*argument --fidbench-limit: must be a positive integer, got '0'*"),
    (["--fidbench-limit", "two"], {}, "*argument --fidbench-limit: must be a positive integer, got 'two'*"),
    (["--fidbench-batch-size", "-1"], {}, "*argument --fidbench-batch-size: must be a positive integer, got '-1'*"),
    (["--fidbench-report", "no/such/dir/r.json"], {},
     "*--fidbench-report no/such/dir/r.json: cannot write the report there*"),
    (["--fidbench-report", "a"], {}, "*--fidbench-report a: cannot write the report there (a is a directory)*"),
    ([], {"FIDBENCH_LOCK_TIMEOUT": "soon"}, "*FIDBENCH_LOCK_TIMEOUT must be a number of seconds >= 0, got 'soon'*"),
    ([], {"FIDBENCH_LOCK": "nfs"}, "*FIDBENCH_LOCK must be one of flock, file, got 'nfs'*"),
    ([], {"FIDBENCH_LOCK_STALE": "-1"}, "*FIDBENCH_LOCK_STALE must be a number of seconds >= 0, got '-1'*"),
])
def test_bad_options_are_usage_errors_before_any_case_runs(small, monkeypatch, args, env, message):
    (small.path / "fidbench.yaml").write_text(SMALL + "  origin: {}\n")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = small.runpytest("--fidbench-quiet", "--benchmark-disable", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert not (small.path / "cache").exists()  # no model was loaded, no reference made


def test_a_model_that_cannot_be_set_up_fails_its_first_case_clearly_and_the_others_at_once(small, monkeypatch):
    from fidbench import models

    shutil.copytree(small.path / "a", small.path / "gone")
    (small.path / "gone" / "model.safetensors").unlink()
    (small.path / "fidbench.yaml").write_text(
        SMALL.replace("models:\n", "models:\n  gone: {path: gone}\n  notok: {path: a, tokenizer: no-such-tokenizer}\n")
        + "  origin: {}\n  topk: {}\n")
    calls = []
    real = models.load
    monkeypatch.setattr(models, "load", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    result = small.runpytest("--fidbench-quiet", "--benchmark-disable", "--fidbench-report", "r.json", "-k", "not tiny")
    result.assert_outcomes(errors=4)
    out = result.stdout.str().split("short test summary info")[0]  # the summary repeats errors at the terminal's width
    suite = small.path / "fidbench.yaml"
    assert out.count(f"fidbench: {suite}: models.gone could not be set up: OSError: ") == 1
    assert out.count(f"fidbench: {suite}: models.notok could not be set up: OSError: ") == 1
    assert out.count("fidbench: model 'gone' could not be set up (see gone-origin): OSError: ") == 1
    assert out.count("fidbench: model 'notok' could not be set up (see notok-origin): OSError: ") == 1
    assert "Traceback" not in out and "harness.py" not in out
    assert [c.rsplit("/", 1)[-1] for c in calls] == ["gone", "a"]  # each model tried once
    cases = strict_json(small.path / "r.json")["cases"]
    assert [(c["id"], c["outcome"]) for c in cases] == [
        ("gone-origin", "error"), ("gone-topk", "error"), ("notok-origin", "error"), ("notok-topk", "error")]
    assert cases[2]["error"].endswith("models.notok could not be set up: OSError: tokenizer 'no-such-tokenizer' is "
                                      "neither a directory with a tokenizer nor a hub id in the local Hugging Face "
                                      "cache")
    assert cases[3]["error"].startswith("fidbench: model 'notok' could not be set up (see notok-origin): "
                                        "OSError: tokenizer")


@pytest.mark.slow
def test_a_crashed_xdist_worker_s_case_is_in_the_report(small):
    (small.path / "conftest.py").write_text(
        "import os\n\nimport pytest\n\n\n@pytest.fixture(autouse=True)\ndef crash(request):\n"
        "    if request.node.name.endswith('crash]'):\n        os._exit(1)\n")
    (small.path / "fidbench.yaml").write_text(SMALL + "  origin: {}\n  crash: {method: origin}\n"
                                                      "  after: {method: origin}\n"
                                                      "  a::crash: {method: origin}\n")  # :: as in a node id's path
    result = small.runpytest_subprocess("--fidbench-quiet", "-n", "2", "--fidbench-report", "r.json")
    result.assert_outcomes(passed=2, failed=2)
    cases = strict_json(small.path / "r.json")["cases"]
    assert [(c["id"], c["outcome"]) for c in cases] == [("tiny-a-origin", "passed"), ("tiny-a-crash", "error"),
                                                        ("tiny-a-after", "passed"), ("tiny-a-a::crash", "error")]
    assert "crashed while running" in cases[1]["error"] and "crashed while running" in cases[3]["error"]


THREE = "  origin: {}\n  hang: {method: origin}\n  after: {method: origin}\n"
HANG = """import os, signal, time
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def hang(request):
    if request.node.name.endswith('-hang]'):
        {stop}
        time.sleep(120)
"""
# As if `timeout` ran out: SIGALRM to the `timeout` process above this one, which sends SIGTERM to its whole
# process group (the session and its xdist workers).
EXPIRE = """pid = os.getppid()
        while Path(f"/proc/{pid}/comm").read_text().strip() != "timeout":
            pid = int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
        os.kill(pid, signal.SIGALRM)"""


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("timeout") or not Path("/proc/self/stat").exists(), reason="needs timeout, /proc")
@pytest.mark.parametrize("xdist", [[], ["-n", "2", "--dist", "loadgroup"]], ids=["alone", "xdist"])
def test_sigterm_from_timeout_writes_the_report_with_the_running_case_interrupted(small, xdist):
    (small.path / "conftest.py").write_text(HANG.replace("{stop}", EXPIRE))
    (small.path / "fidbench.yaml").write_text(SMALL + THREE)
    result = small.run("timeout", "300", sys.executable, "-m", "pytest", "--fidbench-quiet", "-p", "no:cacheprovider",
                       "--fidbench-report", "r.json", *xdist, timeout=280)
    assert result.ret == 124  # timeout's "it timed out", after the session wrote its report
    cases = strict_json(small.path / "r.json")["cases"]
    assert [(c["id"], c["outcome"]) for c in cases] == [("tiny-a-origin", "passed"), ("tiny-a-hang", "error"),
                                                        ("tiny-a-after", "skipped")]
    assert cases[1]["error"].startswith("interrupted (") and "SIGTERM" in cases[1]["error"]
    assert cases[2]["error"] == "not run: the session ended before this case"


# `timeout` sends SIGTERM to the command and then to its process group: here the first one's handler has run
# before the second arrives, which a loaded machine does (CI saw it). A second stop that comes later kills at once.
TWICE = """import fidbench.pytest_plugin.sigterm as sigterm
        sigterm.SAME_STOP_S = 0.5
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            time.sleep({gap})
            os.kill(os.getpid(), signal.SIGTERM)
            raise"""


@pytest.mark.parametrize(("gap", "killed"), [(0, False), (1, True)], ids=["same-stop", "later-stop"])
def test_a_sigterm_right_after_the_first_is_the_same_stop_and_a_later_one_kills(small, gap, killed):
    (small.path / "conftest.py").write_text(HANG.replace("{stop}", TWICE.format(gap=gap)))
    (small.path / "fidbench.yaml").write_text(SMALL + THREE)
    result = small.run(sys.executable, "-m", "pytest", "--fidbench-quiet", "-p", "no:cacheprovider",
                       "--fidbench-report", "r.json", timeout=280)
    cases = [(c["id"], c["outcome"]) for c in strict_json(small.path / "r.json")["cases"]]
    if killed:  # at once: the report is as the origin case left it
        assert result.ret == -signal.SIGTERM and cases == [("tiny-a-origin", "passed")]
    else:
        assert result.ret == pytest.ExitCode.INTERRUPTED
        assert cases == [("tiny-a-origin", "passed"), ("tiny-a-hang", "error"), ("tiny-a-after", "skipped")]


def test_sigterm_is_taken_over_only_by_sessions_that_write_a_report(pytester):
    pytester.makepyfile("import signal\n\n\ndef test_handler():\n"
                        "    print('SIGTERM default:', signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n")
    pytester.runpytest("-s", "-p", "no:cacheprovider").stdout.fnmatch_lines(["*SIGTERM default: True*"])
    result = pytester.runpytest("-s", "-p", "no:cacheprovider", "--fidbench-report", "r.json")
    result.stdout.fnmatch_lines(["*SIGTERM default: False*"])
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back when the session ends


def test_ctrl_c_records_the_running_case_as_interrupted(small):
    (small.path / "conftest.py").write_text(HANG.replace("{stop}", "raise KeyboardInterrupt"))
    (small.path / "fidbench.yaml").write_text(SMALL + THREE)
    result = small.runpytest("--fidbench-quiet", "--benchmark-disable", "--fidbench-report", "r.json",
                             no_reraise_ctrlc=True)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    cases = strict_json(small.path / "r.json")["cases"]
    assert [(c["id"], c["outcome"], c["error"]) for c in cases] == [
        ("tiny-a-origin", "passed", None), ("tiny-a-hang", "error", "interrupted (Ctrl-C) while this case ran"),
        ("tiny-a-after", "skipped", "not run: the session ended before this case")]


def test_a_session_that_collects_nothing_or_fails_to_collect_replaces_the_report(small, capsys):
    (small.path / "fidbench.yaml").write_text(SMALL + "  origin: {}\n")
    report = small.path / "r.json"
    small.runpytest("--fidbench-quiet", "--benchmark-disable", "--fidbench-report", "r.json").assert_outcomes(passed=1)
    assert [c["id"] for c in strict_json(report)["cases"]] == ["tiny-a-origin"]
    result = small.runpytest("--fidbench-quiet", "--benchmark-disable", "--fidbench-report", "r.json", "-k", "nomatch")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    doc = strict_json(report)
    assert doc["cases"] == [] and "errors" not in doc and doc["settings"]["suite"].endswith("fidbench.yaml")
    (small.path / "fidbench.yaml").write_text(SMALL + "  origin: {floors: {acc9: 0.5}}\n")
    result = small.runpytest("--fidbench-quiet", "--benchmark-disable", "--fidbench-report", "r.json")
    assert result.ret == pytest.ExitCode.INTERRUPTED  # pytest's exit status for collection errors
    doc = strict_json(report)
    assert doc["cases"] == [] and len(doc["errors"]) == 1 and "acc9" in doc["errors"][0]
    assert cli.main(["report", str(report)]) == 0  # a viewer: it shows what the file holds, and says why
    err = capsys.readouterr().err
    assert f"fidbench report: {report}: the run collected no case: test_fidelity.py: fidbench: " in err


def test_a_full_disk_for_the_report_is_a_clear_error_not_an_internal_error(small, monkeypatch):
    from fidbench import report

    (small.path / "fidbench.yaml").write_text(SMALL + "  origin: {}\n")
    writes = []

    class FullDisk(type(Path())):
        def write_text(self, *args, **kwargs):
            writes.append(self.name)
            if len(writes) > 1:  # the check before the run passes: the disk fills up during it
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write_text(*args, **kwargs)

    monkeypatch.setattr(report, "Path", FullDisk)
    result = small.runpytest("--fidbench-quiet", "--benchmark-disable", "--fidbench-report", "r.json")
    assert result.ret == pytest.ExitCode.TESTS_FAILED and len(writes) > 2
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "Traceback" not in out
    assert out.count("fidbench: cannot write the report r.json: No space left on device; the cases still run") == 2
    assert sorted(p.name for p in small.path.iterdir() if p.name.startswith("r.json")) == []  # no half-written file


def test_a_full_disk_for_the_cache_fails_the_model_s_cases_in_a_line_each(small, monkeypatch):
    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    (small.path / "fidbench.yaml").write_text(SMALL + "  origin: {}\n  topk: {}\n")
    result = small.runpytest("--fidbench-quiet", "--benchmark-disable", "--fidbench-report", "r.json")
    result.assert_outcomes(errors=2)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out and "Traceback" not in out and "reference.py" not in out
    # Once in the errors section; the short summary repeats it as wide as the terminal allows (whole on CI).
    errors = out.split("short test summary info")[0]
    assert errors.count("models.tiny-a could not be set up: OSError: cannot write a reference to the cache ") == 1
    assert "(No space left on device); free space there or set FIDBENCH_CACHE to another directory" in out
    assert [c["outcome"] for c in strict_json(small.path / "r.json")["cases"]] == ["error", "error"]
