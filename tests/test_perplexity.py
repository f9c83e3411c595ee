"""Perplexity on plain text: ``text`` datasets split into Hugging Face's strided windows, scored under each
method as ppl, ppl_ratio and KL to the base over the same tokens; variants choose their datasets."""

import json
import math

import pytest
import torch
from helpers import save_words, word_tokenizer

from fidbench import datasets
from fidbench.datasets import DatasetError, windows
from fidbench.harness import Bench
from fidbench.reference import greedy
from fidbench.suite import DatasetSpec, SuiteError, load


@pytest.mark.parametrize("n", [2, 3, 17, 32, 33, 100, 101])
@pytest.mark.parametrize("window,stride", [(32, 16), (32, 31), (32, 1), (8, 3), (2, 1)])
def test_windows_score_every_token_but_the_first_exactly_once(n, window, stride):
    spans = windows(n, window, stride)
    scored = [t for _, first, end in spans for t in range(first, end)]
    assert scored == list(range(1, n))  # each token once, in order
    for i, (begin, first, end) in enumerate(spans):
        assert end - begin <= window and begin < first < end
        assert begin == i * stride  # a window starts every stride tokens
        if i > 0:
            assert first - begin == window - stride  # the rest of the window is context
            assert end - first <= stride
    assert spans[-1][2] == n and all(end < n for _, _, end in spans[:-1])  # stops at the first window reaching the end


def test_windows_refuse_a_stride_without_context():
    for stride in (0, 32, 40):
        with pytest.raises(ValueError, match="stride must be in"):
            windows(100, 32, stride)


def text_file(tmp_path, words: list[str]):
    path = tmp_path / "text.txt"
    path.write_text(" ".join(words) + "\n")
    return path


def test_text_dataset_loads_windows_with_the_model_max_length_by_default(tmp_path):
    tok = word_tokenizer()
    words = [f"w{i % 50}" for i in range(90)]
    path = text_file(tmp_path, words)
    ids = tok(path.read_text()).input_ids
    prompts = datasets.load(DatasetSpec("t", path, "text"), tok, max_length=40)  # window 40, stride 20
    assert [p.template for p in prompts] == ["text"] * len(prompts)
    assert [len(p.p_ids) for p in prompts] == [1, 20, 20, 20] and [len(p.g_ids) for p in prompts] == [39, 20, 20, 10]
    assert [t for p in prompts for t in p.g_ids] == ids[1:]
    for p, (begin, _, end) in zip(prompts, windows(len(ids), 40, 20)):
        assert p.p_ids + p.g_ids == ids[begin:end]
    assert len(datasets.load(DatasetSpec("t", path, "text"), tok, limit=2, max_length=40)) == 2
    with pytest.raises(DatasetError, match="window 64 exceeds the model's max_length 40"):
        datasets.load(DatasetSpec("t", path, "text", window=64), tok, max_length=40)
    one = text_file(tmp_path, ["w1"])
    with pytest.raises(DatasetError, match="holds 1 token"):
        datasets.load(DatasetSpec("t", one, "text"), tok, max_length=40)


@pytest.fixture
def text_bench(tmp_path, monkeypatch):
    """A tiny llama, a text of its own greedy output (so that a change to the model raises its perplexity),
    and a suite whose text dataset only the variants naming it score."""
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))
    model_dir = save_words(tmp_path / "llama", "llama")
    from fidbench import models

    model, tok = models.load(str(model_dir))
    start = tok("the cat sat on the mat").input_ids
    g_ids, _ = greedy(model, start, 90, eos_ids=set())
    text_file(tmp_path, tok.convert_ids_to_tokens(start + g_ids))
    line = json.dumps({"conversations": [{"role": "user", "content": "a dog ran"}]})
    (tmp_path / "words.jsonl").write_text(line + "\n")
    suite = {
        "generation": {"max_new_tokens": 8},
        "models": {"tiny": {"path": str(model_dir), "max_length": 64}},
        "datasets": {"words": "words.jsonl",
                     "essay": {"text": "text.txt", "window": 32, "stride": 12, "default": False}},
        "methods": {
            "origin": {},
            "ppl-origin": {"method": "origin", "datasets": ["essay"]},
            "ppl-both": {"method": "origin", "datasets": ["essay", "words"]},
            "ppl-rtn": {"method": "rtn", "bits": 2, "group": 16, "datasets": ["essay"]},
        },
    }
    (tmp_path / "suite.yaml").write_text(json.dumps(suite))
    suite = load(tmp_path / "suite.yaml")
    return Bench(suite, progress=False), {c.variant.name: c for c in suite.cases()}, model, tok(
        (tmp_path / "text.txt").read_text()).input_ids


