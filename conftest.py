"""Shared fixtures: tiny random models of several families and a tiny tokenizer, built in-process
(no download), and a tiny checkpoint directory with a suite file for end-to-end pytest runs."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

pytest_plugins = ["pytester"]
ROOT = Path(__file__).parent
TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
)
WINDOW = 16  # sliding window of the tiny mistral / gemma3: the `prompt` fixture (40 tokens) exceeds it
# Overrides per family: what the family's config needs at TINY's size, and what makes it differ.
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},  # QK-norm on queries and keys; its default head_dim is 128
    "mistral": {"sliding_window": WINDOW},  # every layer sliding
    # One sliding and one full-attention layer; query_pre_attn_scalar != head_dim (its own scaling).
    "gemma3_text": {
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"], "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
    },
    "phi3": {"pad_token_id": 0, "eos_token_id": 2},  # fused qkv_proj; default token ids exceed TINY's vocabulary
}
# Families whose every layer is full attention: the `tiny` fixture runs method-specific tests on these.
# Sliding-window families (mistral, gemma3_text) are covered by tests/test_families.py, where KV methods
# leave sliding layers to the model's window and refuse models that have no full-attention layer.
FULL = sorted(f for f, o in FAMILIES.items() if "sliding_window" not in o)
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised model of ``family`` (fp32, SDPA attention, eval mode)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**TINY, **FAMILIES.get(family, {}), **overrides})
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def tiny_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer trained on this repo's datasets (under TINY's vocab size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((p.read_text() for p in sorted((ROOT / "data").glob("*.jsonl"))), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.chat_template = chat_template
    return fast


def save_tiny(path: Path, family: str = "llama", chat_template: str | None = CHATML, **overrides) -> Path:
    """A tiny checkpoint directory (model + tokenizer) that fidbench loads like any HF model."""
    tiny_model(family, **overrides).save_pretrained(path)
    tiny_tokenizer(chat_template).save_pretrained(path)
    return path


@pytest.fixture(params=FULL)
def tiny(request):
    """One tiny model per full-attention family."""
    return tiny_model(request.param)


@pytest.fixture
def prompt():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 283, (40,), generator=g).tolist()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private fidbench cache directory (references made by a test stay out of the user's cache)."""
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
