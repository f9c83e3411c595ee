"""Tiny model directories on disk (random weights, a word-level tokenizer) and suites that use them,
so tests can run the whole harness (references, methods, scores) in a second without a download."""

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from conftest import TINY, tiny_model

WORDS = "the a cat dog sat on mat ran far home red blue green tree sky sun moon one two three".split()
TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"


def tiny_tokenizer(vocab_size: int = TINY["vocab_size"], swap: bool = False):
    """A word-level tokenizer with ``vocab_size`` ids; ``swap`` exchanges the ids of "cat" and "dog"."""
    names = ["<unk>", "<s>", "</s>"] + WORDS
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    ids = {name: i for i, name in enumerate(names)}
    if swap:
        ids["cat"], ids["dog"] = ids["dog"], ids["cat"]
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = TEMPLATE
    return fast


def save_tiny(path: Path, family: str, seed: int = 0, tokenizer=None, **overrides) -> Path:
    """Save a tiny random ``family`` model with its tokenizer to ``path``."""
    model = tiny_model(family, seed=seed, **overrides)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer(model.config.vocab_size)).save_pretrained(path)
    return path


def write_suite(tmp: Path, model_dir: Path, methods: dict, max_new_tokens: int = 12) -> Path:
    """A suite over ``model_dir`` with three short conversations and ``methods`` (name -> spec)."""
    lines = [
        {"conversations": [{"role": "user", "content": "the cat sat on the mat one two three " * 3}]},
        {"conversations": [{"role": "user", "content": "red blue green tree sky sun moon far home"}]},
        {"conversations": [{"role": "user", "content": "a dog ran far " * 5 + "the red sun"}]},
    ]
    (tmp / "words.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    suite = {
        "generation": {"max_new_tokens": max_new_tokens},
        "models": {"tiny": {"path": str(model_dir), "max_length": 256}},
        "datasets": {"words": "words.jsonl"},
        "methods": methods,
    }
    path = tmp / "suite.yaml"
    path.write_text(json.dumps(suite))  # JSON is YAML
    return path
