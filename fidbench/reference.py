"""The reference store: the base model's greedy continuations and what KL needs, generated here and
cached on disk.

One safetensors file per sample, keyed by the model's fingerprint, the prompt's tokens, the
generation settings and the library versions, so a second run generates nothing. Files are
written atomically under a per-sample lock: xdist workers share the store, and an interrupted
run loses at most the sample in progress.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from . import engine
from .datasets import Prompt
from .methods import build
from .metrics import rest_logp

FORMAT = 2
TOP_K = 32  # base log-probabilities kept per position for KL (the rest of the vocabulary is one bucket)


@dataclass
class Reference:
    p_ids: list[int]
    g_ids: list[int]
    top_idx: torch.Tensor  # (N, TOP_K) int64: the base's most likely tokens at each position
    top_logp: torch.Tensor  # (N, TOP_K) float32: their log-probabilities
    gold_logp: torch.Tensor  # (N,) float32: base log-probability of each reference token
    rest_logp: torch.Tensor  # (N,) float32: log of the base's mass outside its top-K (-inf if none)

    @classmethod
    def from_logits(cls, p_ids, g_ids, logits: torch.Tensor) -> "Reference":
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


@torch.inference_mode()
def greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int]) -> list[tuple[list[int], torch.Tensor]]:
    """``greedy`` for several prompts in one batch: left padding, an attention mask, position ids from the mask.

    Padded positions are masked out, so the result is ``greedy``'s up to fp32 summation order (the
    batch changes matmul shapes and the attention kernel): a near-tie can flip. Each sample stops at
    its own end-of-sequence token; finished samples ride along until the last one stops.
    """
    if len(prompts) == 1:
        return [greedy(model, prompts[0], max_new_tokens, eos_ids)]
    device = engine.input_device(model)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = engine.call_model(model, None, input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1)
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
        logits, cache = engine.call_model(model, cache, input_ids=torch.tensor(step, device=device)[:, None],
                              attention_mask=mask, position_ids=positions)
    return [(t, torch.stack(r)) for t, r in zip(tokens, rows)]


@torch.inference_mode()
def base_logits(model, p_ids: list[int], g_ids: list[int]) -> torch.Tensor:
    """The base model's stepwise logits over a given reference (for imported references)."""
    return engine.teacher_force(model, build("origin", {}), p_ids, g_ids, "stepwise").logits


class Store:
    def __init__(self, root: Path, model_name: str, fingerprint: str, max_new_tokens: int, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"reference batch size must be >= 1, got {batch_size}")
        self.dir = Path(root) / "references" / f"{model_name}-{fingerprint[:16]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.settings = {
            "format": FORMAT,
            "model": fingerprint,
            "max_new_tokens": max_new_tokens,
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

    def _read(self, path: Path) -> Reference:
        t = load_file(str(path))
        return Reference(t["p_ids"].tolist(), t["g_ids"].tolist(), t["top_idx"].long(), t["top_logp"],
                         t["gold_logp"], t["rest_logp"])

    def _write(self, path: Path, ref: Reference) -> None:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tensors = {
            "p_ids": torch.tensor(ref.p_ids), "g_ids": torch.tensor(ref.g_ids),
            "top_idx": ref.top_idx.int().contiguous(), "top_logp": ref.top_logp.contiguous(),
            "gold_logp": ref.gold_logp.contiguous(), "rest_logp": ref.rest_logp.contiguous(),
        }
        save_file(tensors, str(tmp), metadata={"settings": json.dumps(self.settings)})
        os.replace(tmp, path)

    def _make(self, model, prompt: Prompt, eos_ids: set[int]) -> Reference:
        if prompt.g_ids is None:
            g_ids, logits = greedy(model, prompt.p_ids, self.settings["max_new_tokens"], eos_ids)
        else:
            g_ids, logits = prompt.g_ids, base_logits(model, prompt.p_ids, prompt.g_ids)
        self.generated += 1
        return Reference.from_logits(prompt.p_ids, g_ids, logits)

    def _make_batch(self, model, prompts: list[Prompt], eos_ids: set[int]) -> list[Reference]:
        """Generate several references at once (imported references are scored one by one)."""
        if len(prompts) == 1 or any(p.g_ids is not None for p in prompts):
            return [self._make(model, p, eos_ids) for p in prompts]
        out = greedy_batch(model, [p.p_ids for p in prompts], self.settings["max_new_tokens"], eos_ids)
        self.generated += len(prompts)
        return [Reference.from_logits(p.p_ids, g_ids, logits) for p, (g_ids, logits) in zip(prompts, out)]

    def get(self, model, prompts: list[Prompt], eos_ids: set[int], progress: bool = True) -> list[Reference]:
        """References for ``prompts``, generating the missing ones, ``batch_size`` at a time.

        A sample another worker is generating is skipped and revisited, so workers split the work
        instead of queueing on the same lock. Batches hold prompts of similar lengths (least padding).
        """
        refs: dict[int, Reference] = {}
        pending = list(range(len(prompts)))
        if self.batch_size > 1:
            pending.sort(key=lambda i: len(prompts[i].p_ids))
        bar = tqdm(total=len(prompts), desc="base references", disable=not progress, leave=False, file=sys.__stderr__)
        timeout = 0  # the first pass skips busy samples; later passes wait for them
        while pending:
            waiting, batch = [], []  # batch: (index, path, held lock) of samples to generate
            try:
                for i in pending:
                    path = self.path(prompts[i])
                    if not path.exists():
                        lock = FileLock(str(path) + ".lock")
                        try:
                            lock.acquire(timeout=timeout)
                        except Timeout:
                            waiting.append(i)
                            continue
                        if not path.exists():
                            batch.append((i, path, lock))
                            if len(batch) == self.batch_size:
                                self._flush(model, prompts, batch, eos_ids, refs, bar)
                            continue
                        lock.release()  # another worker wrote it while we waited
                    refs[i] = self._read(path)
                    bar.update(1)
                self._flush(model, prompts, batch, eos_ids, refs, bar)
            finally:
                for _, _, lock in batch:  # an interrupted batch: release what we hold, write nothing partial
                    lock.release()
            pending, timeout = waiting, -1
        bar.close()
        return [refs[i] for i in range(len(prompts))]

    def _flush(self, model, prompts, batch, eos_ids, refs, bar) -> None:
        """Generate, write and release the samples held in ``batch`` (emptied in place)."""
        if not batch:
            return
        made = self._make_batch(model, [prompts[i] for i, _, _ in batch], eos_ids)
        while batch:
            (i, path, lock), ref = batch.pop(0), made.pop(0)
            try:
                self._write(path, ref)
            finally:
                lock.release()
            refs[i] = self._read(path)
            bar.update(1)
