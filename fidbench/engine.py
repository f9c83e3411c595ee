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
from .methods import build

MODES = ("auto", "parallel", "stepwise")


def _cache_kwarg(model) -> str:
    # transformers 5.x renames `past_key_values` to `cache`; pass whichever this version's forward takes.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _call(model, cache, **inputs):
    out = model(**inputs, **{_cache_kwarg(model): cache, "use_cache": True})
    return out.logits, (out.cache if hasattr(out, "cache") else out.past_key_values)


def forward(model, ids: torch.Tensor, cache=None, last_only: bool = False):
    """One forward of ``ids`` (1, n) after ``cache``; returns (float32 logits (n|1, V), cache)."""
    extra = {"logits_to_keep": 1} if last_only else {}  # a long prompt's full-vocab logits would cost n × V floats
    logits, new_cache = _call(model, cache, input_ids=ids, **extra)
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
    with attention.running(method, attention.Phase("prefill", len(p_ids))):
        first, cache = forward(model, prompt, last_only=True)
    _sync(device)
    t1 = time.perf_counter()
    rows = [first[-1:]]
    with attention.running(method, attention.Phase("decode", len(p_ids))):
        if len(g_ids) > 1 and mode == "parallel":
            logits, cache = forward(model, ref[:, :-1], cache)
            rows.append(logits)
        elif len(g_ids) > 1:
            for t in range(len(g_ids) - 1):
                logits, cache = forward(model, ref[:, t : t + 1], cache)
                rows.append(logits)
    _sync(device)
    t2 = time.perf_counter()
    return Forced(torch.cat(rows), t1 - t0, t2 - t1)


@torch.inference_mode()
def greedy(model, p_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], torch.Tensor]:
    """The base model's greedy continuation of ``p_ids`` and its (N, V) float32 logits, step by step.

    Stops after an end-of-sequence token (kept as the last reference token) or ``max_new_tokens``.
    """
    device = input_device(model)
    logits, cache = forward(model, torch.tensor([p_ids], device=device), last_only=True)
    tokens, rows = [], []
    while True:
        row = logits[-1]
        token = int(row.argmax())
        tokens.append(token)
        rows.append(row)
        if token in eos_ids or len(tokens) == max_new_tokens:
            break
        logits, cache = forward(model, torch.tensor([[token]], device=device), cache)
    return tokens, torch.stack(rows)


@torch.inference_mode()
def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int]) -> list[tuple[list[int], torch.Tensor]]:
    """``greedy`` for several prompts in one batch: left padding, an attention mask, position ids from the mask.

    Padded positions are masked out, so the result is ``greedy``'s up to fp32 summation order (the
    batch changes matmul shapes and the attention kernel): a near-tie can flip. Each sample stops at
    its own end-of-sequence token; finished samples ride along until the last one stops.
    """
    if len(prompts) == 1:
        return [greedy(model, prompts[0], max_new_tokens, eos_ids)]
    device = input_device(model)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = _call(model, None, input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
    tokens: list[list[int]] = [[] for _ in prompts]
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    while True:
        last = logits[:, -1].float()
        step = last.argmax(-1).tolist()
        for b, token in enumerate(step):
            if not done[b]:
                tokens[b].append(token)
                rows[b].append(last[b])
                done[b] = token in eos_ids or len(tokens[b]) == max_new_tokens
        if all(done):
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits, cache = _call(model, cache, input_ids=torch.tensor(step, device=device)[:, None],
                              attention_mask=mask, position_ids=positions)
    return [(t, torch.stack(r)) for t, r in zip(tokens, rows)]


@torch.inference_mode()
def base_logits(model, p_ids: list[int], g_ids: list[int]) -> torch.Tensor:
    """The base model's stepwise logits over a given reference (for imported references)."""
    return teacher_force(model, build("origin", {}), p_ids, g_ids, "stepwise").logits
