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


def _sync(device: torch.device) -> None:
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
    _sync(device)


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
    _sync(device)


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
        _sync(self.device)
        t0 = time.perf_counter()
        _, self.cache = prefill(self.model, self.method, self.prompt, self.recorded)
        _sync(self.device)
        return time.perf_counter() - t0

    @grad_off
    def step(self) -> None:
        t = self.t
        with attention.running(self.method, attention.Phase("decode", self.p, self.p + t)):
            _, self.cache = forward(self.model, self.ref[:, t : t + 1], self.cache)
        _sync(self.device)
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
