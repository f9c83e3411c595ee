"""``tova``: Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs").

A fixed-size cache of ``budget`` positions per layer. The prefill runs dense; at its end the layer
keeps the prompt positions the last prompt query attends to most. Each decode query attends to the
kept positions plus itself; then, once the cache is over budget, the position it attended to least is
evicted for good. That may be the new token itself, as in the paper. A forward of several reference
tokens (parallel teacher forcing) runs that loop query by query inside each layer, so it computes exactly
what the token-by-token decode does (``_kv.DecodeEvicting``).

Follows TOVA's code (schwartz-lab-NLP/TOVA ``src/tova_cache.py``, ``TOVACache.reduce``): after each
forward with more keys than the cache size, the last query's attention probabilities are averaged over
all heads of the layer and the same top ``cache_size`` positions are kept in every head (``granularity``
is ``layer``, as kvpress's TOVAPress does too). ``keep_last``: the prefill cut always keeps the last prompt
position, as kvpress's TOVAPress does (its score is the maximum + 1; TOVA's code does not force it; kvpress's
press cuts only the prefill, tests/test_kvpress.py checks that cut equal). Budget: fidbench's one rule (``_kv``).
Differences:
eviction is masking (exact, see ``_kv``); probabilities are computed in float32 (TOVA casts them to the
model dtype).
"""

import torch

from ..attention import AttentionCall
from ._kv import DecodeEvicting, head_probs, last_rows_visible, top_mask
from .base import register


@register
class TOVA(DecodeEvicting):
    name = "tova"
    description = "fixed-size cache: each step evicts the position the current query attends to least (TOVA)"
    defaults_from = "schwartz-lab-NLP/TOVA TOVACache (no parameters of its own); budget: fidbench's rule (_kv)"
    test_params = {"degenerate": {"budget": 1024}, "real": {"budget": 12}}
    granularity = "layer"
    keep_last: bool = False

    def prefill_keep(self, call: AttentionCall, size: int) -> torch.Tensor:
        n = call.key.shape[2]
        if n <= size:
            return call.key.new_ones(call.key.shape[0], 1, n, dtype=torch.bool)
        last = head_probs(call, call.query[:, :, -1:], last_rows_visible(call, 1), self.granularity)[:, :, 0]
        if self.keep_last:
            last = last.clone()
            last[..., -1] = torch.inf
        return top_mask(last, size)

    def victim_scores(self, call: AttentionCall, probs: torch.Tensor, length: int) -> torch.Tensor:
        return probs
