"""The reference store: the base model's greedy continuations and what KL needs, cached on disk.

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
from .metrics import rest_logp
from .datasets import Prompt

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



class Store:
    def __init__(self, root: Path, model_name: str, fingerprint: str, max_new_tokens: int):
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
            g_ids, logits = engine.greedy(model, prompt.p_ids, self.settings["max_new_tokens"], eos_ids)
        else:
            g_ids, logits = prompt.g_ids, engine.base_logits(model, prompt.p_ids, prompt.g_ids)
        self.generated += 1
        return Reference.from_logits(prompt.p_ids, g_ids, logits)

    def get(self, model, prompts: list[Prompt], eos_ids: set[int], progress: bool = True) -> list[Reference]:
        """References for ``prompts``, generating the missing ones.

        A sample another worker is generating is skipped and revisited, so workers split the work
        instead of queueing on the same lock.
        """
        refs: dict[int, Reference] = {}
        pending = list(range(len(prompts)))
        bar = tqdm(total=len(prompts), desc="base references", disable=not progress, leave=False, file=sys.__stderr__)
        timeout = 0  # the first pass skips busy samples; later passes wait for them
        while pending:
            waiting = []
            for i in pending:
                path = self.path(prompts[i])
                if not path.exists():
                    try:
                        with FileLock(str(path) + ".lock", timeout=timeout):
                            if not path.exists():
                                self._write(path, self._make(model, prompts[i], eos_ids))
                    except Timeout:
                        waiting.append(i)
                        continue
                refs[i] = self._read(path)
                bar.update(1)
            pending, timeout = waiting, -1
        bar.close()
        return [refs[i] for i in range(len(prompts))]