def strided_perplexity(model, ids, window, stride):
    """Hugging Face's strided perplexity loop (docs/source/en/perplexity.md), written out independently."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[begin:end]])).logits[0, :-1].double(), -1)
        per_token = -logp.gather(1, torch.tensor(ids[begin + 1 : end])[:, None])[:, 0]
        scored = per_token[-(end - prev_end):]  # the targets no earlier window scored (the first: all it has)
        nll, count = nll + scored.sum().item(), count + len(scored)
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


def test_text_perplexity_under_origin_and_a_method_that_changes_the_model(text_bench):
    bench, cases, model, ids = text_bench
    origin = bench.run(cases["ppl-origin"])
    assert set(origin["datasets"]) == {"essay"}  # only the datasets the variant names
    scores = origin["scores"]
    expected, count = strided_perplexity(model, ids, 32, 12)
    assert scores["n_tokens"] == count == len(ids) - 1
    assert scores["ppl"] == pytest.approx(expected, rel=1e-5)
    assert scores["ppl"] == pytest.approx(math.exp(scores["nll_base"]), rel=1e-5)  # origin's ppl is the base's
    assert scores["ppl_base"] == pytest.approx(expected, rel=1e-5)
    assert scores["ppl_ratio"] == pytest.approx(1.0, abs=1e-5) and scores["kl_mean"] < 1e-6

    changed = bench.run(cases["ppl-rtn"])["scores"]
    assert changed["ppl_base"] == scores["ppl_base"]
    # On random weights quantization noise moves the perplexity either way (rtn's integer zero point lowers it)
    assert changed["ppl"] != pytest.approx(scores["ppl"], rel=1e-3)
    assert changed["ppl_ratio"] == pytest.approx(changed["ppl"] / changed["ppl_base"])
    # The tiny model's distributions are near uniform (ppl ~200), so KL stays small: well above origin's, though
    assert changed["kl_mean"] > 1e-4

    default = bench.run(cases["origin"])
    assert set(default["datasets"]) == {"words"}  # default: false keeps the text out of other variants
    both = bench.run(cases["ppl-both"])
    assert set(both["datasets"]) == {"essay", "words"}
    assert both["datasets"]["essay"]["ppl"] == scores["ppl"]


@pytest.mark.parametrize("dataset,message", [
    ({"text": "text.txt", "window": 32, "stride": 32}, "stride: must be below the window"),
    ({"text": "text.txt", "window": 0}, "window: must be a positive integer"),
    ({"path": "words.jsonl", "window": 32}, "window: only a 'text' dataset"),
    ({"text": "text.txt", "default": "no"}, "default: must be true or false"),
])
def test_text_dataset_keys_are_checked(tmp_path, dataset, message):
    (tmp_path / "text.txt").write_text("a b c")
    (tmp_path / "words.jsonl").write_text("")
    suite = {"models": {"m": {"path": "m"}}, "datasets": {"d": dataset}, "methods": {"origin": {}}}
    (tmp_path / "s.yaml").write_text(json.dumps(suite))
    with pytest.raises(SuiteError, match=message):
        load(tmp_path / "s.yaml")


@pytest.mark.parametrize("methods,message", [
    ({"origin": {"datasets": ["nope"]}},
     r"origin.datasets: must be a non-empty list of scored datasets of this suite \(w, t\)"),
    ({"origin": {"datasets": ["cal"]}}, "must be a non-empty list of scored datasets"),
    ({"origin": {"datasets": []}}, "must be a non-empty list"),
    ({"origin": {}}, "scores no dataset"),
])
def test_variant_datasets_are_checked(tmp_path, methods, message):
    (tmp_path / "text.txt").write_text("a b c")
    (tmp_path / "w.jsonl").write_text("")
    datasets_ = {"w": {"path": "w.jsonl", "default": False}, "t": {"text": "text.txt", "default": False},
                 "cal": {"path": "w.jsonl", "score": False}}
    suite = {"models": {"m": {"path": "m"}}, "datasets": datasets_, "methods": methods}
    (tmp_path / "s.yaml").write_text(json.dumps(suite))
    with pytest.raises(SuiteError, match=message):
        load(tmp_path / "s.yaml")
