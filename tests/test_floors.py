"""``fidbench floors``: floors from a measured run, valid for runs of the sizes asked, as pasteable YAML."""

import pytest
import yaml
from reports import record, sample, write

from fidbench import cli, metrics
from fidbench.suite import load


def proposed(tmp_path, capsys, cases, *args, **settings) -> tuple[dict, str]:
    path = write(tmp_path / "r.json", cases, **settings)
    assert cli.main(["floors", str(path), *args]) == 0
    text = capsys.readouterr().out
    return yaml.safe_load(text)["floors"], text


def scores_at(case: dict, limit: int | None) -> dict:
    """The case's token-weighted scores over the first ``limit`` prompts of each dataset (--fidbench-limit's)."""
    chosen = [s for s in case["samples"] if limit is None or s["index"] < limit]
    tokens = sum(s["n_tokens"] for s in chosen)
    return {m: sum(s[m] * s["n_tokens"] for s in chosen) / tokens for m in ("acc1", "acc5", "kl_mean")}


def test_the_bound_is_the_bootstrap_quantile_of_a_run_of_that_size(tmp_path, capsys):
    """100 prompts, acc@1 and KL i/100: a run of all 100 has mean 0.495 ± 0.029 (sd), so its 1 % / 99 % quantiles
    are 0.495 ∓ 2.33 × 0.029; a run of one prompt reaches down to 0.00 (and up to 0.99)."""
    case = record("m", "topk-10", [sample("code", i, i / 100, i / 100, acc5=1.0) for i in range(100)])
    floors, text = proposed(tmp_path, capsys, [case])
    acc1, kl = floors["m"]["topk-10"]["acc1"], floors["m"]["topk-10"]["kl_mean"]
    assert 0.41 <= acc1 <= 0.44 and acc1 == round(acc1, 2)
    assert 0.55 <= kl <= 0.58 and kl == round(kl, 2)
    assert "warning" not in text
    assert floors["m"]["topk-10"]["acc5"] == 1.0
    assert "measured acc1 0.4950 acc5 1.0000 kl_mean 0.4950 (100 prompts)" in text
    floors, text = proposed(tmp_path, capsys, [case], "--at-limit", "1", "all")
    assert floors["m"]["topk-10"]["acc1"] <= 0.01 and floors["m"]["topk-10"]["kl_mean"] >= 0.98
    assert "# for runs of 1, all prompt(s) per dataset (all: as many as the report holds)" in text
    assert "acc1/acc5 floor = their 1% quantile, kl_mean ceiling = their 99% quantile" in text


def test_never_stricter_than_the_first_prompts_that_a_limited_run_takes(tmp_path, capsys):
    """Four datasets whose first prompt is the only bad one: a random run of one prompt per dataset draws three or
    four of them with probability 0.4 %, but --fidbench-limit 1 takes exactly those."""
    samples = [sample(d, i, 0.0 if i == 0 else 1.0, 0.0, acc5=1.0) for d in ("a", "b", "c", "d") for i in range(10)]
    case = record("m", "x", samples)
    floors, _ = proposed(tmp_path, capsys, [case], "--at-limit", "1")
    assert floors["m"]["x"]["acc1"] == 0.0
    assert floors["m"]["x"]["kl_mean"] == 0.0001  # KL 0 measured: a ceiling above rounding noise
    floors, _ = proposed(tmp_path, capsys, [case], "--at-limit", "2")
    assert floors["m"]["x"]["acc1"] == 0.5  # the first two prompts of each: the limited run scores 0.5


