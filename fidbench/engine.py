"""Prefill through a method, then teacher-force the reference: in one forward or token by token.

Logits for the N reference tokens: the first comes from the prefill's last position, the other
N-1 from feeding reference tokens 0..N-2 after the prompt.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch

from . import attention

MODES = ("auto", "parallel", "stepwise")


def _cache_kwarg(model) -> str:
    # transformers 5.x renames `past_key_values` to `cache`; pass whichever this version's forward takes.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def call_model(model, cache, **inputs):
    out = model(**inputs, **{_cache_kwarg(model): cache, "use_cache": True})
    return out.logits, (out.cache if hasattr(out, "cache") else out.past_key_values)


def forward(model, ids: torch.Tensor, cache=None, last_only: bool = False):
    """One forward of ``ids`` (1, n) after ``cache``; returns (float32 logits (n|1, V), cache)."""
    extra = {"logits_to_keep": 1} if last_only else {}  # a long prompt's full-vocab logits would cost n × V floats
    logits, new_cache = call_model(model, cache, input_ids=ids, **extra)
    return logits[0].float(), new_cache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


@dataclass
class Forced:
    logits: torch.Tensor  # (N, V) float32: row t predicts reference token t
    prefill_s: float
    decode_s: float


def resolve_mode(method, mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"decode mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        return "parallel" if method.parallel_exact else "stepwise"
    if mode == "parallel" and not method.parallel_exact:
        raise ValueError(
            f"method {method.name!r} is not exact under parallel teacher forcing (its state depends on "
            f"earlier decode steps); use --fidbench-decode stepwise or auto"
        )
    return mode


@torch.inference_mode()
def teacher_force(model, method, p_ids: list[int], g_ids: list[int], mode: str) -> Forced:
    """Score positions of ``g_ids`` after ``p_ids`` under ``method`` (already applied to ``model``)."""
    device = input_device(model)
    prompt = torch.tensor([p_ids], device=device)
    ref = torch.tensor([g_ids], device=device)
    method.begin(len(p_ids))
    _sync(device)
    t0 = time.perf_counter()
    with attention.running(method, attention.Phase("prefill", len(p_ids), 0)):
        first, cache = forward(model, prompt, last_only=True)
    _sync(device)
    t1 = time.perf_counter()
    rows = [first[-1:]]
    p = len(p_ids)
    if len(g_ids) > 1 and mode == "parallel":
        with attention.running(method, attention.Phase("decode", p, p)):
            logits, cache = forward(model, ref[:, :-1], cache)
        rows.append(logits)
    elif len(g_ids) > 1:
        for t in range(len(g_ids) - 1):
            with attention.running(method, attention.Phase("decode", p, p + t)):
                logits, cache = forward(model, ref[:, t : t + 1], cache)
            rows.append(logits)
    _sync(device)
    t2 = time.perf_counter()
    return Forced(torch.cat(rows), t1 - t0, t2 - t1)


class Stepper:
    """Decoding as a deployment does it, one token per forward, over a fixed prompt and its reference: for
    timing. ``prefill()`` starts over (and says how long the prefill took); each ``step()`` feeds the next
    reference token. Both wait for the device, so a timer around them sees the work done."""

    def __init__(self, model, method, p_ids: list[int], g_ids: list[int]):
        self.model, self.method, self.p = model, method, len(p_ids)
        self.device = input_device(model)
        self.prompt = torch.tensor([p_ids], device=self.device)
        self.ref = torch.tensor([g_ids], device=self.device)
        self.cache, self.t = None, 0

    @torch.inference_mode()
    def prefill(self) -> float:
        self.method.begin(self.p)
        self.cache, self.t = None, 0  # free the last round's cache before the next
        _sync(self.device)
        t0 = time.perf_counter()
        with attention.running(self.method, attention.Phase("prefill", self.p, 0)):
            _, self.cache = forward(self.model, self.prompt, last_only=True)
        _sync(self.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def step(self) -> None:
        t = self.t
        with attention.running(self.method, attention.Phase("decode", self.p, self.p + t)):
            _, self.cache = forward(self.model, self.ref[:, t : t + 1], self.cache)
        _sync(self.device)
        self.t += 1
