"""Prefill through a method, then teacher-force the reference: in one forward or token by token; or let
the method generate on its own (``free_run``).

Logits for the N reference tokens: the first comes from the prefill's last position, the other
N-1 from feeding reference tokens 0..N-2 after the prompt.

The host never waits for a GPU inside a sample: phases are timed with CUDA events read after the
sample, so the host queues the decode while the GPU still runs the prefill (benchmarks/LOG.md).
Stepper, timed from the host by pytest-benchmark, is the exception: it waits for the device after each step.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass

import torch

from . import attention

MODES = ("auto", "parallel", "stepwise")
WARM_UP_TOKENS = 64  # prompt length of the untimed warm-up forward (see warm_up)


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


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a GPU); for a timer that reads the host clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


class Clock:
    """Marks between the phases of a sample, on the timeline of the device that runs them.

    On a GPU a mark is a CUDA event recorded on the input device's stream: the host does not wait,
    and the seconds are read once, after the sample (work on other GPUs of a spread model reaches
    that stream through the copies that bring its results back). Elsewhere a mark is the host clock.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds between consecutive marks (waits for the last one on a GPU)."""
        if self.device.type == "cuda":
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class Forced:
    """A sample's teacher-forced logits and the time of its phases (read on first use)."""

    def __init__(self, logits: torch.Tensor, clock: Clock):
        self.logits = logits  # (N, V) float32: row t predicts reference token t
        self._clock = clock
        self._seconds: list[float] | None = None

    def _phases(self) -> list[float]:
        if self._seconds is None:
            self._seconds = self._clock.seconds()
        return self._seconds

    @property
    def prefill_s(self) -> float:
        return self._phases()[0]

    @property
    def decode_s(self) -> float:
        return self._phases()[1]


def grad_off(fn):
    """Run ``fn`` in inference mode, or under plain no_grad when its method (argument ``method``, or ``self.method``)
    cannot compute on inference tensors (``Method.inference_mode`` False: optimum-quanto's quantized linears)."""
    names = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = {**dict(zip(names, args)), **kwargs}
        method = bound["method"] if "method" in bound else bound["self"].method
        with torch.inference_mode() if method.inference_mode else torch.no_grad():
            return fn(*args, **kwargs)

    return run


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


def prefill(model, method, prompt: torch.Tensor, recorded=None):
    """The prompt's last logits and cache under ``method``: a live forward, or the replay of ``recorded``, the
    base model's prefill of the same prompt (``fidbench.prefill``, for a method with ``base_prefill``)."""
    if recorded is not None:
        return recorded.replay(model, method)
    with attention.running(method, attention.Phase("prefill", prompt.shape[1], 0)):
        return forward(model, prompt, method.new_cache(model), last_only=True)


@grad_off
def teacher_force(model, method, p_ids: list[int], g_ids: list[int], mode: str, recorded=None) -> Forced:
    """Score positions of ``g_ids`` after ``p_ids`` under ``method`` (already applied to ``model``), prefilled
    live or from ``recorded`` (then ``prefill_s`` is the method's own work on the recorded calls)."""
    device = input_device(model)
    prompt = torch.tensor([p_ids], device=device)
    ref = torch.tensor([g_ids], device=device)
    method.begin(len(p_ids))
    clock = Clock(device)
    clock.mark()
    first, cache = prefill(model, method, prompt, recorded)
    clock.mark()
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
    clock.mark()
    return Forced(torch.cat(rows), clock)


def left_padded(prompts: list[list[int]], device: torch.device):
    """Prompts as one left-padded batch: ids, attention mask (0 on padding) and position ids counted from each
    prompt's first token, so every row sees the positions, keys and RoPE angles it has alone. Prompts of one
    length need no mask: None keeps the model on its causal fast path (on a CPU, SDPA's flash kernel instead of
    the masked one, which the long prompts of a batch pay most for)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    if all(len(p) == width for p in prompts):
        return ids, None, torch.arange(width, device=device).expand(len(prompts), width)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


PAD_SLACK = 0.25  # a batch's prompts differ in length by at most this share of the shortest (+ PAD_TOKENS)
PAD_TOKENS = 16


def batches(lengths: list[int], size: int) -> list[list[int]]:
    """Indices of prompts of ``lengths`` in batches of at most ``size``, shortest first; a batch closes early where
    the next prompt would be longer than its shortest by more than ``PAD_SLACK`` (+ ``PAD_TOKENS``): every row is
    padded to the longest, and padding is work done for nothing (a 2,600-token prompt among 60-token ones made
    a batch of 4 cost 2.6x the four prompts alone, measured in benchmarks/LOG.md)."""
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if out and len(out[-1]) < size and lengths[i] <= lengths[out[-1][0]] * (1 + PAD_SLACK) + PAD_TOKENS:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def check_batches(method) -> None:
    if not method.batches:
        raise ValueError(f"method {method.name!r} (kind {method.kind!r}) scores one prompt per forward: it keeps "
                         f"per-prompt state that a batch cannot hold per row (Method.batches says which methods can)")


def _rows(method, prompts: list[list[int]], ends: list[int | None], width: int) -> list[attention.Row]:
    """A batch's rows (``attention.Row``), each with the state ``method.begin`` leaves for its prompt; ``begin``
    also adds each prompt to the method's totals, once, as at batch 1."""
    rows = []
    for p, end in zip(prompts, ends):
        method.begin(len(p))
        rows.append(attention.Row(len(p), width - len(p), end, method.sample_state()))
    return rows


