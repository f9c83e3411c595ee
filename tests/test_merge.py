"""``fidbench merge``: shards' reports into one, in suite order; refusals of reports that are not of one run."""

import json

import pytest
import reports
from helpers import save_tiny
from reports import record, sample, write

from fidbench import cli


def case(variant: str, model: str = "m", **kwargs) -> dict:
    return record(model, variant, [sample("code", i, 0.5 + 0.1 * i, 0.3) for i in range(3)], **kwargs)


def merged(tmp_path, *names, args=()) -> dict:
    out = tmp_path / "all.json"
    assert cli.main(["merge", *(str(tmp_path / n) for n in names), "-o", str(out), *args]) == 0
    return json.loads(out.read_text())


def test_cases_are_unioned_in_suite_order(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    (tmp_path / "code.jsonl").write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n')
    suite.write_text("models: {m: {path: m}, n: {path: n}}\ndatasets: {code: code.jsonl}\n"
                     "methods: {origin: {}, topk-10: {method: topk}}\n")
    write(tmp_path / "b.json", [case("topk-10", "n"), case("origin", "m")], suite=str(suite), shard="2/2")
    write(tmp_path / "a.json", [case("topk-10", "m"), case("origin", "n")], suite=str(suite), shard="1/2")
    doc = merged(tmp_path, "b.json", "a.json")
    assert [c["id"] for c in doc["cases"]] == ["m-origin", "m-topk-10", "n-origin", "n-topk-10"]
    assert "shard" not in doc["settings"] and doc["settings"]["limit"] is None
    assert doc["settings"]["shards"] == {"of": 2, "merged": [1, 2], "missing": []}
    assert [(m["report"].rsplit("/", 1)[1], m["settings"]["shard"], m["cases"]) for m in doc["merged_from"]] == [
        ("b.json", "2/2", ["n-topk-10", "m-origin"]), ("a.json", "1/2", ["m-topk-10", "n-origin"])]
    assert f"wrote {tmp_path / 'all.json'}: 4 case(s) from 2 reports" in capsys.readouterr().out


def test_without_the_suite_file_the_reports_order_is_kept(tmp_path, capsys):
    write(tmp_path / "a.json", [case("z"), case("b")], suite=str(tmp_path / "gone.yaml"))
    write(tmp_path / "b.json", [case("a")], suite=str(tmp_path / "gone.yaml"))
    assert [c["id"] for c in merged(tmp_path, "a.json", "b.json")["cases"]] == ["m-z", "m-b", "m-a"]
    assert "not readable here: cases kept in the reports' order" in capsys.readouterr().err


def test_a_case_twice_is_kept_once_when_identical_else_an_error(tmp_path, capsys):
    write(tmp_path / "a.json", [case("x"), case("y")])
    write(tmp_path / "b.json", [case("y")])
    assert [c["id"] for c in merged(tmp_path, "a.json", "b.json")["cases"]] == ["m-x", "m-y"]
    assert "m-y is in" in capsys.readouterr().err
    other = case("y")
    other["scores"]["acc1"] = 0.1
    write(tmp_path / "c.json", [other])
    paths = [str(tmp_path / name) for name in ("a.json", "c.json", "all.json")]
    assert cli.main(["merge", paths[0], paths[1], "-o", paths[2]]) == 2
    err = capsys.readouterr().err
    assert f"case m-y is in {tmp_path / 'a.json'} and {tmp_path / 'c.json'} with different records" in err


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["cases"][0].update(fingerprint="fp-other"), "model m fingerprint: {a} fp-m, {b} fp-other"),
    (lambda d: d["settings"].update(max_new_tokens=32), "settings.max_new_tokens: {a} 16, {b} 32"),
    (lambda d: d["environment"].update(versions={**d["environment"]["versions"], "torch": "2.12.0"}),
     "version of torch: {a} 2.13.0, {b} 2.12.0"),
    (lambda d: d.update(environment={**d["environment"], "commit": "beef"}), "commit: {a} c0ffee, {b} beef"),
    (lambda d: d.update(format=3), "report format: {a} 2, {b} 3"),
])
def test_reports_of_another_run_are_refused_unless_forced(tmp_path, capsys, edit, message):
    a = write(tmp_path / "a.json", [case("x")])
    doc = reports.document([case("y")])
    edit(doc)
    b = tmp_path / "b.json"
    b.write_text(json.dumps(doc))
    out = tmp_path / "all.json"
    assert cli.main(["merge", str(a), str(b), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert message.format(a=a, b=b) in err and "--force" in err and not out.exists()
    assert [c["id"] for c in merged(tmp_path, "a.json", "b.json", args=["--force"])["cases"]] == ["m-x", "m-y"]
    assert "forced despite a difference: " + message.format(a=a, b=b) in capsys.readouterr().err


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    a = write(tmp_path / "a.json", [case("x")])
    (tmp_path / "bad.json").write_text('{"cases": 3}')
    assert cli.main(["merge", str(a), str(tmp_path / "bad.json"), "-o", str(tmp_path / "o.json")]) == 2
    assert "bad.json: cases: expected a list of cases, got 3" in capsys.readouterr().err
    assert cli.main(["merge", str(a), str(a), "-o", str(tmp_path / "o.json")]) == 2
    assert "is given twice" in capsys.readouterr().err
    assert cli.main(["merge", str(a), "-o", str(tmp_path / "o.json")]) == 2
    assert "at least two reports" in capsys.readouterr().err


def test_the_same_shard_twice_is_an_error_and_missing_shards_are_recorded(tmp_path, capsys):
    write(tmp_path / "a.json", [case("x")], shard="1/2")
    write(tmp_path / "b.json", [case("y")], shard="1/2")  # shard 2's file overwritten by shard 1's, say
    out = tmp_path / "all.json"
    for args in ([], ["--force"]):
        assert cli.main(["merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(out), *args]) == 2
        assert (f"{tmp_path / 'a.json'} and {tmp_path / 'b.json'} both hold shard 1/2: the same shard twice"
                in capsys.readouterr().err) and not out.exists()
    write(tmp_path / "c.json", [case("z")], shard="3/3")
    write(tmp_path / "d.json", [case("y")], shard="1/3")
    doc = merged(tmp_path, "c.json", "d.json")
    assert doc["settings"]["shards"] == {"of": 3, "merged": [1, 3], "missing": [2]}
    assert "shard(s) 2 of 3 missing: the merged report holds part of the run" in capsys.readouterr().err
    write(tmp_path / "e.json", [case("w")], shard="2/3")  # the merged report and the missing shard: the whole run
    assert merged(tmp_path, "all.json", "e.json")["settings"]["shards"] == {"of": 3, "merged": [1, 2, 3],
                                                                            "missing": []}
    assert cli.main(["merge", str(out), str(tmp_path / "d.json"), "-o", str(tmp_path / "x.json")]) == 2
    assert "both hold shard 1/3" in capsys.readouterr().err
    write(tmp_path / "f.json", [case("v")], shard="2/2")
    assert cli.main(["merge", str(tmp_path / "d.json"), str(tmp_path / "f.json"), "-o", str(tmp_path / "x.json")]) == 2
    assert f"shard counts: 1/3 in {tmp_path / 'd.json'}, 2/2 in {tmp_path / 'f.json'}" in capsys.readouterr().err


def test_the_merged_report_is_strict_json_written_where_asked(tmp_path, capsys):
    """An older shard's report holding NaN (json reads it) is merged with null; -o into a missing directory makes
    it, into one that cannot be made is a clear error."""
    doc = reports.document([case("x")])
    doc["cases"][0]["scores"]["kl_mean"] = float("nan")
    (tmp_path / "a.json").write_text(json.dumps(doc))
    write(tmp_path / "b.json", [case("y")])
    out = tmp_path / "new" / "all.json"
    assert cli.main(["merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(out)]) == 0
    doc = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert doc["cases"][0]["scores"]["kl_mean"] is None
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "all.json"
    assert cli.main(["merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(bad)]) == 2
    assert f"fidbench merge: error: cannot write {bad}: " in capsys.readouterr().err


SUITE = "methods:\n  origin: {}\n  topk: {keep: 0.3, min_keep: 2}\n  knorm: {ratio: 0.5}\n"


def test_real_shards_merge_to_the_whole_run(pytester, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FIDBENCH_CACHE", str(pytester.path / "cache"))
    project = reports.project(pytester, save_tiny(tmp_path_factory.mktemp("ckpt") / "tiny", "llama"), SUITE, prompts=2)
    whole = reports.run(project, "whole.json")
    reports.run(project, "a.json", "-k", "knorm or origin")
    reports.run(project, "b.json", "-k", "topk")
    doc = merged(project.path, "b.json", "a.json")
    assert [c["id"] for c in whole["cases"]] == ["tiny-origin", "tiny-topk", "tiny-knorm"]
    assert [c["id"] for c in doc["cases"]] == [c["id"] for c in whole["cases"]]
    for got, want in zip(doc["cases"], whole["cases"]):
        assert {k: v for k, v in got.items() if k != "timing"} == {k: v for k, v in want.items() if k != "timing"}
    assert doc["settings"] == whole["settings"] and doc["format"] == whole["format"]
