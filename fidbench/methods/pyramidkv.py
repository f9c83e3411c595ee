"""``pyramidkv``: PyramidKV (Cai et al. 2024, "PyramidKV: Dynamic KV Cache Compression based on
Pyramidal Information Funneling").

SnapKV's scoring and window, with per-layer budgets that shrink linearly from the lowest layer to
the highest, keeping the total of SnapKV's uniform budget. As in the paper's code, only the part of
the budget beyond the window is redistributed: the top layer gets (budget - window) / ``beta`` of
it, the bottom layer twice the average minus that (capped at what the prompt holds, the top then
taking the difference), the layers between a linear interpolation. Per-layer budgets are rounded
so that their sum is exact (the paper's integer steps lose a few tokens). Averaging over the query
heads sharing a KV head and the short-prompt rule are SnapKV's (see ``snapkv``). On models with
sliding-window layers (Gemma 3) only the full-attention layers are compressed (``_kv``), each with its
depth's budget in the pyramid over all layers, so their mean budget is not the nominal one.
"""

import math
from fractions import Fraction

from ..attention import AttentionCall
from .base import register
from .snapkv import SnapKV


def pyramid(n: int, prompt_len: int, window: int, layers: int, beta: float) -> list[int]:
    """Per-layer budgets (lowest layer first) averaging ``n`` of ``prompt_len`` tokens, each with ``window`` recent ones."""
    if layers == 1:
        return [n]
    recent = min(window, n)
    average, room = n - recent, prompt_len - recent  # beyond the window: the mean, and the most a layer can take
    top = Fraction(average) / Fraction(beta)
    bottom = 2 * average - top
    if bottom > room:
        bottom, top = Fraction(room), 2 * average - Fraction(room)
    shares = [bottom + (top - bottom) * i / (layers - 1) for i in range(layers)]
    floors = [math.floor(s) for s in shares]
    # Largest fractional parts first (stable: lower layers win ties), so budgets stay non-increasing.
    order = sorted(range(layers), key=lambda i: floors[i] - shares[i])
    for i in order[: layers * average - sum(floors)]:
        floors[i] += 1
    return [recent + f for f in floors]


@register
class PyramidKV(SnapKV):
    name = "pyramidkv"
    description = "SnapKV scoring with per-layer budgets shrinking linearly with depth, same total"
    test_params = {"degenerate": {"budget": 1024}, "real": {"budget": 12, "window": 4, "kernel": 3}}
    beta: float = 20.0

    def validate(self):
        super().validate()
        if self.beta < 1:
            raise ValueError(f"{self.name}: beta must be >= 1 (the top layer's share is 1/beta of the average), got {self.beta}")

    def layer_budget(self, call: AttentionCall) -> int:
        p, n = call.phase.prompt_len, self.tokens(call.phase.prompt_len)
        if n >= p:
            return n
        return pyramid(n, p, self.window, call.module.config.num_hidden_layers, self.beta)[call.layer_idx]
