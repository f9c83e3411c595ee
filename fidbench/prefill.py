"""The base model's prefill of a prompt, recorded once and replayed for every case whose method leaves
the prefill to the base model (``Method.base_prefill``): KV eviction, Quest, top-k, KIVI, GEAR, origin.

Those methods let every prefill attention call run densely and only look at it (SnapKV scores the
window's queries, H2O sums attention columns, key-norm reads the keys): the cache and the last logits
they decode from are the base model's. On long prompts the prefill is nearly all of a case's time (a
3,900-token prompt: 27 s of prefill, 1 s of parallel decode for the default model on one core), and
each case of a suite prefilled the same prompts again. A ``Recorded`` prefill keeps what each layer's
attention call received (query, key, value, mask, keyword arguments) and the last position's logits;
``Recorded.replay`` hands the same calls to a method's hook, layer by layer, and rebuilds the cache with the
same ``update`` calls the layers made. The method sees the very tensors a live prefill would hand it,
so everything after is bit for bit what a live prefill gives (tests/test_prefill.py, six families).

A hook that changes a prefill call's output while replayed is an error, never a silently different
run; so is one that writes into a call's query, key, value or mask in place (live, the layer would then
compute on what it wrote), and a method that writes into a record later (it kept a tensor of it), named
by the record's next replay. Tensors' version counters say so, read on the host at no cost (records are
made under ``no_grad``, not ``inference_mode``, to have them); a spoiled record is made again for the next
case. Statistics a method derives from a call independently of its own parameters (H2O's attention
column sums) are computed once per recorded call (``AttentionCall.once``).

Records live in memory with the loaded model (on its device), up to ``Prefills.max_bytes``: the
query, key and value of every layer (447 MB for a 3,880-token prompt of the default model in float32). Prompts
beyond the cap are prefilled live by every case, as without sharing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from . import attention, engine


@dataclass
class Call:
    """One layer's prefill attention call, as the model made it."""

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    kwargs: dict
    memo: dict = field(default_factory=dict)  # AttentionCall.once: statistics derived from this call


@dataclass
class Recorded:
    calls: list[Call]  # in the order the layers ran
    first: torch.Tensor  # (1, V) float32 logits of the last prompt position
    prompt_len: int
    versions: list[tuple[int, ...]] = field(init=False)  # each call's tensors' version counters (_versions)
    spoiled: bool = False  # a method wrote into it: Prefills records the prompt again
    last: str = ""  # the method that replayed it last

    def __post_init__(self):
        self.versions = self._versions()

    def _versions(self) -> list[tuple[int, ...]]:
        return [_versions(c.query, c.key, c.value, c.attention_mask) for c in self.calls]

    def _spoiled(self, method: str, where: str, layer: int) -> RuntimeError:
        self.spoiled = True
        return RuntimeError(
            f"method {method!r} wrote into a prefill attention call's query, key, value or mask in place ({where}, "
            f"layer {layer}), so its prefill is not the base model's and it cannot replay a shared prefill: its class "
            f"must not declare base_prefill, or it must leave those tensors alone")

    @property
    def nbytes(self) -> int:
        """Memory the record holds: each storage once (layers share a mask; a fused projection's views share one)."""
        tensors = (t for c in self.calls for t in (c.query, c.key, c.value, c.attention_mask) if t is not None)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values()) + self.first.nbytes

    def replay(self, model, method):
        """What a live prefill under ``method`` returns (last logits, cache): the method's hook sees each
        recorded call in layer order, and the cache gets each layer's keys and values as the layer gave them."""
        for c, now, then in zip(self.calls, self._versions(), self.versions):
            if now != then:  # the cache of a replay may hold the recorded tensors: written into while decoding
                raise self._spoiled(self.last, "after its replay", c.module.layer_idx)
        self.last = method.name
        cache = DynamicCache(config=model.config)
        phase = attention.Phase("prefill", self.prompt_len, 0)
        with torch.inference_mode(False), torch.no_grad():  # normal tensors: inference tensors have no versions
            for c in self.calls:
                key, value = cache.update(c.key, c.value, c.module.layer_idx)
                call = attention.AttentionCall(c.module, c.query, key, value, c.attention_mask, phase, c.kwargs, c.memo)
                before = _versions(c.query, key, value, c.attention_mask)
                out = method.attend(call)
                if _versions(c.query, key, value, c.attention_mask) != before:  # live, it would compute on them
                    raise self._spoiled(method.name, "in its prefill hook", c.module.layer_idx)
                if out is not None:
                    raise RuntimeError(
                        f"method {method.name!r} changed the output of a prefill attention call (layer "
                        f"{c.module.layer_idx}), so its prefill is not the base model's and it cannot replay a "
                        f"shared prefill: its class must not declare base_prefill"
                    )
        return self.first, cache


def _versions(*tensors) -> tuple[int, ...]:
    """Version counters, bumped by every in-place write (also through a view): host integers, no device sync."""
    return tuple(t._version for t in tensors if t is not None)


class _Recorder:
    """Stands in for a method during the recorded prefill: keeps each call, lets it run densely."""

    def __init__(self):
        self.calls: list[Call] = []

    def attend(self, call: attention.AttentionCall):
        self.calls.append(Call(call.module, call.query, call.key, call.value, call.attention_mask, call.kwargs))
        return None


@torch.no_grad()  # not inference_mode: inference tensors have no version counters (Recorded.versions)
def record(model, p_ids: list[int]) -> Recorded | None:
    """The base model's prefill of ``p_ids``, recorded; None when its cache is not a plain ``DynamicCache``
    (the one type ``Recorded.replay`` rebuilds)."""
    recorder = _Recorder()
    prompt = torch.tensor([p_ids], device=engine.input_device(model))
    with attention.installed(model, "a shared prefill"):
        with attention.running(recorder, attention.Phase("prefill", len(p_ids), 0)):
            first, cache = engine.forward(model, prompt, last_only=True)
    if type(cache) is not DynamicCache:
        return None
    return Recorded(recorder.calls, first[-1:], len(p_ids))


class Prefills:
    """The recorded prefills of a loaded model, by prompt, up to ``max_bytes`` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self._records: dict[tuple[int, ...], Recorded | None] = {}

    def get(self, model, p_ids: list[int]) -> Recorded | None:
        """The record of ``p_ids``, made on first use; kept for later cases while the cap allows (a record
        it cannot keep still serves the case that made it). None: prefill it live."""
        key = tuple(p_ids)
        if key in self._records and not getattr(self._records[key], "spoiled", False):
            return self._records[key]
        if key in self._records:  # a method wrote into it (and failed its case for it): record it again
            self.used -= self._records.pop(key).nbytes
        if self.used >= self.max_bytes:
            return None
        rec = record(model, p_ids)
        size = rec.nbytes if rec is not None else 0
        fits = rec is not None and self.used + size <= self.max_bytes
        self._records[key] = rec if fits else None
        self.used += size if fits else 0
        return rec
