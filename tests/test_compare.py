"""``fidbench compare``: paired changes with intervals, the gate's rules and exit status, refusals."""

import json

import pytest
import reports
from helpers import save_tiny
from reports import record, sample, write

from fidbench import cli


def cases(drop: float = 0.0, kl_rise: float = 0.0, only=("topk-10",)) -> list[dict]:
    """Two cases over 12 prompts of two datasets; the cases in ``only`` lose ``drop`` acc@1 and gain ``kl_rise``
    KL on every prompt."""
    out = []
    for variant, level in (("topk-10", 0.8), ("snapkv-10", 0.5)):
        d, k = (drop, kl_rise) if variant in only else (0.0, 0.0)
        samples = [sample(ds, i, round(level - 0.05 * (i % 4), 4) - d, 0.2 + 0.02 * i + k, acc5=1.0)
                   for ds in ("code", "math") for i in range(6)]
        out.append(record("m", variant, samples))
    return out


GATE = ["--max-drop", "acc1=0.02", "--max-rise", "kl_mean=10%"]


def rows(out: str) -> dict:
    """(case, metric) -> the table row's cells."""
    found = {}
    for line in out.splitlines()[3:]:
        cells = line.split()
        if len(cells) > 2 and cells[1] in ("acc1", "acc5", "kl_mean"):
            found[cells[0], cells[1]] = cells
    return found


def test_a_rerun_passes_and_a_planted_regression_fails(tmp_path, capsys):
    base = write(tmp_path / "base.json", cases())
    rerun = write(tmp_path / "rerun.json", cases())
    worse = write(tmp_path / "worse.json", cases(drop=0.05, kl_rise=0.1))
    assert cli.main(["compare", str(base), str(rerun), *GATE]) == 0
    out = capsys.readouterr().out
    assert rows(out)["m-topk-10", "acc1"][2:] == ["12", "0.7417", "0.7417", "+0.0000", "[+0.0000,", "+0.0000]",
                                                  "-0.0200", "ok"]
    assert out.splitlines()[-1].endswith(": passed")
    assert cli.main(["compare", str(base), str(worse), *GATE, "--json", str(tmp_path / "c.json")]) == 1
    out = capsys.readouterr().out
    table = rows(out)
    assert table["m-topk-10", "acc1"][5:] == ["-0.0500", "[-0.0500,", "-0.0500]", "-0.0200", "FAIL"]
    assert table["m-topk-10", "kl_mean"][-1] == "FAIL"
    assert table["m-topk-10", "acc5"][-1] == "+0.0000]"  # acc5: not gated
    assert table["m-snapkv-10", "acc1"][-1] == table["m-snapkv-10", "kl_mean"][-1] == "ok"
    assert out.splitlines()[-1].endswith("FAILED: m-topk-10 acc1, m-topk-10 kl_mean")
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["passed"] is False and result["gate"] == {"acc1": "acc1=0.02", "kl_mean": "kl_mean=10%"}
    kl = result["cases"][0]["metrics"]["kl_mean"]
    assert kl["allowed"] == pytest.approx(0.1 * kl["base"]) and kl["diff"] == pytest.approx(0.1)
    assert cli.main(["compare", str(base), str(worse)]) == 0  # no gate: the table only
    assert "gate" not in capsys.readouterr().out


def test_interval_rule_fails_only_on_a_significant_change_point_rule_on_any():
    base = cases()
    # the mean drops 0.03 but the prompts disagree (some up, some down): not significant
    noisy = json.loads(json.dumps(base))
    for i, s in enumerate(noisy[0]["samples"]):
        s["acc1"] += 0.17 if i % 2 else -0.23
    from fidbench import compare

    allow = [compare.allowance("acc1=0.02", "drop")]
    result = compare.compare(reports.document(base), reports.document(noisy), allow=allow)
    change = result["cases"][0]["metrics"]["acc1"]
    assert change["diff"] == pytest.approx(-0.03) and change["ci"][0] < -0.02 < change["ci"][1]
    assert change["verdict"] == "warn" and result["passed"]
    assert not compare.compare(reports.document(base), reports.document(noisy), allow=allow, rule="point")["passed"]
    lone = reports.document([record("m", "topk-10", base[0]["samples"][:1])])
    lone_worse = reports.document([record("m", "topk-10", noisy[0]["samples"][:1])])  # one sample: no interval
    assert compare.compare(lone, lone_worse, allow=allow)["cases"][0]["metrics"]["acc1"]["verdict"] == "FAIL"


