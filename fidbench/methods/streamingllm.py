"""``streamingllm``: attention sinks plus recent tokens (Xiao et al. 2023, "Efficient Streaming Language
Models with Attention Sinks").

The cache holds the first ``sink`` positions and the most recent ``budget - sink`` ones (the budget
includes the sinks; a budget too small for them keeps ``budget - 1`` sinks and the most recent token).
Eviction is by position, the same for every head. Two conventions exist in the references, chosen by
``prefill``:

- ``dense`` (default): the prompt is prefilled densely, then cut once to sinks + recent; generated
  tokens are appended without eviction. This is kvpress's StreamingLLMPress (the one kvpress users
  compare against), KVCache-Factory's StreamingLLMKVCluster (``window = budget - 4``), and what
  StreamingLLM's chat demo does within a turn (dense prefill, no eviction while generating).
- ``windowed``: every query, in the prefill and in each decode step, attends to the sinks and the
  most recent ``budget - sink`` positions, itself included: a cache that rolls as tokens arrive, as in
  StreamingLLM's perplexity evaluation (``eval_long_ppl.py``, tokens fed one at a time). The window
  rolls over generated positions too, so only a budget covering prompt and continuation equals the
  base model.

Differences: keys keep their original positions (StreamingLLM re-numbers positions inside its cache,
pos-shift; kvpress and KVCache-Factory keep them, as fidbench does). fidbench's budget rule (``_kv``).
"""

from typing import Literal

import torch

from ..attention import AttentionCall
from ._kv import Evicting, leave_sliding, require_every_position
from .base import register


@register
class StreamingLLM(Evicting):
    name = "streamingllm"
    description = "the first `sink` positions and the most recent ones: dense prefill then cut, or a rolling window"
    defaults_from = ("StreamingLLM's 4 attention sinks; prefill dense as kvpress's StreamingLLMPress; budget: "
                     "fidbench's rule (_kv)")
    test_params = {"degenerate": {"budget": 1024}, "real": {"budget": 12}}
    granularity = "layer"  # eviction by position: one choice for every head
    sink: int = 4
    prefill: Literal["dense", "windowed"] = "dense"

    def validate(self):
        super().validate()
        if self.sink < 0:
            raise ValueError(f"{self.name}: sink must be >= 0, got {self.sink}")
        if self.budget is not None and self.budget <= self.sink:
            raise ValueError(f"{self.name}: budget ({self.budget}) must exceed sink ({self.sink}) to leave a recent "
                             "window")

    @property
    def base_prefill(self) -> bool:
        return self.prefill == "dense"  # a windowed prefill attends like the rolling cache

    def sinks(self, n: int) -> int:
        """Sink positions kept at budget ``n``: at least the most recent position stays."""
        return min(self.sink, n - 1)

    def score(self, call: AttentionCall) -> torch.Tensor:
        """(batch, 1, prompt_len): sinks inf, then later positions higher (the most recent are kept)."""
        p = call.phase.prompt_len
        position = torch.arange(p, device=call.key.device, dtype=torch.float32)
        score = position.masked_fill(position < self.sinks(self.layer_budget(call)), float("inf"))
        return score.expand(call.key.shape[0], 1, p)

    def attend(self, call: AttentionCall):
        if self.prefill == "dense":
            return super().attend(call)
        if leave_sliding(self, call):
            return None
        require_every_position(self, call)
        n = self.tokens(call.phase.prompt_len)
        q, kv = call.query.shape[2], call.key.shape[2]
        if call.phase.name == "prefill":
            self.note_heads(min(n, kv))
        if kv <= n:  # every query's window still reaches back to position 0
            mask = None
        else:
            sink = self.sinks(n)
            rows = torch.arange(kv - q, kv, device=call.key.device)[:, None]  # absolute query positions
            cols = torch.arange(kv, device=call.key.device)[None, :]
            mask = call.visible() & ((cols < sink) | (cols > rows - (n - sink)))
        if call.phase.name == "decode":
            self.record_mask(call, mask)
        return None if mask is None else call.dense(mask=mask)
