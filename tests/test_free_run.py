"""Free-running mode: the method generates on its own and is compared with what the base wrote.

Origin and degenerate methods reproduce the base's text exactly; a method that changes the model lowers the
scores; the common prefix of the two continuations is teacher forcing's first divergence (stepwise teacher
forcing feeds the same tokens up to there, so both see the same logits where they part).
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import reports
import torch
from helpers import ROOT, calibration, reference, save_words, tiny_model, word_tokenizer, words_suite

from fidbench import cli, engine, metrics, report
from fidbench.datasets import DatasetError, Prompt
from fidbench.datasets import load as load_dataset
from fidbench.harness import Bench
from fidbench.methods import REGISTRY, build
from fidbench.reference import Reference
from fidbench.suite import DatasetSpec, SuiteError, load

# One method per family of change; h2o and sage-attention carry state across decode steps, random across begin().
METHODS = ("topk", "snapkv", "random", "h2o", "kivi", "rtn", "sage-attention")
N = 12


def prompts(n: int = 2) -> list[list[int]]:
    return [torch.randint(0, 283, (40,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(1, n + 1)]


def columns(text: str) -> list[dict]:
    """The rows of a plain ``report.table`` as header -> cell (columns start where the header's names do)."""
    header, *rows = [line for line in text.splitlines() if not line.startswith("±")]
    starts = [m.start() for m in re.finditer(r"(?<!\S)\S+(?: \S+)*", header)]
    bounds = list(zip(starts, [*starts[1:], None]))
    return [{header[a:b].strip(): row[a:b].strip() for a, b in bounds} for row in rows]


def free_run(model, method, ref, eos=frozenset(), monkeypatch=None):
    """``engine.free_run`` of an applied method; with ``monkeypatch``, also the logits it chose each token from."""
    rows = []
    if monkeypatch is not None:
        forward = engine.forward

        def keep(*args, **kwargs):
            logits, cache = forward(*args, **kwargs)
            rows.append(logits[-1])
            return logits, cache

        monkeypatch.setattr(engine, "forward", keep)
    gen = engine.free_run(model, method, ref.p_ids, len(ref.g_ids), set(eos))
    if monkeypatch is not None:
        monkeypatch.undo()
    return gen, rows


def test_origin_free_runs_the_base_s_greedy_continuation_and_stops_at_its_end_of_sequence():
    model = tiny_model("llama")
    ref = reference(model, prompts(1)[0], n=N)
    origin = build("origin", {})
    gen, _ = free_run(model, origin, ref)
    assert gen.ids == ref.g_ids and gen.non_finite == 0 and gen.prefill_s > 0 and gen.decode_s > 0
    stop = ref.g_ids[5]  # an end-of-sequence token the base wrote at position 5 (or earlier)
    assert free_run(model, origin, ref, {stop})[0].ids == ref.g_ids[: ref.g_ids.index(stop) + 1]
    scores = metrics.free_run(ref.g_ids, ref.g_ids, "a b", "a b")
    assert scores["rouge_l"] == scores["rouge_l_ids"] == 1.0 and scores["edit_distance"] == 0
    assert scores["common_prefix"] == N


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_common_prefix_is_teacher_forcing_s_first_divergence_on_every_sample(family, monkeypatch):
    """Also: the logits a method free-runs from are, bit for bit, stepwise teacher forcing's over its own text."""
    model = tiny_model(family)
    refs = [reference(model, p, n=N) for p in prompts()]
    divergences = []
    for name in METHODS:
        spec = REGISTRY[name].test_params
        for kind in ("degenerate", "real"):
            if spec.get(kind) is None:
                continue
            method = build(name, spec[kind])
            with method.apply(model, calibration()) as m:
                for i, ref in enumerate(refs if kind == "real" else refs[:1]):
                    forced = engine.teacher_force(m, method, ref.p_ids, ref.g_ids, "stepwise")
                    gen, rows = free_run(m, method, ref, monkeypatch=monkeypatch if i == 0 else None)
                    if rows:
                        own = engine.teacher_force(m, method, ref.p_ids, gen.ids, "stepwise").logits
                        assert torch.equal(torch.stack(rows), own), f"{name} {kind}"
                    first = metrics.score(forced.logits, ref).first_divergence()
                    assert metrics.free_run(ref.g_ids, gen.ids, "", "")["common_prefix"] == first, f"{name} {kind}"
                    if kind == "degenerate":  # equal to origin: the base's text exactly
                        assert gen.ids == ref.g_ids, name
                    else:
                        divergences.append(first)
    assert any(0 < d < N for d in divergences)  # the runs part in the middle, not only at the ends


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])  # gemma3_text: a sliding-window layer, keys from start
def test_free_running_records_what_teacher_forcing_over_its_own_text_records(family):
    model = tiny_model(family)
    ref = reference(model, prompts(1)[0], n=N)
    for name in ("topk", "snapkv", "h2o"):
        free, forced = (build(name, REGISTRY[name].test_params["real"]) for _ in range(2))
        with free.apply(model, calibration()) as m:
            gen = engine.free_run(m, free, ref.p_ids, N, set())
            engine.teacher_force(m, forced, ref.p_ids, gen.ids, "stepwise")
        assert free.kept() and free.kept() == forced.kept(), name


