"""checkpoint: another model directory scored against the base model's references."""

import pytest
from helpers import FAMILIES, TINY, save_words, word_tokenizer, words_suite

from fidbench.harness import Bench
from fidbench.methods import build
from fidbench.suite import load


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))


def run_all(tmp_path, base, methods):
    suite = load(words_suite(tmp_path, base, methods))
    bench = Bench(suite, progress=False)
    return {case.variant.name: bench.run(case) for case in suite.cases()}


@pytest.mark.parametrize("family", sorted(FAMILIES))  # the family matrix for this method (tests/test_families.py)
def test_checkpoint_of_the_base_directory_equals_origin(tmp_path, cache, family):
    base = save_words(tmp_path / "base", family)
    other = save_words(tmp_path / "other", family, seed=1)
    runs = run_all(tmp_path, base, {
        "origin": {},
        "self": {"method": "checkpoint", "path": str(base)},
        "other": {"method": "checkpoint", "path": str(other)},
    })
    origin, same, different = runs["origin"], runs["self"], runs["other"]
    assert same["scores"] == origin["scores"] and same["samples"] == origin["samples"]
    assert origin["scores"]["acc1"] == 1.0 and origin["scores"]["kl_mean"] < 1e-6
    # Another checkpoint is really evaluated (no fallback to the base model).
    assert different["scores"]["acc1"] < 1.0 and different["scores"]["kl_mean"] > 1e-3
    assert different["kept"] == {"checkpoint": str(other), "dtype": "fp32", "model_type": family}


def test_checkpoint_vocabulary_mismatches_are_clear_errors(tmp_path, cache):
    base = save_words(tmp_path / "base", "llama")
    bigger = save_words(tmp_path / "bigger", "llama", vocab_size=TINY["vocab_size"] + 2, tokenizer=word_tokenizer())
    swapped = save_words(tmp_path / "swapped", "llama", tokenizer=word_tokenizer(swap=True))
    message = f"vocab_size {TINY['vocab_size'] + 2}, the base model 'tiny' has {TINY['vocab_size']}"
    with pytest.raises(ValueError, match=message):
        run_all(tmp_path, base, {"bigger": {"method": "checkpoint", "path": str(bigger)}})
    with pytest.raises(ValueError, match=r"maps tokens to other ids .*2 differ.*'cat'"):
        run_all(tmp_path, base, {"swapped": {"method": "checkpoint", "path": str(swapped)}})
    # The base tokenizer given explicitly makes the same weights acceptable.
    runs = run_all(tmp_path, base, {"swapped": {"method": "checkpoint", "path": str(swapped), "tokenizer": str(base)}})
    assert runs["swapped"]["scores"]["n_tokens"] > 0


def test_checkpoint_parameters_are_checked():
    with pytest.raises(ValueError, match="checkpoint: path .* is required"):
        build("checkpoint", {})
    with pytest.raises(ValueError, match="checkpoint: dtype must be one of"):
        build("checkpoint", {"path": "x", "dtype": "int4"})