def test_floors_hold_at_every_size_asked_and_paste_into_a_suite(tmp_path, capsys):
    cases = [record("m", v, [sample(d, i, round(base - 0.07 * ((i * 3 + len(d)) % 5), 4), 0.1 + 0.05 * (i % 3))
                             for d in ("code", "math", "chat") for i in range(6)])
             for v, base in (("topk-10", 0.9), ("snapkv-10", 0.6))]
    floors, text = proposed(tmp_path, capsys, cases, "--at-limit", "1", "2", "4", "all")
    for case in cases:
        bounds = floors["m"][case["variant"]]
        assert set(bounds) == {"acc1", "acc5", "kl_mean"}
        for limit in (1, 2, 4, None):
            assert metrics.check_floors(scores_at(case, limit), bounds) == [], (case["id"], limit)
    (tmp_path / "d.jsonl").write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "suite.yaml").write_text(
        "models: {m: {path: m}}\ndatasets: {d: d.jsonl}\nmethods:\n"
        "  topk-10: {method: topk, floors: {acc1: 0.99}}\n  snapkv-10: {method: snapkv}\n" + text)
    suite = load(tmp_path / "suite.yaml")
    assert [c.floors for c in suite.cases()] == [floors["m"]["topk-10"], floors["m"]["snapkv-10"]]


def test_warnings_for_sizes_the_report_cannot_show_and_cases_without_samples(tmp_path, capsys):
    good = record("m", "x", [sample("code", 0, 0.5, 0.2), sample("math", 0, 0.7, 0.1)])
    broken = {**record("m", "y", [sample("code", 0, 0.5, 0.2)]), "samples": []}
    partial = record("m", "z", [sample("code", 0, 0.5, 0.2), sample("math", 0, 0.7, 0.1)])
    for s in partial["samples"]:
        s["kl_mean"] = None
    floors, text = proposed(tmp_path, capsys, [good, broken, partial], "--at-limit", "4", limit=1)
    text = " ".join(text.replace("\n#   ", " ").split())
    assert "# warning: the report scored 1 prompt(s) per dataset: runs of 4 drawn from them cannot show" in text
    assert "# warning: one prompt only of code, math in the report: no spread to draw from there" in text
    assert "# warning: m-y: no scored sample, no floor proposed" in text
    assert set(floors["m"]) == {"x", "z"} and set(floors["m"]["z"]) == {"acc1", "acc5"}


def test_cases_whose_run_gave_non_finite_logits_or_no_scores_propose_no_floor(tmp_path, capsys):
    """A run on NaN logits scores acc@1 0.0 (the argmax of NaN): proposing acc1: 0.0 from it would wave any run
    through. A case that failed only its floors is learnt from, with a warning."""
    good = record("m", "x", [sample("code", i, 0.5, 0.2) for i in range(4)])
    nan = {**record("m", "y", [sample("code", i, 0.0, 0.0) for i in range(4)]), "outcome": "failed", "non_finite": 64,
           "failures": ["method 'topk' (variant 'y') gave non-finite logits (NaN or inf) at 64 position(s)"]}
    stub = {"id": "m-z", "model": "m", "method": "topk", "variant": "z", "outcome": "error", "error": "OOM"}
    floored = {**record("m", "w", [sample("code", i, 0.5, 0.2) for i in range(4)]), "outcome": "failed",
               "failures": ["acc1 = 0.5000 is below its floor 0.9"]}
    floors, text = proposed(tmp_path, capsys, [good, nan, stub, floored])
    assert set(floors["m"]) == {"x", "w"}
    text = " ".join(text.replace("\n#   ", " ").split())
    assert ("# warning: m-y: no floor proposed: its run gave non-finite logits (NaN or inf) at 64 teacher-forced "
            "position(s)") in text
    assert "# warning: m-z: no floor proposed: its run gave no scores (outcome error: OOM)" in text
    assert ("# warning: m-w: failed in this run (acc1 = 0.5000 is below its floor 0.9): its floors are proposed from "
            "what it measured") in text
    cli.main(["floors", str(tmp_path / "r.json")])
    assert "fidbench floors: warning: m-y: no floor proposed: its run gave non-finite" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [(["--at-limit", "0"], "'0': give a positive number"),
                                          (["--level", "1.5"], "'1.5': a confidence level between 0 and 1")])
def test_bad_options_are_usage_errors(tmp_path, capsys, args, message):
    path = write(tmp_path / "r.json", [record("m", "x", [sample("code", 0, 0.5, 0.2)])])
    with pytest.raises(SystemExit):
        cli.main(["floors", str(path), *args])
    assert message in capsys.readouterr().err