def test_free_run_scores():
    g = [1, 2, 3, 4, 5, 6]
    s = metrics.free_run(g, [1, 2, 9, 4, 5], "the cats sat on the mat", "The cat sat on mat!", ["MAT", "dog"])
    assert s["common_prefix"] == 2
    assert s["edit_distance"] == pytest.approx(2 / 6)  # one substitution, one deletion, over the longer length
    assert s["rouge_l_ids"] == pytest.approx(2 * 4 / 11)  # LCS 1 2 4 5
    assert s["rouge_l"] == pytest.approx(2 * 5 / 11)  # F1, stemmed: all 5 words of the method's in the base's 6
    assert s["answer_recall"] == s["answer_recall_base"] == 0.5  # "mat" in any case; no "dog"
    none = metrics.free_run(g, g, "你好", "你好")  # no word rouge-score's tokenizer keeps: not measured, not 0
    assert none["rouge_l"] is None and none["rouge_l_ids"] == 1.0 and none["answer_recall"] is None
    assert metrics.free_run(g, [7], "the cat", "")["rouge_l"] == 0.0


def test_summaries_average_free_run_scores_over_the_samples_that_measured_them():
    ref = Reference.from_logits([0], [1, 2, 3], torch.zeros(3, 64))
    ref_scores = [metrics.score(torch.zeros(3, 64), ref) for _ in range(3)]
    ref_scores[0].free = {**dict.fromkeys(metrics.FREE_RUN), "rouge_l": 1.0, "answer_recall": 0.5, "common_prefix": 3}
    ref_scores[1].free = {**dict.fromkeys(metrics.FREE_RUN), "rouge_l": 0.5, "common_prefix": 0}
    out = metrics.aggregate(ref_scores[:2])
    assert out["rouge_l"] == 0.75 and out["answer_recall"] == 0.5 and out["common_prefix"] == 1.5
    assert out["edit_distance"] is None
    assert all(metrics.aggregate(ref_scores[2:])[m] is None for m in metrics.FREE_RUN)  # teacher-forced only


@pytest.fixture
def words(tmp_path, monkeypatch):
    """A words suite on a tiny llama (word tokenizer: the decoded text is words) with the given variants."""
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))
    model_dir = save_words(tmp_path / "llama", "llama")

    def make(methods, **bench):
        suite = load(words_suite(tmp_path, model_dir, methods))
        return Bench(suite, progress=False, **bench), {c.variant.name: c for c in suite.cases()}

    return make


