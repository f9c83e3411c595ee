"""``fidbench train-medusa``: Medusa heads for a model, fitted on its own greedy outputs, in Medusa's format.

Medusa-1's recipe (FasterDecoding/Medusa ``medusa/train/train_legacy.py``, README "Training (legacy)") at a
CPU's scale:
- data: self-distillation, as Medusa's ``create_data.py`` regenerates the assistant turns with the model
  itself: the base's greedy continuations (``max_new_tokens``) of prompts written for training
  (``data/train.jsonl``, never a scored dataset), rendered with the model's chat template;
- the base frozen; heads of ``layers`` ResBlocks on its last hidden state that share its lm_head (v2: what
  ``train_legacy.py`` trains and the original fidbench ran); ResBlock weights zero, biases PyTorch's default
  initialisation, as Medusa's ``ResBlock``;
- loss: the sum over heads of the mean cross-entropy of head i at position t against token t+2+i
  (``CustomizedTrainer.compute_loss``), counting only targets that are generated tokens (what Medusa's
  ``preprocess`` means to mask: only the assistant's tokens are targets);
- AdamW, lr 1e-3, no weight decay, linear warm-up over the first 10 % of the steps, then cosine decay.
Differences: greedy continuations (Medusa's data generation samples at temperature 0.3); ``steps`` minibatches
of ``batch`` positions drawn from hidden states computed once (the base is frozen, so they never change)
instead of epochs over padded conversations; heads trained in fp32; one process.

Saved: ``medusa_lm_head.safetensors`` and Medusa's ``config.json`` (``medusa_num_heads``,
``medusa_num_layers``, ``base_model_name_or_path``, ``version`` "2"), plus a ``fidbench`` entry: the settings,
the data file's sha256, the base model's fingerprint and each head's training loss over the last steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file

from . import datasets, models, reference
from .methods._medusa_heads import FILES, Heads, decoder
from .suite import DatasetSpec

DATA = Path(__file__).resolve().parents[1] / "data" / "train.jsonl"
IGNORE = -100  # a position whose target is not a generated token


@dataclass(frozen=True)
class Settings:
    heads: int = 3
    layers: int = 1
    steps: int = 600  # where held-out accuracy flattens on the default model (docs/methods.md, Medusa heads)
    batch: int = 64
    lr: float = 1e-3
    seed: int = 0
    max_new_tokens: int = 64
    data: str = str(DATA)

    def check(self) -> None:
        for name in ("heads", "layers", "steps", "batch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"train-medusa: {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train-medusa: lr must be > 0, got {self.lr}")
        if not Path(self.data).is_file():
            raise ValueError(f"train-medusa: training prompts {self.data} not found (give --data)")


def _log(message: str) -> None:
    print(f"train-medusa: {message}", file=sys.__stderr__, flush=True)  # pytest captures sys.stderr


def distill(model, tokenizer, settings: Settings) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the base's greedy continuation) for every training prompt."""
    spec = DatasetSpec("medusa-train", Path(settings.data), "conversations")
    prompts = [p.p_ids for p in datasets.load(spec, tokenizer, vocab_size=model.get_input_embeddings().num_embeddings)]
    eos = reference.eos_ids(model, tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: least padding
    out: dict[int, list[int]] = {}
    for start in range(0, len(order), reference.GENERATE_BATCH):
        batch = order[start : start + reference.GENERATE_BATCH]
        made = reference.greedy_batch(model, [prompts[i] for i in batch], settings.max_new_tokens, eos)
        out.update((i, g_ids) for i, (g_ids, _) in zip(batch, made))
        _log(f"generated {len(out)}/{len(prompts)} continuations")
    return [(prompts[i], out[i]) for i in range(len(prompts))]


@torch.inference_mode()
def examples(model, seqs, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states (positions, H) in fp32 and head targets (positions, heads): token t+2+i when it is a
    generated token, else IGNORE; only positions where some head has a target."""
    device = model.get_input_embeddings().weight.device
    xs, ys = [], []
    for p_ids, g_ids in seqs:
        ids = p_ids + g_ids
        hidden = decoder(model)(input_ids=torch.tensor([ids], device=device)).last_hidden_state[0].float()
        targets = torch.full((len(ids), n_heads), IGNORE)
        for i in range(n_heads):
            for t in range(max(len(p_ids) - 2 - i, 0), len(ids) - 2 - i):
                targets[t, i] = ids[t + 2 + i]
        keep = (targets != IGNORE).any(-1)
        xs.append(hidden[keep.to(hidden.device)].cpu())
        ys.append(targets[keep])
    return torch.cat(xs), torch.cat(ys)


def train(model, tokenizer, settings: Settings) -> tuple[Heads, list[float], list[float]]:
    """Heads fitted to the model's own greedy outputs; with each head's mean loss over the first and the last
    10 % of the steps."""
    settings.check()
    t0 = time.perf_counter()
    seqs = distill(model, tokenizer, settings)
    x, y = examples(model, seqs, settings.heads)
    _log(f"{len(x)} training positions from {len(seqs)} prompts ({time.perf_counter() - t0:.0f} s)")
    return fit(model, x, y, settings)


def fit(model, x: torch.Tensor, y: torch.Tensor, settings: Settings) -> tuple[Heads, list[float], list[float]]:
    """Heads trained on hidden states ``x`` and targets ``y`` (from ``examples``) by the recipe above."""
    t0 = time.perf_counter()
    lm_head = model.get_output_embeddings()
    device = lm_head.weight.device
    weight = lm_head.weight.detach().float()
    bias = None if getattr(lm_head, "bias", None) is None else lm_head.bias.detach().float()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        heads = Heads(settings.heads, settings.layers, weight.shape[1]).to(device)
        for block in heads.modules():
            if hasattr(block, "linear"):
                torch.nn.init.zeros_(block.linear.weight)  # Medusa's ResBlock: zero weight, default bias
    optimizer = torch.optim.AdamW(heads.parameters(), lr=settings.lr, weight_decay=0.0)
    warmup = max(1, settings.steps // 10)
    decay = max(1, settings.steps - warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / decay)))
    generator = torch.Generator().manual_seed(settings.seed)
    order, pos = torch.randperm(len(x), generator=generator), 0
    history = []
    for step in range(settings.steps):
        if pos + settings.batch > len(order):  # a new epoch
            order, pos = torch.randperm(len(x), generator=generator), 0
        idx = order[pos : pos + settings.batch]
        pos += settings.batch
        logits = torch.nn.functional.linear(heads(x[idx].to(device)), weight, bias)  # (heads, batch, vocab)
        target = y[idx].T.to(device)
        losses = [torch.nn.functional.cross_entropy(logits[i], target[i], ignore_index=IGNORE)
                  if (target[i] != IGNORE).any() else logits[i].sum() * 0 for i in range(settings.heads)]
        loss = sum(losses)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append([v.item() for v in losses])
        if (step + 1) % max(1, settings.steps // 10) == 0:
            _log(f"step {step + 1}/{settings.steps}: loss {sum(history[-1]):.3f} ({time.perf_counter() - t0:.0f} s)")
    tenth = max(1, settings.steps // 10)
    first = [sum(h[i] for h in history[:tenth]) / tenth for i in range(settings.heads)]
    last = [sum(h[i] for h in history[-tenth:]) / tenth for i in range(settings.heads)]
    return heads.cpu(), first, last


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save(heads: Heads, out: Path, settings: Settings, base: str, fingerprint: str, first, last) -> None:
    """Write Medusa's v2 files into the directory ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in heads.state_dict_medusa().items()}
    save_file(state, str(out / FILES[0]))
    config = {
        "medusa_num_heads": settings.heads, "medusa_num_layers": settings.layers,
        "base_model_name_or_path": base, "version": "2",
        "fidbench": {"settings": dataclasses.asdict(settings), "data_sha256": _sha256(Path(settings.data)),
                     "base_fingerprint": fingerprint, "loss_first_steps": first, "loss_last_steps": last},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))


def cached_heads(context, n_heads: int) -> Path:
    """The heads ``medusa`` uses with ``path: auto``: trained on first use with the default settings (and
    ``n_heads``), cached under ``$FIDBENCH_CACHE/medusa`` by the model's fingerprint and the settings."""
    settings = Settings(heads=n_heads)
    settings.check()
    key = json.dumps({"fingerprint": context.fingerprint, "settings": dataclasses.asdict(settings) | {"data": None},
                      "data_sha256": _sha256(Path(settings.data)), "torch": torch.__version__}, sort_keys=True)
    out = models.cache_root() / "medusa" / f"{context.spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (out / FILES[0]).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{out}.lock"):
        if (out / FILES[0]).is_file():  # another worker trained them while we waited
            return out
        _log(f"training {n_heads} Medusa head(s) for {context.spec.name} once, cached in {out}")
        heads, first, last = train(context.model, context.tokenizer, settings)
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save(heads, tmp, settings, context.spec.path, context.fingerprint, first, last)
        os.replace(tmp, out)
    return out


