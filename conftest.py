"""Shared fixtures: tiny random models of several families, built from configs (no download)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
)
FAMILIES = {
    "llama": {},
    "qwen2": {},
}


def tiny_model(family: str, seed: int = 0, **overrides):
    """A randomly initialised model of ``family`` (fp32, SDPA attention, eval mode)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**TINY, **FAMILIES.get(family, {}), **overrides})
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.fixture(params=sorted(FAMILIES))
def tiny(request):
    """One tiny model per family."""
    return tiny_model(request.param)


@pytest.fixture
def prompt():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY["vocab_size"], (40,), generator=g).tolist()