def test_origin_and_degenerate_methods_reproduce_the_base_text_and_a_real_method_lowers_the_scores(words):
    bench, cases = words({
        "origin": {"free_run": True},
        "topk-all": {"method": "topk", "keep": 1.0, "free_run": True},
        "topk-few": {"method": "topk", "keep": 0.1, "min_keep": 2, "free_run": True},
        "teacher": {"method": "topk", "keep": 0.1, "min_keep": 2},
    }, decode="stepwise")
    for name in ("origin", "topk-all"):
        record = bench.run(cases[name])
        assert record["free_run"] and record["timing"]["free_run_s"] > 0
        assert record["scores"]["rouge_l"] == record["scores"]["rouge_l_ids"] == 1.0
        assert record["scores"]["edit_distance"] == 0.0
        for s in record["samples"]:
            assert s["free_text"] == s["base_text"] and s["base_text"].strip()
            assert s["common_prefix"] == s["free_tokens"] == s["n_tokens"] == s["first_divergence"]
    few = bench.run(cases["topk-few"])
    assert few["scores"]["rouge_l"] < 1 and few["scores"]["rouge_l_ids"] < 1 and few["scores"]["edit_distance"] > 0
    assert [s["common_prefix"] for s in few["samples"]] == [s["first_divergence"] for s in few["samples"]]
    assert any(s["free_text"] != s["base_text"] for s in few["samples"])
    teacher = bench.run(cases["teacher"])  # the same method teacher-forced only: no free-running scores
    assert not teacher["free_run"] and "free_run_s" not in teacher["timing"]
    assert all(teacher["scores"][m] is None for m in metrics.FREE_RUN) and "free_text" not in teacher["samples"][0]
    assert teacher["scores"]["acc1"] == few["scores"]["acc1"]
    few_row, teacher_row = columns(report.table([few, teacher], datasets=False))
    assert float(few_row["ROUGE-L"].split()[0]) == pytest.approx(few["scores"]["rouge_l"], abs=5e-4)
    assert [teacher_row[c] for c in ("ROUGE-L", "edit", "answers", "free s")] == ["-", "-", "-", "-"]
    assert "ROUGE-L" not in report.table([teacher]).splitlines()[0]


def test_the_run_option_free_runs_every_case_and_own_loop_methods_refuse(words):
    module = str(Path(__file__).with_name("legacy_modifier.py"))
    bench, cases = words({"origin": {}, "legacy": {"module": module, "cls": "Origin"}}, free_run=True)
    assert bench.run(cases["origin"])["scores"]["rouge_l"] == 1.0
    with pytest.raises(ValueError, match="own loop .kind 'own_loop'., so it cannot free-run"):
        bench.run(cases["legacy"])
    with pytest.raises(SuiteError, match=r"methods\.legacy\.free_run: method 'legacy' scores samples in its own loop"):
        words({"legacy": {"module": module, "cls": "Origin", "free_run": True}})


def test_answers_are_checked_in_both_texts(words):
    bench, cases = words({"origin": {"free_run": True}})
    loaded = bench.load(cases["origin"].model)
    answer = loaded.tokenizer.decode(loaded.references[0].g_ids[:2], skip_special_tokens=True)
    assert answer
    loaded.prompts[0].answers = [answer.upper(), "nowhere"]
    record = bench.run(cases["origin"])
    first, *rest = record["samples"]
    assert first["answer_recall"] == first["answer_recall_base"] == 0.5 and first["answers"][1] == "nowhere"
    assert all(s["answer_recall"] is None for s in rest) and record["scores"]["answer_recall"] == 0.5
    assert "0.50/0.50" in report.table([record], datasets=False)


