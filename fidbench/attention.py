"""The one attention function fidbench registers with transformers, and the call it hands to methods.

Methods never copy model code: while a method with an ``attend`` hook is applied, the model's
``attn_implementation`` is switched to ``"fidbench"``, whose function below forwards each layer's
attention call to the active method. Dense work goes back to transformers' own SDPA function,
with the mask the model built (sliding windows and padding included).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "fidbench"
DENSE_ROWS = 1024  # queries per SDPA call when a method hands a full mask (see AttentionCall.dense)


@dataclass
class Row:
    """One prompt of a batch (``fidbench.engine``'s batched forwards): left-padded with ``pad`` tokens, its real
    tokens end before padded index ``end`` (None: none of the forward's queries is past it), and ``state`` is
    the method's state for this prompt (``Method.sample_state``)."""

    prompt_len: int
    pad: int
    end: int | None
    state: Any = None


@dataclass
class Phase:
    """What the engine is doing while a forward runs: ``prefill`` or ``decode``, the prompt length, and
    ``start``, the absolute position of the forward's first query (None: derived from the call).

    A batch of prompts gives its ``rows``; ``prompt_len`` and ``start`` are then padded widths and indices, and
    each row's attention calls reach the method as that prompt's own (``by_row``)."""

    name: str
    prompt_len: int
    start: int | None = None
    rows: list[Row] | None = None


@dataclass
class AttentionCall:
    """One layer's attention call, as the model made it (query/key/value in (batch, heads, seq, dim)).

    ``key``/``value`` are what the layer's cache returned after storing the current tokens, so key
    index j is an absolute position only on full-attention layers. transformers' ``DynamicCache``
    (built from the config by the model's forward) gives sliding-window layers a
    ``DynamicSlidingWindowLayer`` that stores only the last ``sliding_window - 1`` tokens and returns
    those plus the current ones: in decode after a prompt longer than the window, key 0 is not
    position 0. Either way the keys are the contiguous run of positions ending at the last query,
    which ``key_positions()`` gives; ``sliding_window`` says which layers slide.
    """

    module: torch.nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attention_mask: torch.Tensor | None
    phase: Phase
    kwargs: dict[str, Any] = field(default_factory=dict)
    memo: dict | None = None  # a recorded prefill call's (fidbench.prefill): what ``once`` computed on it
    # In a stack (fidbench.methods.stack): the later members, handed what ``dense`` is asked to attend.
    then: Callable[[AttentionCall], torch.Tensor] | None = None

    def once(self, key, compute):
        """``compute(self)``, a statistic of this call that no parameter of the method changes (give them
        all in ``key``): on a recorded prefill call, computed by the first method replaying it and kept for
        the others; on a live call, computed. Callers must not change the tensor in place."""
        if self.memo is None:
            return compute(self)
        if key not in self.memo:
            self.memo[key] = compute(self)
        return self.memo[key]

    @property
    def layer_idx(self) -> int:
        return self.module.layer_idx

    @property
    def groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.query.shape[1] // self.key.shape[1]

    @property
    def sliding_window(self) -> int | None:
        """The layer's window if it is a sliding-window layer (as the model passes it to attention functions),
        else None."""
        return self.kwargs.get("sliding_window")

    def query_positions(self) -> torch.Tensor:
        """Absolute positions (q,) of the queries: the ``position_ids`` the model applied RoPE with."""
        positions = self.kwargs.get("position_ids")
        if positions is None:
            raise RuntimeError(
                f"{type(self.module).__name__} does not pass position_ids to its attention function; "
                f"fidbench cannot tell the absolute positions of its queries and keys"
            )
        return positions[0].to(self.query.device)

    def query_start(self) -> int:
        """Absolute position of the first query, from what the host knows (no GPU read inside the engine).

        The engine states it in ``phase.start``; a full-attention layer's cache holds every position, so
        there it is the number of cached keys before the queries. Only a sliding-window layer called
        outside the engine falls back to reading ``position_ids``.
        """
        if self.phase is not None and self.phase.start is not None:
            return self.phase.start
        if self.sliding_window is None:
            return self.key.shape[2] - self.query.shape[2]
        return int(self.query_positions()[0])

    def key_positions(self) -> torch.Tensor:
        """Absolute positions (kv,) of ``key``/``value`` along their sequence axis.

        The cache returns a contiguous run ending at the last query: every position on full-attention
        layers, the last ``sliding_window - 1`` before the current queries on sliding ones. A method
        that physically removes cache entries must track positions itself.
        """
        end = self.query_start() + self.query.shape[2]
        return torch.arange(end - self.key.shape[2], end, device=self.query.device)

    def prompt_keys(self) -> int:
        """How many of the leading keys are prompt positions (keys run contiguously up to the last query)."""
        first = self.query_start() + self.query.shape[2] - self.key.shape[2]
        return min(max(self.phase.prompt_len - first, 0), self.key.shape[2])

    def visible(self) -> torch.Tensor:
        """Boolean (batch|1, 1, q, kv) mask of the keys each query may see, materialized from the model's mask.

        transformers hands ``None`` when the pattern is plainly causal (SDPA's ``is_causal`` fast path);
        queries are then the last ``q`` positions of the ``kv`` keys.
        """
        mask = self.attention_mask
        if mask is not None:
            if mask.dtype != torch.bool:  # an additive float mask
                mask = mask == 0
            return mask
        q, kv = self.query.shape[2], self.key.shape[2]
        rows = torch.arange(q, device=self.query.device)[:, None] + (kv - q)
        cols = torch.arange(kv, device=self.query.device)[None, :]
        return (cols <= rows)[None, None]

    def dense(self, mask: torch.Tensor | None = None, query=None, key=None, value=None) -> torch.Tensor:
        """Attention over ``key``/``value`` with ``mask`` (bool, True = attend; each None: the call's own).

        Alone, a method's dense work is SDPA (``sdpa``). In a stack it is the later members' (``then``):
        they get a call whose query, key, value and mask are these, so a selection's mask reaches the
        cache member and the cache member's keys reach the kernel member."""
        if self.then is None:
            return self.sdpa(mask, query, key, value)
        return self.then(AttentionCall(
            self.module, self.query if query is None else query, self.key if key is None else key,
            self.value if value is None else value, self.attention_mask if mask is None else mask, self.phase,
            self.kwargs))  # no memo: once() statistics were of the recorded tensors

    def sdpa(self, mask: torch.Tensor | None = None, query=None, key=None, value=None) -> torch.Tensor:
        """Run transformers' SDPA attention, with ``mask`` (bool, True = attend) instead of the model's if given.

        A long masked prefill runs in slices of ``DENSE_ROWS`` queries: SDPA turns a bool mask into a
        float copy of its own size (n × n floats per layer, 256 MB at 8,000 tokens). Query rows are
        independent, so the output is the same (bitwise, measured) as in one call.
        """
        sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        query = self.query if query is None else query
        key = self.key if key is None else key
        value = self.value if value is None else value
        mask = self.attention_mask if mask is None else mask
        rows = query.shape[2]
        if mask is None or rows <= DENSE_ROWS or mask.shape[-2] != rows:
            return sdpa(self.module, query, key, value, mask, **self.kwargs)[0]
        parts = [sdpa(self.module, query[:, :, i : i + DENSE_ROWS], key, value, mask[..., i : i + DENSE_ROWS, :],
                      **self.kwargs)[0]
                 for i in range(0, rows, DENSE_ROWS)]
        return torch.cat(parts, dim=1)  # transformers' output layout: (batch, queries, heads, dim)


_active: contextvars.ContextVar = contextvars.ContextVar("fidbench_active", default=None)


@contextlib.contextmanager
def running(method, phase: Phase):
    """Route attention calls of forwards inside this block to ``method`` in ``phase``."""
    token = _active.set((method, phase))
    try:
        yield
    finally:
        _active.reset(token)


def _fidbench_attention(module, query, key, value, attention_mask, **kwargs):
    active = _active.get()
    call = AttentionCall(module, query, key, value, attention_mask, None, kwargs)
    if active is None:
        return call.dense(), None
    method, call.phase = active
    if call.phase.rows is not None:
        return by_row(method, call), None
    out = method.attend(call)
    return (call.dense() if out is None else out), None


def by_row(method, call: AttentionCall) -> torch.Tensor:
    """A batched call answered row by row: each prompt's real queries and keys (no padding: key index j is again
    position j, queries past the row's end left out) with its own mask slice, position ids, phase and state, as
    the call that prompt makes alone. The model's dense work (projections, MLP, logits) stays batched; the
    method sees no padding, so it needs no per-row rules of its own. Padded positions' outputs are zeros: no
    real query attends to them, and they are never scored."""
    phase = call.phase
    q, n = call.query.shape[2], call.key.shape[2]
    first_key = phase.start + q - n  # padded index of key 0 (a sliding layer's cache holds only the last ones)
    out = call.query.new_zeros(call.query.shape[0], q, call.query.shape[1], call.value.shape[-1])
    for b, row in enumerate(phase.rows):
        lo = max(phase.start, row.pad)
        hi = phase.start + q if row.end is None else min(phase.start + q, row.end)
        if lo >= hi:
            continue  # the row has no real query in this forward (padding, or a finished row)
        queries = slice(lo - phase.start, hi - phase.start)
        keys = slice(max(first_key, row.pad) - first_key, hi - first_key)
        mask = call.attention_mask
        if mask is not None:
            mask = mask[b : b + 1] if mask.shape[0] > 1 else mask
            mask = mask[..., queries, keys]
        kwargs = dict(call.kwargs)
        positions = kwargs.get("position_ids")
        if positions is not None:
            kwargs["position_ids"] = (positions[b : b + 1] if positions.shape[0] > 1 else positions)[:, queries]
        alone = AttentionCall(call.module, call.query[b : b + 1, :, queries], call.key[b : b + 1, :, keys],
                              call.value[b : b + 1, :, keys], mask, Phase(phase.name, row.prompt_len, lo - row.pad),
                              kwargs)
        method.use_sample_state(row.state)
        answer = method.attend(alone)
        row.state = method.sample_state()
        out[b, queries] = (alone.dense() if answer is None else answer)[0]
    return out


def register() -> None:
    """Make ``"fidbench"`` a valid ``attn_implementation`` with SDPA's (boolean) masks."""
    if NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(NAME, _fidbench_attention)
        AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def layer_kinds(config) -> list[str]:
    """``"sliding_attention"`` or ``"full_attention"`` per layer, as the model passes ``sliding_window``
    to attention functions: from ``layer_types`` (Gemma 3, Qwen2/3), else every layer slides when the
    config has a ``sliding_window`` (Mistral, Phi-3)."""
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return [kind] * config.num_hidden_layers


@contextlib.contextmanager
def installed(model, method: str = "an attention method"):
    """Switch ``model`` to the fidbench attention function for the duration of the block.

    Models whose attention does not go through transformers' registry cannot run ``method``: that
    is an error naming both, never a silent run of the unchanged model.
    """
    register()
    family = model.config.model_type
    previous = model.config._attn_implementation
    if previous not in ("sdpa", NAME):
        raise ValueError(
            f"method {method!r} on {family}: fidbench attention hooks delegate dense work to SDPA, but this "
            f"model was loaded with attn_implementation={previous!r}; load it with 'sdpa'"
        )
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:  # transformers only logs a warning for such models
        raise ValueError(
            f"method {method!r} cannot run on {family} ({type(model).__name__}): its attention does not "
            f"use transformers' AttentionInterface, so fidbench's hook would never be called"
        )
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
