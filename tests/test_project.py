"""fidbench as another project uses it: the installed plugin and a suite file, nothing else (no test module, no
conftest). The cases' ids, markers, report, JUnit properties and progress lines."""

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from helpers import ROOT, checkpoints_fixture, fill_project, origin_topk_suite

from fidbench.cases import SCALARS
from fidbench.pytest_plugin import markers, progress

SUITE = origin_topk_suite({"tiny-llama": "llama", "tiny-gemma": "gemma"}, max_new_tokens=6, tags=("quick",))
CASES = ["tiny-llama-origin", "tiny-llama-topk-10", "tiny-gemma-origin", "tiny-gemma-topk-10"]


checkpoints = checkpoints_fixture(llama="llama", gemma="gemma3_text")  # model_type gemma3_text: marked gemma3 too


@pytest.fixture
def project(pytester, checkpoints, monkeypatch):
    """A project with a suite file, two tiny model directories and a dataset: what a user adds to their repo."""
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # this test may itself run in an xdist worker
    return fill_project(pytester, monkeypatch, checkpoints, "my-suite.yaml", SUITE, prompts=2)


def ran(result) -> list[str]:
    return [r.nodeid for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call"]


def test_a_suite_file_named_as_a_test_path_is_collected_as_its_cases(project):
    result = project.runpytest("my-suite.yaml", "--fidbench-quiet", "--benchmark-disable",
                               "--fidbench-report", "r.json")
    result.assert_outcomes(passed=4)
    assert ran(result) == [f"my-suite.yaml::test_fidelity[{c}]" for c in CASES]
    assert [c["id"] for c in json.loads((project.path / "r.json").read_text())["cases"]] == CASES
    result.stdout.fnmatch_lines(["*fidbench results*", "tiny-gemma-topk-10*all*ok"])
    # -k and -m by family, method and tag; gemma3_text models answer to gemma3 too
    for args, expected in [(["-k", "llama and topk"], ["tiny-llama-topk-10"]), (["-m", "gemma3"], CASES[2:]),
                           (["-m", "gemma3_text and origin"], ["tiny-gemma-origin"]), (["-m", "quick"], CASES[1::2])]:
        result = project.runpytest("my-suite.yaml", *args, "--fidbench-quiet", "--benchmark-disable",
                                   "--strict-markers")
        assert ran(result) == [f"my-suite.yaml::test_fidelity[{c}]" for c in expected], args


def collected(cwd, *args) -> list[str]:
    """The fidelity cases ``pytest --collect-only`` lists in ``cwd``, by case id."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
    out = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if "::test_fidelity[" in line]
    return [line.split("::test_fidelity[")[1].rstrip("]") for line in lines]


@pytest.mark.slow
def test_the_default_suite_in_a_project_of_its_own_collects_this_project_s_cases(pytester):
    """A copy of fidbench.yaml and its data, nothing else: the cases, ids and markers of tests/methods."""
    shutil.copy(ROOT / "fidbench.yaml", pytester.path / "my-suite.yaml")
    shutil.copytree(ROOT / "data", pytester.path / "data")
    for args in [(), ("-m", "llama and topk or wanda")]:
        ours = collected(ROOT, "tests/methods", *args)
        assert ours and collected(pytester.path, "my-suite.yaml", *args) == ours, args


def test_every_marker_of_the_suite_is_listed_by_pytest_markers(project):
    result = project.runpytest("my-suite.yaml", "--markers")
    for line in ["@pytest.mark.fidbench: a fidelity case*", "@pytest.mark.llama: fidbench model family",
                 "@pytest.mark.gemma3_text: fidbench model family", "@pytest.mark.gemma3: fidbench model family",
                 "@pytest.mark.origin: fidbench method", "@pytest.mark.topk: fidbench method",
                 "@pytest.mark.quick: fidbench variant tag"]:
        result.stdout.fnmatch_lines([line])
    assert result.stdout.str().count("@pytest.mark.gemma3:") == 1


def test_family_markers_drop_text_and_vl_suffixes():
    assert markers.families("llama") == ["llama"]
    assert markers.families("gemma3_text") == ["gemma3_text", "gemma3"]
    assert markers.families("qwen2_5_vl") == ["qwen2_5_vl", "qwen2_5"]


def test_only_the_suite_file_is_collected_and_each_case_once(project):
    (project.path / "other.yaml").write_text("key: value\n")  # a YAML that is not a suite: not ours
    (project.path / "test_unit.py").write_text("def test_unit():\n    pass\n")
    result = project.runpytest("--collect-only", "-q", "--fidbench-config", "my-suite.yaml")
    result.stdout.fnmatch_lines(["test_unit.py::test_unit",
                                 "fidbench: no fidelity case ran; to run the cases of my-suite.yaml, name it as a test "
                                 "path: pytest my-suite.yaml", "1 test collected*"])
    # This project's way (a module re-exporting the test) and the suite file together: every case once.
    shutil.copy(ROOT / "tests" / "methods" / "test_fidelity.py", project.path / "test_fidelity.py")
    result = project.runpytest("test_fidelity.py", "my-suite.yaml", "--collect-only", "-q", "--fidbench-config",
                               "my-suite.yaml")
    result.stdout.fnmatch_lines(["4/8 tests collected (4 deselected)*"])
    listed = [line for line in result.stdout.lines if "::" in line]
    assert listed == [f"test_fidelity.py::test_fidelity[{c}]" for c in CASES]


@pytest.mark.parametrize("args,message", [
    (["my-suite.yaml", "second.yaml"], "*fidbench runs one suite per session; the command line names 2: *"),
    (["my-suite.yaml", "--fidbench-config", "second.yaml"],
     "*--fidbench-config second.yaml and the suite file * differ*"),
])
def test_one_suite_per_session(project, args, message):
    shutil.copy(project.path / "my-suite.yaml", project.path / "second.yaml")
    result = project.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_junit_xml_has_one_property_per_metric(project):
    project.runpytest("my-suite.yaml", "-k", "llama", "--fidbench-quiet", "--benchmark-disable", "--junitxml", "j.xml",
                      "--fidbench-report", "r.json").assert_outcomes(passed=2)
    records = {c["id"]: c for c in json.loads((project.path / "r.json").read_text())["cases"]}
    cases = ET.parse(project.path / "j.xml").getroot().iter("testcase")
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        record = records[props.pop("fidbench_case")]
        assert float(props.pop("prefill_s")) == record["timing"]["prefill_s"]
        assert float(props.pop("decode_s")) == record["timing"]["decode_s"]
        if "topk" in record["id"]:
            assert float(props.pop("kv_fraction")) == record["kept"]["kv_fraction"]
        measured = {k: record["scores"][k] for k in SCALARS if record["scores"][k] is not None}
        assert {k: float(v) for k, v in props.items()} == measured  # free-running scores: none without free_run


def test_progress_shows_under_the_default_capture(project, monkeypatch):
    monkeypatch.setattr(progress, "TICK_S", 0.0)  # every phase is long enough to report
    result = project.runpytest("my-suite.yaml", "-k", "llama and origin", "--benchmark-disable")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["fidbench: tiny-llama: base references 1/2 (* s)",
                                 "fidbench: tiny-llama: base references 2/2 in * s",
                                 "fidbench: tiny-llama-origin: prompts 1/2 (* s)",
                                 "fidbench: tiny-llama-origin: prompts 2/2 in * s"])
    result = project.runpytest("my-suite.yaml", "-k", "llama and origin", "--benchmark-disable", "--fidbench-quiet")
    assert "fidbench: tiny-llama" not in result.stdout.str()


@pytest.mark.slow
def test_progress_of_xdist_workers_reaches_the_terminal(project):
    (project.path / "conftest.py").write_text("from fidbench.pytest_plugin import progress\n\nprogress.TICK_S = 0.0\n")
    result = project.runpytest_subprocess("my-suite.yaml", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    for model in ("llama", "gemma"):  # each phase's last line through the controller's terminal reporter ...
        result.stdout.fnmatch_lines([f"[[]gw?[]] fidbench: tiny-{model}: base references 2/2 in * s",
                                     f"[[]gw?[]] fidbench: tiny-{model}-topk-10: prompts 2/2 in * s"])
        # ... and the lines on the way from the worker itself, on the terminal's stderr
        result.stderr.fnmatch_lines([f"[[]gw?[]] fidbench: tiny-{model}: base references 1/2 (* s)"])
        # --dist loadgroup: one worker loaded the model and ran both its cases
        assert result.stdout.str().count(f"fidbench: tiny-{model}: base references 2/2") == 1