@pytest.mark.parametrize("spec, message", [
    ({"free_run": "yes"}, "methods.origin.free_run: must be true or false, got 'yes'"),
    ({"floors": {"rouge_l": 0.5}},
     "tiny-origin: floors on rouge_l, free-running scores, need 'free_run: true' in methods.origin"),
    ({"free_run": True, "floors": {"rouge_l": 1.5}}, "floor 1.5 is outside the metric's range [0, 1]"),
    ({"free_run": True, "floors": {"edit_distance": -0.1}}, "this maximum would never hold"),
    ({"free_run": True, "floors": {"answer_recall_base": 0.5}}, "unknown key 'answer_recall_base'"),
])
def test_suite_free_run_key_and_floors(words, spec, message):
    with pytest.raises(SuiteError, match=re.escape(message)):
        words({"origin": spec})


def test_free_run_floors_gate_the_case(words):
    floors = {"rouge_l": 0.95, "edit_distance": 0.0, "common_prefix": 1}
    bench, cases = words({"origin": {"free_run": True, "floors": floors},
                          "topk-few": {"method": "topk", "keep": 0.1, "min_keep": 2, "free_run": True,
                                       "floors": {"rouge_l": 0.999}}})
    assert bench.run(cases["origin"])["failures"] == []
    failures = bench.run(cases["topk-few"])["failures"]
    assert len(failures) == 1 and re.fullmatch(r"rouge_l = 0\.\d{4} is below its floor 0\.999", failures[0])


def test_reports_with_free_run_scores_read_back(words, tmp_path):
    bench, cases = words({"origin": {"free_run": True}})
    record = bench.run(cases["origin"])
    path = tmp_path / "r.json"
    report.Report(str(path), {}, [record["id"]]).add(record)
    doc = report.read(path)
    assert doc["format"] == report.FORMAT == 4 and doc["cases"][0]["scores"]["rouge_l"] == 1.0
    bad = json.loads(path.read_text())
    bad["cases"][0]["timing"]["free_run_s"] = "slow"
    path.write_text(json.dumps(bad))
    with pytest.raises(report.ReportError, match=r"cases\[0\]\.timing\.free_run_s: expected a number or null"):
        report.read(path)


