"""Answer scores under teacher forcing: whether the base's reference holds each of a task's answers, and whether
the method's argmax writes the answer's tokens where the reference has them (``metrics.answer_scores``)."""

import re

import pytest
import torch
from helpers import save_words, tiny_tokenizer, word_tokenizer, words_suite
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fidbench import engine, metrics, report
from fidbench.harness import Bench
from fidbench.suite import SuiteError, load


def test_spans_follow_the_tokenizer_s_own_offsets_mid_token_with_a_space_and_inside_characters():
    """Byte-level BPE merges spaces into words and splits a character into bytes; the span is every token whose
    characters (the tokenizer's own offsets when encoding) meet the answer's."""
    tok = tiny_tokenizer()
    cases = {"the cat sat on the mat": ["at on th", " SAT", "cat", "t", "dog"],
             "un café au lait": ["é au", "café"], "le 猫 dort": ["猫", "猫 d"]}
    seen = set()
    for text, answers in cases.items():
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        for answer, span in zip(answers, metrics.answer_spans(tok, enc.input_ids, answers)):
            found = re.search(re.escape(answer), text, re.IGNORECASE)
            if found is None:
                assert span is None
                continue
            meets = [t for t, (a, b) in enumerate(enc.offset_mapping) if a < found.end() and b > found.start()]
            assert list(span) == meets, (text, answer)
            a, b = enc.offset_mapping[span.start]
            seen |= {"mid-token"} if a < found.start() else set()
            seen |= {"space"} if tok.decode(enc.input_ids[span.start]).startswith(" ") else set()
            seen |= {"bytes"} if "\ufffd" in tok.decode(enc.input_ids[span.start]) else set()
    assert seen == {"mid-token", "space", "bytes"}  # each hard case occurred


def test_spans_with_a_sentencepiece_style_tokenizer():
    """Metaspace tokens carry their leading space ("▁cat"), and decoding drops the text's first one."""
    words = ["<unk>", "▁the", "▁cat", "▁sat", "▁on", "▁mat"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    ids = [1, 2, 3, 4, 1, 5]
    assert tok.decode(ids) == "the cat sat on the mat"
    spans = metrics.answer_spans(tok, ids, ["the", "cat s", " sat", "at on", "mat", "cats"])
    assert spans == [range(0, 1), range(1, 3), range(2, 3), range(2, 4), range(5, 6), None]


def test_answer_scores_count_reproduced_answers_among_those_the_base_holds():
    tok = word_tokenizer()
    g_ids = tok("the cat sat on the mat", add_special_tokens=False).input_ids
    hit1 = torch.ones(len(g_ids), dtype=torch.bool)
    answers = ["CAT SAT", "mat", "dog"]  # "dog": not in the base's text, so not asked of the method
    assert metrics.answer_scores(tok, g_ids, hit1, answers) == {"answers_in_base": 2 / 3, "answers_reproduced": 1.0}
    for miss, reproduced in ((2, 0.5), (3, 1.0), (5, 0.5)):  # "sat" and "mat" are answers' tokens, "on" is not
        poisoned = hit1.clone()
        poisoned[miss] = False
        assert metrics.answer_scores(tok, g_ids, poisoned, answers)["answers_reproduced"] == reproduced, miss
    assert metrics.answer_scores(tok, g_ids, hit1, ["dog"]) == {"answers_in_base": 0.0, "answers_reproduced": None}


@pytest.fixture
def words(tmp_path, monkeypatch):
    """A words suite on a tiny llama with the given variants, and the Bench over it."""
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))
    model_dir = save_words(tmp_path / "llama", "llama")

    def make(methods):
        suite = load(words_suite(tmp_path, model_dir, methods))
        return Bench(suite, progress=False), {c.variant.name: c for c in suite.cases()}

    return make


def with_answers(bench, case):
    """Give prompt 0 an answer its reference holds (two of its tokens, upper-cased) and one it lacks, prompt 1 only
    one it lacks; return the first answer's span."""
    loaded = bench.load(case.model)
    g_ids = loaded.references[0].g_ids
    answer = loaded.tokenizer.decode(g_ids[3:5], skip_special_tokens=True).upper()
    loaded.prompts[0].answers = [answer, "nowhere"]
    loaded.prompts[1].answers = ["nowhere"]
    return metrics.answer_spans(loaded.tokenizer, g_ids, [answer])[0]