def _check_device(device: str) -> None:
    try:
        where = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"train-medusa: --device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train-medusa: --device {device}: this torch ({torch.__version__}) sees no CUDA device; "
                         f"use --device cpu")
    if where.type == "cuda" and where.index is not None and where.index >= torch.cuda.device_count():
        raise ValueError(f"train-medusa: --device {device}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s)")


def _check_model(path: str) -> None:
    """A model directory with a config, an embedded name or a hub id in the local cache (fidbench never downloads)."""
    if path in models.EMBEDDED:
        return
    if Path(path).is_dir():
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"train-medusa: model directory {path} has no config.json (not a transformers model)")
        return
    try:
        models.model_type(path)
    except (OSError, ValueError):  # transformers speaks of an internet connection or of repo id syntax
        raise ValueError(f"train-medusa: model {path!r} is neither a model directory nor an embedded name "
                         f"({', '.join(models.EMBEDDED)}) nor a hub id in the local Hugging Face cache") from None


def _check_writable(out: Path) -> None:
    """Make ``out`` and write a file there now, not after the training."""
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"train-medusa: cannot write to {out}: {e.strerror or e}") from None


def main(args) -> int:
    """``fidbench train-medusa MODEL OUT``: load the model, train, save; prints where."""
    settings = Settings(heads=args.heads, layers=args.layers, steps=args.steps, batch=args.batch, lr=args.lr,
                        seed=args.seed, max_new_tokens=args.max_new_tokens, data=str(args.data))
    settings.check()
    out = Path(args.out)
    if any((out / f).exists() for f in FILES) and not args.force:
        raise ValueError(f"train-medusa: {out} already holds Medusa heads; use --force to overwrite them")
    # everything that can be checked before minutes of generation and training
    _check_device(args.device)
    _check_model(args.model)
    _check_writable(out)
    model, tok = models.load(args.model, args.tokenizer, args.dtype, args.device)
    heads, first, last = train(model, tok, settings)
    save(heads, out, settings, args.model, models.fingerprint(model), first, last)
    losses = ", ".join(f"head {i + 1} {a:.2f} -> {b:.2f}" for i, (a, b) in enumerate(zip(first, last)))
    print(f"wrote {out / FILES[0]} and {out / 'config.json'}: {settings.heads} head(s); training loss {losses}")
    return 0
