"""AttentionCall.dense: a long masked prefill runs in query slices with the very same result."""

import torch

from fidbench import attention, engine
from fidbench.methods import build


def test_sliced_masked_prefill_equals_one_sdpa_call(tiny, prompt, monkeypatch):
    # streamingllm with a windowed prefill hands SDPA a full (sinks + window) mask in the prefill: the sliced path.
    method = build("streamingllm", {"budget": 12, "sink": 2, "prefill": "windowed"})
    g_ids = list(range(5, 13))

    def logits():
        with method.apply(tiny) as model:
            return engine.teacher_force(model, method, prompt, g_ids, "parallel").logits

    whole = logits()
    calls = []
    real = attention.ALL_ATTENTION_FUNCTIONS["sdpa"]
    monkeypatch.setitem(attention.ALL_ATTENTION_FUNCTIONS, "sdpa",
                        lambda m, q, *a, **kw: calls.append(q.shape[2]) or real(m, q, *a, **kw))
    monkeypatch.setattr(attention, "DENSE_ROWS", 16)
    sliced = logits()
    layers = tiny.config.num_hidden_layers
    assert calls[: 3 * layers] == [16, 16, 8] * layers  # the 40-token prefill, in slices of 16 queries
    assert torch.equal(whole, sliced)
