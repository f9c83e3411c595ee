"""The reference store: the base model's greedy continuations and what KL needs, generated here and
cached on disk.

One safetensors file per sample, keyed by everything that changes the base's greedy tokens or
logits: the model's fingerprint (weights and dtype), the prompt's tokens, the generation settings
(length, end-of-sequence ids, batch size), the device and the library versions, so a second run
generates nothing. Each file carries its settings and a checksum of its content; every read checks
both and the prompt, and a bad file is moved aside (``<name>.bad-<time>``), named in a warning and
regenerated, never used. Files are written atomically under a per-sample lock that names its holder
(``fidbench.lock``: ``FIDBENCH_LOCK`` selects flock or lock files for network filesystems): xdist
workers and shards share the store, an interrupted run loses at most the sample in progress, and a run
waiting on a lock says who holds it (``FIDBENCH_LOCK_TIMEOUT`` seconds bound the wait).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from . import engine, lock
from .datasets import Prompt
from .methods import build
from .metrics import rest_logp

FORMAT = 3  # 3: end-of-sequence ids and device in the key, a checksum in every file
# Prompts per batch where generated data need not match unbatched greedy to the last bit (calibration
# continuations, Medusa's training data): batches are about 5x faster on a CPU (left padding: greedy_batch).
GENERATE_BATCH = 16
TOP_K = 32  # base log-probabilities kept per position for KL (the rest of the vocabulary is one bucket)
TENSORS = ("p_ids", "g_ids", "top_idx", "top_logp", "gold_logp", "rest_logp")


class ReferenceWarning(UserWarning):
    """A cached reference was bad: moved aside and regenerated."""


class BadReference(ValueError):
    """A cached reference file that does not verify: unreadable, another key's, or altered."""


@dataclass
class Reference:
    p_ids: list[int]
    g_ids: list[int]
    top_idx: torch.Tensor  # (N, TOP_K) int64: the base's most likely tokens at each position
    top_logp: torch.Tensor  # (N, TOP_K) float32: their log-probabilities
    gold_logp: torch.Tensor  # (N,) float32: base log-probability of each reference token
    rest_logp: torch.Tensor  # (N,) float32: log of the base's mass outside its top-K (-inf if none)

    @classmethod
    def from_logits(cls, p_ids, g_ids, logits: torch.Tensor) -> Reference:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = logp.topk(TOP_K, dim=-1)
        gold = logp.gather(1, torch.tensor(g_ids, device=logp.device)[:, None])[:, 0]
        rest = rest_logp(logp, top.indices)
        return cls(list(p_ids), list(g_ids), top.indices.cpu(), top.values.cpu(), gold.cpu(), rest.cpu())


def eos_ids(model, tokenizer) -> set[int]:
    """Tokens that end a greedy reference: the generation config's and the tokenizer's end of sequence."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def greedy(model, p_ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> tuple[list[int], torch.Tensor]:
    """The base model's greedy continuation of ``p_ids`` and its (N, V) float32 logits, step by step.

    Stops after an end-of-sequence token (kept as the last reference token) or ``max_new_tokens``.
    """
    if max_new_tokens < 1:  # the loop below would never end
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = engine.input_device(model)
    logits, cache = engine.forward(model, torch.tensor([p_ids], device=device), last_only=True)
    tokens, rows = [], []
    while True:
        row = logits[-1]
        token = int(row.argmax())
        tokens.append(token)
        rows.append(row)
        if token in eos_ids or len(tokens) == max_new_tokens:
            break
        logits, cache = engine.forward(model, torch.tensor([[token]], device=device), cache)
    return tokens, torch.stack(rows)


def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int,
                 eos_ids: set[int]) -> list[tuple[list[int], torch.Tensor]]:
    """``greedy`` for several prompts in one batch (``engine.greedy_batch``: left padding, each sample stopping
    at its own end-of-sequence token). Padded positions are masked out, so the result is ``greedy``'s up to
    fp32 summation order (the batch changes matmul shapes and the attention kernel): a near-tie can flip."""
    if len(prompts) == 1 or max_new_tokens < 1:
        return [greedy(model, p, max_new_tokens, eos_ids) for p in prompts]
    return engine.greedy_batch(model, build("origin", {}), prompts, [max_new_tokens] * len(prompts), eos_ids)[0]


@torch.inference_mode()
def base_logits(model, p_ids: list[int], g_ids: list[int]) -> torch.Tensor:
    """The base model's stepwise logits over a given reference (for imported references)."""
    return engine.teacher_force(model, build("origin", {}), p_ids, g_ids, "stepwise").logits