def test_relative_allowance_and_a_metric_the_new_report_lacks(tmp_path, capsys):
    base = write(tmp_path / "base.json", cases())
    small = write(tmp_path / "small.json", cases(kl_rise=0.02))  # topk-10's KL is 0.31: +6.5 %
    assert cli.main(["compare", str(base), str(small), "--max-rise", "kl_mean=10%"]) == 0
    assert cli.main(["compare", str(base), str(small), "--max-rise", "kl_mean=5%"]) == 1
    capsys.readouterr()
    partial = cases()
    for s in partial[0]["samples"]:
        s["kl_mean"] = None  # a method that does not measure KL
    partial = write(tmp_path / "partial.json", partial)
    assert cli.main(["compare", str(base), str(partial), "--max-rise", "kl_mean=10%"]) == 1
    assert rows(capsys.readouterr().out)["m-topk-10", "kl_mean"][2:] == ["12", "-", "-", "-", "-", "-", "FAIL"]


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(fingerprint="other"), "model m fingerprint: {base} fp-m, {new} other"),
    (lambda c: c["samples"][3].update(prompt_tokens=99), "case m-topk-10: 1 sample(s) have another prompt"),
])
def test_other_weights_or_prompts_are_refused_unless_allowed(tmp_path, capsys, edit, message):
    base = write(tmp_path / "base.json", cases())
    other = cases()
    for case in other:
        edit(case)
    new = write(tmp_path / "new.json", other)
    assert cli.main(["compare", str(base), str(new)]) == 2
    err = capsys.readouterr().err
    assert message.format(base=base, new=new) in err and "--allow-mismatch" in err
    assert cli.main(["compare", str(base), str(new), "--allow-mismatch"]) == 0
    assert "warning: " + message.format(base=base, new=new) in capsys.readouterr().out


def test_other_settings_are_refused_other_versions_noted(tmp_path, capsys):
    base = write(tmp_path / "base.json", cases())
    limited = write(tmp_path / "limited.json", cases(), limit=2)
    assert cli.main(["compare", str(base), str(limited)]) == 2
    assert f"settings.limit: {base} none, {limited} 2" in capsys.readouterr().err
    moved = write(tmp_path / "moved.json", cases(), suite="/elsewhere/fidbench.yaml")  # another checkout
    assert cli.main(["compare", str(base), str(moved)]) == 0
    doc = reports.document(cases())
    doc["environment"]["versions"] = {**doc["environment"]["versions"], "transformers": "5.25.0"}
    upgraded = tmp_path / "upgraded.json"
    upgraded.write_text(json.dumps(doc))
    assert cli.main(["compare", str(base), str(upgraded), *GATE]) == 0
    assert f"version of transformers: {base} 5.24.0, {upgraded} 5.25.0" in capsys.readouterr().out


def test_cases_in_one_report_only_are_listed_and_a_gated_case_missing_from_the_new_fails(tmp_path, capsys):
    base = write(tmp_path / "base.json", cases())
    new = write(tmp_path / "new.json", cases()[:1] + [record("m", "knorm-10", cases()[1]["samples"])])
    assert cli.main(["compare", str(base), str(new)]) == 0  # no gate: a table of what both have
    out = capsys.readouterr().out
    assert f"only in {base} (not compared): m-snapkv-10" in out and f"only in {new} (not compared): m-knorm-10" in out
    assert cli.main(["compare", str(base), str(new), *GATE]) == 1  # the gate cannot be checked on m-snapkv-10
    out = capsys.readouterr().out
    assert out.splitlines()[-1].endswith(f"FAILED: m-snapkv-10 (missing from {new})")
    assert cli.main(["compare", str(base), str(write(tmp_path / "more.json", [*cases(), *new_cases(new)])),
                     *GATE]) == 0  # a case only in the new report is not gated
    other = write(tmp_path / "x.json", [record("x", "a", cases()[0]["samples"])])
    assert cli.main(["compare", str(base), str(other)]) == 2
    assert "no case is in both" in capsys.readouterr().err