def test_dataset_answers_are_read_and_checked(tmp_path):
    tok = word_tokenizer()
    good = {"conversations": [{"role": "user", "content": "the cat"}], "answers": ["cat", "mat"]}
    empty = {**good, "answers": []}
    rows = (good, empty, {"conversations": good["conversations"]})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_dataset(DatasetSpec("d", tmp_path / "d.jsonl", "conversations"), tok)
    assert [p.answers for p in got] == [["cat", "mat"], None, None]
    assert Prompt("x", 0, [1]).answers is None
    (tmp_path / "bad.jsonl").write_text(json.dumps({**good, "answers": "cat"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: 'answers' must be a list of non-empty strings"):
        load_dataset(DatasetSpec("bad", tmp_path / "bad.jsonl", "conversations"), tok)


def test_the_plugin_option_free_runs_every_case_into_report_and_tables(pytester, monkeypatch, capsys):
    monkeypatch.setenv("FIDBENCH_CACHE", str(pytester.path / "cache"))
    shutil.copy(ROOT / "tests" / "methods" / "test_fidelity.py", pytester.path / "test_fidelity.py")
    suite = words_suite(pytester.path, save_words(pytester.path / "a", "llama"), {"origin": {}})
    result = pytester.runpytest("--fidbench-config", str(suite), "--fidbench-free-run", "--fidbench-quiet",
                                "--benchmark-disable", "--fidbench-report", "r.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    doc = report.read(pytester.path / "r.json")
    case = doc["cases"][0]
    assert doc["settings"]["free_run"] is True and case["free_run"] is True and case["scores"]["rouge_l"] == 1.0
    assert "ROUGE-L" in result.stdout.str().split("fidbench results")[1]
    capsys.readouterr()  # the inner session's output
    assert cli.main(["report", str(pytester.path / "r.json"), "--overall"]) == 0
    out = capsys.readouterr().out
    header = list(columns(out)[0])
    assert header[header.index("ROUGE-L"):][:4] == ["ROUGE-L", "edit", "answers", "kept"]
    assert [columns(out)[0][c] for c in ("ROUGE-L", "edit", "answers")] == ["1.000 ±0", "0.000 ±0", "-"]


def free_cases(rouge_drop: float = 0.0) -> list[dict]:
    """A free-running case over 8 prompts (ROUGE-L lowered by ``rouge_drop``; prompt 0 has no ROUGE-L word,
    prompts 0-1 have answers; the lengths differ, so token weighting would give other means) and a
    teacher-forced case."""
    samples = []
    for i in range(8):
        s = reports.sample("code", i, 0.8, 0.2, n_tokens=4 + 8 * i)
        rouge = None if i == 0 else round(0.9 - 0.1 * (i % 3) - rouge_drop, 4)
        s.update(rouge_l=rouge, rouge_l_ids=0.8, edit_distance=0.1 + rouge_drop, common_prefix=3,
                 answer_recall=1.0 if i < 2 else None, answer_recall_base=1.0 if i < 2 else None)
        samples.append(s)
    free = {**reports.record("m", "topk-10", samples), "free_run": True}
    teacher = reports.record("m", "snapkv-10", [reports.sample("code", i, 0.5, 0.3) for i in range(8)])
    return [free, teacher]


def test_compare_and_intervals_carry_free_run_scores(tmp_path, capsys):
    base_cases = free_cases()
    values = [s["rouge_l"] for s in base_cases[0]["samples"] if s["rouge_l"] is not None]
    lo, hi = base_cases[0]["ci"]["rouge_l"]  # per-sample mean: the samples that measured it, each weighing 1
    assert lo < sum(values) / len(values) < hi and "rouge_l" not in base_cases[1]["ci"]
    base = reports.write(tmp_path / "base.json", base_cases)
    worse = reports.write(tmp_path / "worse.json", free_cases(rouge_drop=0.2))
    gate = ["--max-drop", "rouge_l=0.05", "--max-rise", "edit_distance=0.05", "--max-drop", "answer_recall=0"]
    assert cli.main(["compare", str(base), str(worse), *gate, "--json", str(tmp_path / "c.json")]) == 1
    out = capsys.readouterr().out
    cells = {tuple(line.split()[:2]): line.split() for line in out.splitlines()[3:] if len(line.split()) > 4}
    assert cells["m-topk-10", "rouge_l"][2:8] == ["8", f"{sum(values) / len(values):.4f}",
                                                  f"{sum(values) / len(values) - 0.2:.4f}", "-0.2000", "[-0.2000,",
                                                  "-0.2000]"]
    assert cells["m-topk-10", "rouge_l"][-1] == cells["m-topk-10", "edit_distance"][-1] == "FAIL"
    assert cells["m-topk-10", "answer_recall"][-1] == "ok" and cells["m-topk-10", "common_prefix"][5] == "+0.0000"
    assert not any(m in metrics.FREE_RUN for case, m in cells if case == "m-snapkv-10")  # teacher-forced only
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["failed"] == ["m-topk-10 rouge_l", "m-topk-10 edit_distance"]
    teacher = reports.write(tmp_path / "teacher.json", [free_cases()[1]])  # gated, measured nowhere: refused
    assert cli.main(["compare", str(teacher), str(teacher), "--max-drop", "rouge_l=0.05"]) == 2
    assert "rouge_l cannot be gated: no case of either report has it" in capsys.readouterr().err
    free = free_cases()[0]
    teacher_samples = [{k: v for k, v in s.items() if k not in metrics.FREE_RUN} for s in free["samples"]]
    half = reports.write(tmp_path / "half.json", [free | {"samples": teacher_samples}, free_cases()[1]])
    assert cli.main(["compare", str(base), str(half), "--max-drop", "rouge_l=0.05"]) == 1  # measured on one side
    assert capsys.readouterr().out.splitlines()[-1].endswith("FAILED: m-topk-10 rouge_l")