def _checksum(settings: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(settings.encode())
    for name in TENSORS:
        t = tensors[name].contiguous()
        h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class Store:
    def __init__(self, root: Path, model_name: str, fingerprint: str, max_new_tokens: int, batch_size: int = 1,
                 eos_ids=(), device: str = "cpu"):
        if batch_size < 1:
            raise ValueError(f"reference batch size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.dir = Path(root) / "references" / f"{model_name}-{fingerprint[:16]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.eos_ids = set(eos_ids)
        self.settings = {
            "format": FORMAT,
            "model": fingerprint,  # weights and dtype
            "max_new_tokens": max_new_tokens,
            "eos_ids": sorted(self.eos_ids),  # where a reference stops
            "device": device,  # device types and GPU names: other kernels round differently
            "greedy": True,
            "top_k": TOP_K,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        # Batched generation equals batch size 1 only up to fp32 summation order (a near-tie can flip),
        # so its references are kept apart: batch-1 references stay exactly what a stepwise origin computes.
        if batch_size > 1:
            self.settings["batch_size"] = batch_size
        self.batch_size = batch_size
        self.generated = 0  # samples this process generated (0 on a fully cached run)

    def path(self, prompt: Prompt) -> Path:
        key = json.dumps({**self.settings, "p_ids": prompt.p_ids, "g_ids": prompt.g_ids}, sort_keys=True)
        return self.dir / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")

    def read(self, path: Path, prompt: Prompt) -> Reference:
        """The reference in ``path``, verified against this store's settings, ``prompt`` and the file's checksum."""
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                # copies: a tensor may map the file, which must not change what was verified once it is read
                tensors = {name: f.get_tensor(name).clone() for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise BadReference(f"unreadable: {e}") from None
        if sorted(tensors) != sorted(TENSORS) or "settings" not in meta:
            raise BadReference("not a fidbench reference file")
        if json.loads(meta["settings"]) != self.settings:
            raise BadReference("written for other settings than its key")
        if meta.get("sha256") != _checksum(meta["settings"], tensors):
            raise BadReference("its content does not match its checksum")
        ref = Reference(tensors["p_ids"].tolist(), tensors["g_ids"].tolist(), tensors["top_idx"].long(),
                        tensors["top_logp"], tensors["gold_logp"], tensors["rest_logp"])
        if ref.p_ids != prompt.p_ids or (prompt.g_ids is not None and ref.g_ids != prompt.g_ids):
            raise BadReference("it holds another prompt's reference")
        return ref

    def _cached(self, path: Path, prompt: Prompt, set_aside: bool = False) -> Reference | None:
        """The verified reference in ``path``, or None when there is none or it is bad; a bad file is moved
        aside with a warning when ``set_aside`` (only under the sample's lock: another worker may be rewriting it)."""
        if not path.exists():
            return None
        try:
            return self.read(path, prompt)
        except BadReference as e:
            if set_aside:
                bad = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
                os.replace(path, bad)
                warnings.warn(f"fidbench: bad cached reference {path} ({e}): moved to {bad.name}, regenerating it",
                              ReferenceWarning, stacklevel=2)
            return None

    def _write(self, path: Path, ref: Reference) -> None:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tensors = {
            "p_ids": torch.tensor(ref.p_ids), "g_ids": torch.tensor(ref.g_ids),
            "top_idx": ref.top_idx.int().contiguous(), "top_logp": ref.top_logp.contiguous(),
            "gold_logp": ref.gold_logp.contiguous(), "rest_logp": ref.rest_logp.contiguous(),
        }
        settings = json.dumps(self.settings, sort_keys=True)
        data = save(tensors, metadata={"settings": settings, "sha256": _checksum(settings, tensors)})
        try:  # written as any file is (umask: group- and world-readable by default), not 0600: caches are shared
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)  # a full disk keeps no half-written file
            raise OSError(f"cannot write a reference to the cache {self.dir} ({e.strerror or e}); free "
                          f"space there or set FIDBENCH_CACHE to another directory") from None

    def _make(self, model, prompt: Prompt) -> Reference:
        if prompt.g_ids is None:
            g_ids, logits = greedy(model, prompt.p_ids, self.settings["max_new_tokens"], self.eos_ids)
        else:
            g_ids, logits = prompt.g_ids, base_logits(model, prompt.p_ids, prompt.g_ids)
        self.generated += 1
        return Reference.from_logits(prompt.p_ids, g_ids, logits)

    def _make_batch(self, model, prompts: list[Prompt]) -> list[Reference]:
        """Generate several references at once (imported references are scored one by one)."""
        if len(prompts) == 1 or any(p.g_ids is not None for p in prompts):
            return [self._make(model, p) for p in prompts]
        out = greedy_batch(model, [p.p_ids for p in prompts], self.settings["max_new_tokens"], self.eos_ids)
        self.generated += len(prompts)
        return [Reference.from_logits(p.p_ids, g_ids, logits) for p, (g_ids, logits) in zip(prompts, out)]

    def get(self, model, prompts: list[Prompt], progress: Callable[[int, int], None] | None = None) -> list[Reference]:
        """References for ``prompts``, generating the missing (and bad) ones, ``batch_size`` at a time;
        ``progress(done, total)`` is called as they come.

        A sample another worker is generating is skipped and revisited, so workers split the work
        instead of queueing on the same lock. Batches hold prompts of similar lengths (least padding).
        """
        refs: dict[int, Reference] = {}
        pending = list(range(len(prompts)))
        if self.batch_size > 1:
            pending.sort(key=lambda i: len(prompts[i].p_ids))

        def done(i: int, ref: Reference) -> None:
            refs[i] = ref
            if progress:  # False or None: no progress
                progress(len(refs), len(prompts))

        first = True  # the first pass skips busy samples; later passes wait for them
        while pending:
            waiting, batch = [], []  # batch: (index, path, held lock) of samples to generate
            try:
                for i in pending:
                    path = self.path(prompts[i])
                    ref = self._cached(path, prompts[i])
                    if ref is None:
                        held = lock.new(path, "reference lock")
                        try:
                            if first:
                                held.acquire(0)
                            else:
                                held.wait()
                        except lock.Timeout:
                            waiting.append(i)
                            continue
                        ref = self._cached(path, prompts[i], set_aside=True)  # another worker may have written it
                        if ref is None:
                            batch.append((i, path, held))
                            if len(batch) == self.batch_size:
                                self._flush(model, prompts, batch, done)
                            continue
                        held.release()
                    done(i, ref)
                self._flush(model, prompts, batch, done)
            finally:
                for _, _, held in batch:  # an interrupted batch: release what we hold, write nothing partial
                    held.release()
            pending, first = waiting, False
        return [refs[i] for i in range(len(prompts))]

    def _flush(self, model, prompts, batch, done) -> None:
        """Generate, write and release the samples held in ``batch`` (emptied in place)."""
        if not batch:
            return
        made = self._make_batch(model, [prompts[i] for i, _, _ in batch])
        while batch:
            (i, path, held), ref = batch.pop(0), made.pop(0)
            try:
                self._write(path, ref)
            finally:
                held.release()
            done(i, self.read(path, prompts[i]))  # what later runs will read, verified