def poison(monkeypatch, position: int):
    """Teacher forcing whose argmax misses the reference token at ``position`` of every sample."""
    forward = engine.teacher_force

    def forced(model, method, p_ids, g_ids, mode, recorded=None):
        out = forward(model, method, p_ids, g_ids, mode, recorded)
        out.logits = out.logits.clone()  # an inference tensor: not writable in place
        out.logits[position, g_ids[position]] = out.logits[position].min() - 1
        return out

    monkeypatch.setattr(engine, "teacher_force", forced)


def test_origin_reproduces_every_answer_the_base_holds_and_a_broken_token_does_not(words, monkeypatch):
    bench, cases = words({"origin": {}})
    span = with_answers(bench, cases["origin"])
    record = bench.run(cases["origin"])
    first, second, third = record["samples"]
    assert first["answers_in_base"] == 0.5 and first["answers_reproduced"] == 1.0 and first["answers"][1] == "nowhere"
    assert second["answers_in_base"] == 0.0 and second["answers_reproduced"] is None  # counted in neither mean
    assert third["answers_in_base"] is third["answers_reproduced"] is None and "answers" not in third
    assert record["scores"]["answers_in_base"] == 0.25 and record["scores"]["answers_reproduced"] == 1.0
    assert record["datasets"]["words"]["answers_reproduced"] == 1.0
    poison(monkeypatch, span[-1])
    broken = bench.run(cases["origin"])
    assert broken["samples"][0]["answers_reproduced"] == 0.0 and broken["scores"]["answers_in_base"] == 0.25
    assert broken["scores"]["acc1"] < 1
    rows = report.table([record, broken], datasets=False).splitlines()
    assert rows[0].split("NLL×")[0].split() == ["case", "dataset", "acc@1", "acc@5", "KL", "KL", "p99"]
    assert re.search(r"1st div\s+ans in base\s+ans reproduced\s+kept", rows[0])
    assert re.search(r"12\.0\s+0\.25\s+1\.00\s", rows[1]) and re.search(r"\s0\.25\s+0\.00\s", rows[2])


def test_without_answers_nothing_is_measured_and_the_table_is_unchanged(words):
    bench, cases = words({"origin": {}, "topk-few": {"method": "topk", "keep": 0.1, "min_keep": 2}})
    records = [bench.run(case) for case in cases.values()]
    for r in records:
        assert all(r["scores"][m] is None and r["datasets"]["words"][m] is None for m in metrics.ANSWERS)
        assert all(s[m] is None for s in r["samples"] for m in metrics.ANSWERS) and "answers" not in r["samples"][0]
    header = report.table(records).splitlines()[0].split()
    assert header == ["case", "dataset", "acc@1", "acc@5", "KL", "KL", "p99", "NLL×", "PPL", "PPL×", "1st", "div",
                      "kept", "prefill", "s", "decode", "s", "floors"]


def test_floors_on_reproduced_answers_gate_the_case(words, monkeypatch):
    bench, cases = words({"origin": {"floors": {"answers_reproduced": 1.0}}})
    span = with_answers(bench, cases["origin"])
    assert bench.run(cases["origin"])["failures"] == []
    poison(monkeypatch, span[-1])
    assert bench.run(cases["origin"])["failures"] == ["answers_reproduced = 0.0000 is below its floor 1.0"]
    bench, cases = words({"origin": {"floors": {"answers_reproduced": 0.5}}})  # a suite without answers
    assert bench.run(cases["origin"])["failures"] == [
        "answers_reproduced has a floor (0.5) but this method does not measure it"]
    with pytest.raises(SuiteError, match="unknown key 'answers_in_base'"):  # it describes the base
        words({"origin": {"floors": {"answers_in_base": 1.0}}})
    with pytest.raises(SuiteError, match=re.escape("floor 1.5 is outside the metric's range [0, 1]")):
        words({"origin": {"floors": {"answers_reproduced": 1.5}}})
