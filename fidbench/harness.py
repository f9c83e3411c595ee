"""The evaluation loop, owned by fidbench: load a model with its prompts and references once, then
score a method variant over every prompt and return the case's record for the report."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from . import datasets, engine, metrics, models, report
from .methods import build
from .reference import Reference, Store, eos_ids
from .suite import Case, ModelSpec, Suite


@dataclass
class Loaded:
    spec: ModelSpec
    model: object
    tokenizer: object
    fingerprint: str
    prompts: list[datasets.Prompt]  # every scored dataset's prompts, in suite order
    references: list[Reference | None]  # None for skipped prompts
    unscored: list[datasets.Prompt] = field(default_factory=list)  # calibration-only datasets' prompts

    def calibration(self, dataset: str, n: int) -> list[list[int]]:
        """Token ids of the first ``n`` prompts of a suite dataset (calibration data for a method)."""
        ids = [p.p_ids for p in self.prompts + self.unscored if p.dataset == dataset and p.skipped is None][:n]
        if not ids:
            names = sorted({p.dataset for p in self.prompts + self.unscored})
            raise ValueError(f"calibration dataset {dataset!r} is not in the suite (datasets: {', '.join(names)})")
        return ids


class SetupError(RuntimeError):
    """A model that failed to load (or to get its prompts and references) on an earlier case."""


class Bench:
    """Per-process state for a suite: one model resident at a time, with its references.

    A model that fails to set up is tried once: its later cases get a ``SetupError`` at once.
    """

    def __init__(self, suite: Suite, limit: int | None = None, max_new_tokens: int | None = None,
                 decode: str | None = None, progress: bool = True, batch_size: int = 1):
        self.suite = suite
        self.limit = limit
        self.max_new_tokens = suite.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.decode = decode or suite.decode
        self.progress = progress
        self.batch_size = batch_size  # prompts per batch when generating references
        self.loaded: Loaded | None = None
        self.generated = 0  # references the last load generated (0 when all were cached)
        self.failed: dict[str, str] = {}  # model name -> one line: why it could not be set up, where it was reported

    def load(self, spec: ModelSpec, who: str | None = None, model=None, tokenizer=None) -> Loaded:
        """The model of ``spec`` with its prompts and references, loaded once; ``who`` (a case id) is where a
        failure is reported in full, and named by the ``SetupError`` of every later load of the model.

        ``model`` and ``tokenizer``, when given, are used instead of loading ``spec.path`` (a model built
        in-process, e.g. benchmarks/run.py --shape). The model is warmed up (``engine.warm_up``) before
        anything is timed."""
        if self.loaded is not None and self.loaded.spec is spec:
            return self.loaded
        if spec.name in self.failed:
            raise SetupError(self.failed[spec.name])
        self.loaded = None  # free the previous model before loading the next
        try:
            self.loaded = self._load(spec, model, tokenizer)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
            self.failed[spec.name] = (f"model {spec.name!r} could not be set up"
                                      f"{f' (see {who})' if who else ''}: {reason}")
            raise
        return self.loaded

    def _load(self, spec: ModelSpec, model, tok) -> Loaded:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        if model is None:
            model, tok = models.load(spec.path, spec.tokenizer, spec.dtype, spec.device)
        elif tok is None:
            raise ValueError(f"model {spec.name!r}: a model given to Bench.load needs its tokenizer")
        engine.warm_up(model)
        fp = models.fingerprint(model)
        max_length = spec.max_length or getattr(model.config, "max_position_embeddings", None) or 8192
        vocab = model.get_input_embeddings().num_embeddings
        prompts, unscored = [], []
        for ds in self.suite.datasets:
            # --fidbench-limit shortens what is scored; a calibration-only set keeps the size its methods ask for
            for p in datasets.load(ds, tok, self.limit if ds.scored else None, vocab):
                (prompts if ds.scored else unscored).append(datasets.fit(p, max_length, self.max_new_tokens, spec.overlong))
        store = Store(models.cache_root(), spec.name, fp, self.max_new_tokens, self.batch_size,
                      eos_ids=eos_ids(model, tok), device=models.device_key(model))
        live = [p for p in prompts if p.skipped is None]
        refs = iter(store.get(model, live, self.progress))
        refs = [None if p.skipped else next(refs) for p in prompts]
        self.generated = store.generated
        return Loaded(spec, model, tok, fp, prompts, refs, unscored)

    def run(self, case: Case, method=None, on_sample=None) -> dict:
        """Evaluate one model × variant over every prompt; the returned dict is the report's case record.

        ``on_sample(forced)``, if given, sees each sample's ``engine.Forced`` (its logits) after scoring."""
        loaded = self.load(case.model)
        method = method or build(case.variant.method, case.variant.params)
        mode = engine.resolve_mode(method, self.decode)
        own_loop = method.kind == "own_loop"  # a legacy Modifier's own loop replaces engine + metrics
        per_dataset: dict[str, list] = {}
        samples, skipped = [], []
        timing = {"method_s": 0.0} if own_loop else {"prefill_s": 0.0, "decode_s": 0.0}
        work = [(p, r) for p, r in zip(loaded.prompts, loaded.references)]
        with method.apply(loaded.model, loaded) as model:
            # Progress goes to the real stderr: pytest captures sys.stderr while a test runs.
            for prompt, ref in tqdm(work, desc=case.id, disable=not self.progress, leave=False, file=sys.__stderr__):
                if ref is None:
                    skipped.append({"dataset": prompt.dataset, "index": prompt.index, "reason": prompt.skipped})
                    continue
                if own_loop:
                    t0 = time.perf_counter()
                    s = metrics.PartialScores.of(method.score_sample(model, ref), f"method {method.name!r}")
                    timing["method_s"] += time.perf_counter() - t0
                    bad = (0, None)  # its scores are checked finite by PartialScores
                else:
                    forced = engine.teacher_force(model, method, ref.p_ids, ref.g_ids, mode)
                    s = metrics.score(forced.logits, ref)
                    timing["prefill_s"] += forced.prefill_s
                    timing["decode_s"] += forced.decode_s
                    bad = non_finite(forced.logits)
                    if on_sample:
                        on_sample(forced)
                per_dataset.setdefault(prompt.dataset, []).append(s)
                samples.append(report.sample(prompt, ref, s, *bad))
        return report.case(case, loaded, method, mode, per_dataset, samples, skipped, timing)


def non_finite(logits: torch.Tensor) -> tuple[int, int | None]:
    """How many positions of (N, V) ``logits`` hold a NaN or inf, and the first of them (read once per sample)."""
    bad = (~torch.isfinite(logits)).any(-1).nonzero()[:, 0].tolist()
    return len(bad), (bad[0] if bad else None)