@grad_off
def teacher_force_batch(model, method, samples: list[tuple[list[int], list[int]]], mode: str):
    """``teacher_force`` for B samples ``(p_ids, g_ids)`` in one prefill and one decode forward (stepwise: one per
    reference position), for a method that batches (``Method.batches``). Prompts are left-padded, references
    right-padded; padding is masked and never scored, so each sample's logits are its batch-1 logits up to
    fp32 summation order. Returns each sample's (N_b, V) float32 logits and the batch's ``Clock``."""
    check_batches(method)
    device = input_device(model)
    ids, mask, positions = left_padded([p for p, _ in samples], device)
    width = ids.shape[1]
    rows = _rows(method, [p for p, _ in samples], [width + len(g) - 1 for _, g in samples], width)
    clock = Clock(device)
    clock.mark()
    with attention.running(method, attention.Phase("prefill", width, 0, rows)):
        first, cache = call_model(model, method.new_cache(model), input_ids=ids, attention_mask=mask,
                                  position_ids=positions, logits_to_keep=1)
    clock.mark()
    outs = [first[:, -1:].float()]
    n = max(len(g) for _, g in samples) - 1  # reference tokens fed after the prompt
    if n > 0:
        ref = torch.tensor([g[:-1] + [0] * (n + 1 - len(g)) for _, g in samples], device=device)
        if mask is not None or any(len(g) - 1 < n for _, g in samples):
            rights = torch.tensor([[1] * (len(g) - 1) + [0] * (n + 1 - len(g)) for _, g in samples], device=device)
            mask = torch.cat([torch.ones_like(ids) if mask is None else mask, rights], dim=1)
        positions = torch.tensor([[len(p) + t for t in range(n)] for p, _ in samples], device=device)
        steps = [slice(0, n)] if mode == "parallel" else [slice(t, t + 1) for t in range(n)]
        for step in steps:
            seen = None if mask is None else mask[:, : width + step.stop]
            with attention.running(method, attention.Phase("decode", width, width + step.start, rows)):
                logits, cache = call_model(model, cache, input_ids=ref[:, step], attention_mask=seen,
                                           position_ids=positions[:, step])
            outs.append(logits.float())
    clock.mark()
    out = torch.cat(outs, dim=1)
    return [out[b, : len(g)] for b, (_, g) in enumerate(samples)], clock


@grad_off
def greedy_batch(model, method, prompts: list[list[int]], lengths: list[int], eos_ids: set[int]):
    """The greedy continuations of B prompts in one batch under ``method`` (one that batches; ``origin`` for the
    base model): left padding, each row stopping at its own end-of-sequence token (kept) or its length in
    ``lengths``; finished rows ride along until the last one stops. Equal to one prompt at a time up to fp32
    summation order (a near-tie can flip). Returns each row's (tokens, (n, V) float32 logits) and the ``Clock``
    (prefill, decode)."""
    check_batches(method)
    if min(lengths) < 1:
        raise ValueError(f"greedy_batch: lengths must be >= 1, got {lengths}")
    device = input_device(model)
    ids, mask, positions = left_padded(prompts, device)
    width = ids.shape[1]
    rows = _rows(method, prompts, [None] * len(prompts), width)
    clock = Clock(device)
    clock.mark()
    with attention.running(method, attention.Phase("prefill", width, 0, rows)):
        logits, cache = call_model(model, method.new_cache(model), input_ids=ids, attention_mask=mask,
                                   position_ids=positions, logits_to_keep=1)
    clock.mark()
    tokens: list[list[int]] = [[] for _ in prompts]
    picked: list[list[torch.Tensor]] = [[] for _ in prompts]  # each row's logits, one per token
    done = [False] * len(prompts)
    for fed in range(width, width + max(lengths)):  # the padded index the next step's tokens take
        last = logits[:, -1].float()
        step = last.argmax(-1).tolist()  # one read per step for the whole batch
        for b, token in enumerate(step):
            if not done[b]:
                tokens[b].append(token)
                picked[b].append(last[b])
                done[b] = token in eos_ids or len(tokens[b]) == lengths[b]
                if done[b]:
                    rows[b].end = fed  # its last token is not fed: a method's hook sees the row no further
        if all(done):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1
        with attention.running(method, attention.Phase("decode", width, fed, rows)):
            logits, cache = call_model(model, cache, input_ids=torch.tensor(step, device=device)[:, None],
                                       attention_mask=mask, position_ids=positions)
    clock.mark()
    return [(t, torch.stack(r)) for t, r in zip(tokens, picked)], clock


