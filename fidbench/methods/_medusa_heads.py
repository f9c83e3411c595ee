"""Medusa heads as Medusa lays them out (``ResBlock``, ``Heads``, the head files' names) and the decoder stack
they read: what the ``medusa`` method (``medusa.py``) and its trainer (``fidbench.medusa_train``) share, so that
neither imports the other for them."""

from __future__ import annotations

import torch

FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")


class ResBlock(torch.nn.Module):
    """Medusa's residual block: x + SiLU(linear(x)), the linear with a bias."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, hidden)

    def forward(self, x):
        return x + torch.nn.functional.silu(self.linear(x))


class Heads(torch.nn.Module):
    """Medusa heads with Medusa's state-dict layout (``{i}.{j}.linear.*``, v1's ``{i}.{L}.weight``).

    ``lm_head`` is None for v1 (each head has its own) and the base's output layer for v2."""

    def __init__(self, n: int, layers: int, hidden: int, vocab: int | None = None):
        super().__init__()
        own = (lambda: [torch.nn.Linear(hidden, vocab, bias=False)]) if vocab else list  # one per head
        self.heads = torch.nn.ModuleList(
            torch.nn.Sequential(*[ResBlock(hidden) for _ in range(layers)], *own()) for _ in range(n))
        self.layers, self.version = layers, "1" if vocab else "2"

    def forward(self, hidden: torch.Tensor, lm_head=None) -> torch.Tensor:
        """(heads, ..., vocab) logits of every head for ``hidden`` (..., H)."""
        return torch.stack([head(hidden) if lm_head is None else lm_head(head(hidden)) for head in self.heads])

    def state_dict_medusa(self) -> dict:
        return {k.removeprefix("heads."): v for k, v in self.state_dict().items()}


def decoder(model):
    """The decoder stack under the LM head. transformers 4.56 returns None from ``get_decoder()`` on *ForCausalLM
    models, and ``base_model`` is the whole model for some of them (Gemma 3), so ``.model`` there."""
    return model.get_decoder() or model.model
