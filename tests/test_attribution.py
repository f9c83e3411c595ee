"""fidbench.attribution: a stack's loss against each member alone and against the stack without it, matched by
what ran (members and parameters), with paired intervals; missing partners are listed, not guessed."""

import pytest

from fidbench import attribution, cli, plot
from fidbench.methods import build

A = {"method": "snapkv", "ratio": 0.25}
B = {"method": "kivi", "bits": 4}
C = {"method": "rtn", "bits": 8}


def _samples(acc1: list[float], kl: list[float]) -> list[dict]:
    return [{"dataset": "chat", "index": i, "n_tokens": 10 + i, "acc1": a, "kl_mean": k}
            for i, (a, k) in enumerate(zip(acc1, kl))]


def _record(name: str, members: list[dict], acc1: list[float], kl: list[float]) -> dict:
    specs = [dict(m) for m in members]
    method = build("stack", {"members": specs}) if len(specs) > 1 else build(specs[0]["method"], {
        k: v for k, v in specs[0].items() if k != "method"})
    kept = {"members": [{"method": m.name, "params": m.params(), "kept": {}} for m in method._members]} \
        if method.name == "stack" else {}
    return {"id": f"m-{name}", "model": "m", "method": method.name, "params": method.params(), "kept": kept,
            "samples": _samples(acc1, kl)}


def _weighted(values, tokens=(10, 11, 12)):
    return sum(v * t for v, t in zip(values, tokens)) / sum(tokens)


def test_stack_against_each_member_alone_and_leave_one_out():
    records = [
        _record("a", [A], [0.9, 0.8, 1.0], [0.1, 0.2, 0.0]),
        _record("b", [B], [1.0, 0.9, 0.9], [0.0, 0.1, 0.1]),
        _record("c", [C], [1.0, 1.0, 0.9], [0.0, 0.0, 0.1]),
        _record("ab", [A, B], [0.8, 0.7, 0.9], [0.2, 0.3, 0.1]),
        _record("bc", [C, B], [0.9, 0.9, 0.8], [0.1, 0.1, 0.2]),
        _record("abc", [C, A, B], [0.7, 0.6, 0.8], [0.3, 0.4, 0.2]),
    ]
    rows, missing = attribution.attribute(records)
    ab = {r["member"]: r for r in rows if r["stack"] == "m-ab"}
    assert set(ab) == {"snapkv", "kivi"}
    # In a two-member stack, the stack without one member is the other member alone.
    assert (ab["snapkv"]["alone"], ab["snapkv"]["without"]) == ("m-a", "m-b")
    change = ab["snapkv"]["without_acc1"]
    assert change["diff"] == pytest.approx(_weighted([0.8, 0.7, 0.9]) - _weighted([1.0, 0.9, 0.9]))
    assert change["ci"][0] <= change["diff"] <= change["ci"][1]
    abc = {r["member"]: r for r in rows if r["stack"] == "m-abc"}
    assert abc["rtn"]["without"] == "m-ab" and abc["snapkv"]["without"] == "m-bc"
    assert abc["kivi"]["without"] is None  # rtn + snapkv was not run: listed, not guessed
    assert missing == ["m-abc: no case runs kivi without"]
    assert abc["kivi"]["alone_kl_mean"]["diff"] == pytest.approx(_weighted([0.3, 0.4, 0.2]) - _weighted([0, .1, .1]))


def test_members_match_by_parameters_not_by_name():
    records = [_record("a", [{"method": "snapkv", "ratio": 0.1}], [1, 1, 1], [0, 0, 0]),
               _record("ab", [A, B], [0.8, 0.7, 0.9], [0.2, 0.3, 0.1])]
    rows, missing = attribution.attribute(records)
    assert all(r["alone"] is None for r in rows) and len(missing) == 4


def test_report_command_prints_the_attribution(tmp_path, capsys, monkeypatch):
    records = [_record("a", [A], [0.9, 0.8, 1.0], [0.1, 0.2, 0.0]), _record("b", [B], [1.0, 0.9, 0.9], [0, .1, .1]),
               _record("ab", [A, B], [0.8, 0.7, 0.9], [0.2, 0.3, 0.1])]
    monkeypatch.setattr(cli.report, "table", lambda records, **kw: "TABLE")  # the attribution is what is tested
    monkeypatch.setattr(cli, "_read", lambda command, path: {"cases": records})
    assert cli.main(["report", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("TABLE") and "stack attribution" in out and "m-ab" in out
    assert "0.903 → 0.803: -0.1" in out  # snapkv alone → the stack, token-weighted acc@1


def test_the_plot_draws_each_members_cost_with_its_interval():
    pytest.importorskip("matplotlib")
    records = [_record("a", [A], [0.9, 0.8, 1.0], [0.1, 0.2, 0.0]), _record("b", [B], [1.0, 0.9, 0.9], [0, .1, .1]),
               _record("ab", [A, B], [0.8, 0.7, 0.9], [0.2, 0.3, 0.1])]
    fig = plot.stacks(records)
    acc = fig.axes[0]
    widths = [p.get_width() for p in acc.patches]
    rows, _ = attribution.attribute(records)
    expected = [r[f"{side}_acc1"]["diff"] for side in ("without", "alone") for r in rows]
    assert widths == pytest.approx(expected)
    assert plot.stacks([records[0]]) is None