@torch.inference_mode()
def warm_up(model) -> None:
    """Untimed forwards that pay a model's one-time costs before anything is timed: on a GPU the CUDA
    context, cuBLAS handles and kernels loaded on first use; a prefill, a parallel decode and a step."""
    device = input_device(model)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.arange(WARM_UP_TOKENS + 5, device=device)[None] % vocab
    _, cache = forward(model, ids[:, :WARM_UP_TOKENS], last_only=True)
    _, cache = forward(model, ids[:, WARM_UP_TOKENS : WARM_UP_TOKENS + 4], cache)
    forward(model, ids[:, -1:], cache)
    sync(device)


def plans_per_shape(device: torch.device) -> bool:
    """Whether the first forward of each new sequence length pays one-time costs on ``device``: on a GPU,
    SDPA on cuDNN builds an execution plan per shape (measured on the H200, benchmarks/LOG.md: the first
    case of a fresh process took 2.7x its second, with the 64-token warm-up alone). On a CPU the first
    case costs what the second does (0.97-1.01x), so nothing is warmed per shape there."""
    return device.type == "cuda"


@torch.inference_mode()
def warm_up_shapes(model, samples) -> None:
    """One untimed prefill and parallel decode per distinct (prompt, reference) length of ``samples``
    (objects with ``p_ids`` and ``g_ids``): the shapes every case of the model then meets, paid before
    the first of them is timed. The cost is one origin pass over the prompts, once per loaded model."""
    device = input_device(model)
    one_per_shape = {(len(s.p_ids), len(s.g_ids)): s for s in samples}
    for (p, n), sample in one_per_shape.items():
        ids = torch.tensor([sample.p_ids + sample.g_ids[:-1]], device=device)
        _, cache = forward(model, ids[:, :p], last_only=True)
        if n > 1:
            forward(model, ids[:, p:], cache)
    sync(device)


class Stepper:
    """Decoding as a deployment does it, one token per forward, over a fixed prompt and its reference: for
    timing. ``prefill()`` starts over (and says how long the prefill took: live, or the replay of
    ``recorded``); each ``step()`` feeds the next reference token. Both wait for the device, so a timer
    around them sees the work done."""

    def __init__(self, model, method, p_ids: list[int], g_ids: list[int], recorded=None):
        self.model, self.method, self.p, self.recorded = model, method, len(p_ids), recorded
        self.device = input_device(model)
        self.prompt = torch.tensor([p_ids], device=self.device)
        self.ref = torch.tensor([g_ids], device=self.device)
        self.cache, self.t = None, 0

    @grad_off
    def prefill(self) -> float:
        self.method.begin(self.p)
        self.cache, self.t = None, 0  # free the last round's cache before the next
        sync(self.device)
        t0 = time.perf_counter()
        _, self.cache = prefill(self.model, self.method, self.prompt, self.recorded)
        sync(self.device)
        return time.perf_counter() - t0

    @grad_off
    def step(self) -> None:
        t = self.t
        with attention.running(self.method, attention.Phase("decode", self.p, self.p + t)):
            _, self.cache = forward(self.model, self.ref[:, t : t + 1], self.cache)
        sync(self.device)
        self.t += 1


@dataclass
class Generated:
    ids: list[int]  # the method's greedy continuation, at most the requested length
    non_finite: int  # steps whose logits held a NaN or inf (their argmax means nothing)
    prefill_s: float
    decode_s: float


@grad_off
def free_run(model, method, p_ids: list[int], n: int, eos_ids: set[int], recorded=None) -> Generated:
    """The greedy continuation of ``p_ids`` under ``method`` (already applied to ``model``), prefilled live or
    from ``recorded``: each token it picks is fed back, through the same hooks and phases as stepwise teacher
    forcing, until an end-of-sequence token (kept) or ``n`` tokens, the rules the base's reference was
    generated by. Unlike teacher forcing the host waits for every step: the next input is the argmax it reads."""
    if n < 1:
        raise ValueError(f"free_run: n must be >= 1, got {n}")
    device = input_device(model)
    method.begin(len(p_ids))
    p = len(p_ids)
    clock = Clock(device)
    clock.mark()
    logits, cache = prefill(model, method, torch.tensor([p_ids], device=device), recorded)
    clock.mark()
    ids, bad = [], torch.zeros((), dtype=torch.long, device=logits.device)
    while True:
        bad += (~torch.isfinite(logits[-1])).any()  # read once, at the end
        token = int(logits[-1].argmax())  # the base's choice rule (fidbench.reference.greedy); one read per token
        ids.append(token)
        if token in eos_ids or len(ids) == n:
            break
        with attention.running(method, attention.Phase("decode", p, p + len(ids) - 1)):
            logits, cache = forward(model, torch.tensor([[token]], device=device), cache)
    clock.mark()
    prefill_s, decode_s = clock.seconds()
    return Generated(ids, int(bad), prefill_s, decode_s)
