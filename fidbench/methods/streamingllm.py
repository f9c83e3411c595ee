"""``streamingllm``: attention sinks plus a rolling window (Xiao et al. 2023, "Efficient Streaming
Language Models with Attention Sinks").

Every query, in the prefill and in each decode step, attends to the first ``sink`` positions and to
the most recent ``budget - sink`` positions, itself included: a cache of ``budget`` entries that
rolls as tokens arrive. The window applies to generated positions too, so only a budget covering
the whole prompt and continuation equals the base model. Keys keep their original positions (the
paper re-numbers positions inside its cache; fidbench evicts by masking, so keys stay as cached).
A ratio budget too small to hold the sinks and one recent token keeps ``budget - 1`` sinks (none
for a budget of 1); an explicit budget must exceed ``sink``.
"""

import torch

from ..attention import AttentionCall
from ._kv import KVMethod, leave_sliding, require_every_position
from .base import register


@register
class StreamingLLM(KVMethod):
    name = "streamingllm"
    description = "every query sees the first `sink` positions and a rolling window of recent ones"
    test_params = {"degenerate": {"budget": 1024}, "real": {"budget": 12}}
    sink: int = 4

    def validate(self):
        super().validate()
        if self.sink < 0:
            raise ValueError(f"{self.name}: sink must be >= 0, got {self.sink}")
        if self.budget is not None and self.budget <= self.sink:
            raise ValueError(f"{self.name}: budget ({self.budget}) must exceed sink ({self.sink}) to leave a recent window")

    def attend(self, call: AttentionCall):
        if leave_sliding(self, call):
            return None
        require_every_position(self, call)
        n = self.tokens(call.phase.prompt_len)
        q, kv = call.query.shape[2], call.key.shape[2]
        visible = call.visible()
        if kv <= n:  # every query's window still reaches back to position 0
            mask = None
        else:
            sink = min(self.sink, n - 1)
            rows = torch.arange(kv - q, kv, device=call.key.device)[:, None]  # absolute query positions
            cols = torch.arange(kv, device=call.key.device)[None, :]
            mask = visible & ((cols < sink) | (cols > rows - (n - sink)))
        if call.phase.name == "decode":
            self.record_mask(call, mask)
        return None if mask is None else call.dense(mask=mask)