def new_cases(path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cases"] if c["id"] == "m-knorm-10"]


@pytest.mark.parametrize("broken,why", [
    ({"non_finite": 3, "outcome": "failed"}, "its run gave non-finite logits (NaN or inf) at 3 teacher-forced"),
    ({"outcome": "error", "error": "CUDA out of memory", "scores": None},
     "its run gave no scores (outcome error: CUDA out of memory)"),
])
def test_a_case_whose_new_run_was_not_faithful_never_passes_a_gate(tmp_path, capsys, broken, why):
    """A run that gave NaN logits (scored as argmax of NaN) or no scores cannot be compared: the gate fails it,
    even when only acc1 is gated and its acc1 did not move."""
    base = write(tmp_path / "base.json", cases())
    new_doc = cases()
    new_doc[0].update(broken)
    if new_doc[0]["scores"] is None:  # a stub record: the case errored before any score
        new_doc[0] = {k: new_doc[0][k] for k in ("id", "model", "method", "variant", "outcome", "error")}
    new = write(tmp_path / "new.json", new_doc)
    assert cli.main(["compare", str(base), str(new), "--max-drop", "acc1=0.02"]) == 1
    out = capsys.readouterr().out
    assert f"cannot be compared: case m-topk-10: {new}: {why}" in out
    assert f"FAILED: m-topk-10 (cannot be compared: {new}: {why}" in out.splitlines()[-1]
    assert "m-snapkv-10" not in out.splitlines()[-1]
    assert cli.main(["compare", str(new), str(base), "--max-drop", "acc1=0.02"]) == 1  # the base's run, alike


def test_a_new_case_that_failed_its_floors_is_compared_with_a_note(tmp_path, capsys):
    base = write(tmp_path / "base.json", cases())
    new_doc = cases()
    new_doc[0].update(outcome="failed", failures=["acc1 = 0.7417 is below its floor 0.9"])
    new = write(tmp_path / "new.json", new_doc)
    assert cli.main(["compare", str(base), str(new), *GATE]) == 0
    assert f"case m-topk-10: its run in {new} failed: acc1 = 0.7417 is below its floor 0.9" in capsys.readouterr().out


def test_compare_json_is_strict_and_its_directory_is_made(tmp_path, capsys):
    """An older report holding NaN (json reads it) gives a NaN change: --json writes null, never a NaN literal."""
    doc = reports.document(cases())
    doc["cases"][1]["samples"][0]["kl_mean"] = float("nan")
    base = tmp_path / "base.json"
    base.write_text(json.dumps(doc))
    out = tmp_path / "new" / "dir" / "c.json"
    assert cli.main(["compare", str(base), str(write(tmp_path / "new.json", cases())), "--json", str(out)]) == 0
    result = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert result["cases"][1]["metrics"]["kl_mean"]["diff"] is None
    (tmp_path / "file").write_text("")
    assert cli.main(["compare", str(base), str(base), "--json", str(tmp_path / "file" / "c.json")]) == 2
    assert f"fidbench compare: error: cannot write {tmp_path / 'file' / 'c.json'}: " in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--max-drop", "kl_mean=0.1"], "kl_mean gets worse by rising: use --max-rise kl_mean=0.1"),
    (["--max-rise", "acc1=1%"], "acc1 gets worse by dropping: use --max-drop acc1=1%"),
    (["--max-drop", "nll=0.1"], "'nll' cannot be gated (choose from acc1, acc5, kl_mean, rouge_l, rouge_l_ids, "
                                "edit_distance, common_prefix, answer_recall)"),
    (["--max-drop", "acc1=lots"], "'lots' is not a number or a percentage"),
    (["--max-drop", "acc1"], "expected METRIC=AMOUNT"),
])
def test_bad_allowances_are_usage_errors(tmp_path, capsys, args, message):
    base = write(tmp_path / "base.json", cases())
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", str(base), str(base), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


SUITE = "methods:\n  origin: {}\n  topk: {keep: 0.3, min_keep: 2}\n"


def test_real_runs_a_rerun_passes_a_planted_regression_fails(pytester, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv("FIDBENCH_CACHE", str(pytester.path / "cache"))
    project = reports.project(pytester, save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", "llama"), SUITE)
    base = reports.run(project, "base.json")
    reports.run(project, "rerun.json")
    (project.path / "fidbench.yaml").write_text((project.path / "fidbench.yaml").read_text().replace(
        "keep: 0.3, min_keep: 2", "keep: 0.05, min_keep: 1"))  # the regression: a smaller top-k
    reports.run(project, "worse.json")
    assert [c["scores"]["n_samples"] for c in base["cases"]] == [8, 8]
    path = str(project.path)
    assert cli.main(["compare", f"{path}/base.json", f"{path}/rerun.json", "--max-drop", "acc1=0.05"]) == 0
    capsys.readouterr()
    assert cli.main(["compare", f"{path}/base.json", f"{path}/worse.json", "--max-drop", "acc1=0.05"]) == 1
    table = rows(capsys.readouterr().out)
    assert table["tiny-origin", "acc1"][-1] == "ok" and table["tiny-topk", "acc1"][-1] == "FAIL"
