"""The evaluation loop, owned by fidbench: load a model with its prompts and references once, then
score a method variant over every prompt and return the case's record for the report."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import datasets, engine, metrics, models, prefill, report
from .methods import build
from .reference import GENERATE_BATCH, Reference, Store, eos_ids
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
    continuations: Store | None = None  # where calibration continuations are generated and cached
    progress: Callable[[str, int, int], None] | None = None
    prefills: prefill.Prefills | None = None  # base prefills shared by the cases of base_prefill methods

    def calibration(self, dataset: str, n: int, continued: bool = False) -> list[list[int]]:
        """Token ids of the first ``n`` prompts of a suite dataset (calibration data for a method); ``continued``:
        each prompt followed by the base model's greedy continuation (its reference, generated once and cached).

        Continuations are generated with ``self.model`` as it is: call this before changing the model."""
        chosen = [(p, r) for p, r in zip(self.prompts + self.unscored, self.references + [None] * len(self.unscored))
                  if p.dataset == dataset and p.skipped is None][:n]
        if not chosen:
            names = sorted({p.dataset for p in self.prompts + self.unscored})
            raise ValueError(f"calibration dataset {dataset!r} is not in the suite (datasets: {', '.join(names)})")
        if not continued:
            return [p.p_ids for p, _ in chosen]
        missing = [p for p, r in chosen if r is None]  # calibration-only prompts have no reference yet
        if missing and self.continuations is None:
            raise ValueError("calibration continuations need a model loaded by Bench (its reference store)")
        tick = None
        if self.progress:
            tick = lambda done, total: self.progress(f"{self.spec.name}: calibration continuations", done, total)  # noqa: E731
        made = iter(self.continuations.get(self.model, missing, tick) if missing else [])
        return [p.p_ids + (r or next(made)).g_ids for p, r in chosen]


class SetupError(RuntimeError):
    """A model that failed to load (or to get its prompts and references) on an earlier case."""


Progress = Callable[[str, int, int], None]  # progress(what, done, total): "tiny: base references", 3, 14


class Bench:
    """Per-process state for a suite: one model resident at a time, with its references.

    A model that fails to set up is tried once: its later cases get a ``SetupError`` at once. ``progress``
    hears of references and prompts as they are done; ``worker`` and ``devices`` place ``device: cuda``
    models on an xdist worker's own GPU (``models.worker_device``).
    """

    def __init__(self, suite: Suite, limit: int | None = None, max_new_tokens: int | None = None,
                 decode: str | None = None, progress: Progress | None = None, batch_size: int = 1,
                 worker: str | None = None, devices: list[str] | None = None, free_run: bool = False):
        self.suite = suite
        self.limit = limit
        self.max_new_tokens = suite.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.decode = decode or suite.decode
        self.progress = progress
        self.batch_size = batch_size  # prompts per batch when generating references
        self.worker, self.devices = worker, devices
        self.free_run = free_run  # every case also free-runs (--fidbench-free-run), not only variants that ask
        self.loaded: Loaded | None = None
        self.generated = 0  # references the last load generated (0 when all were cached)
        self.failed: dict[str, str] = {}  # model name -> one line: why it could not be set up, where it was reported

    def load(self, spec: ModelSpec, who: str | None = None, model=None, tokenizer=None) -> Loaded:
        """The model of ``spec`` with its prompts and references, loaded once; ``who`` (a case id) is where a
        failure is reported in full, and named by the ``SetupError`` of every later load of the model.

        ``model`` and ``tokenizer``, when given, are used instead of loading ``spec.path`` (a model built
        in-process, e.g. benchmarks/run.py --shape). The model is warmed up (``engine.warm_up``; on a GPU also
        at every prompt's shapes, ``engine.warm_up_shapes``) before anything is timed."""
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
            device = models.worker_device(spec.device, self.worker, self.devices)
            model, tok = models.load(spec.path, spec.tokenizer, spec.dtype, device)
        elif tok is None:
            raise ValueError(f"model {spec.name!r}: a model given to Bench.load needs its tokenizer")
        engine.warm_up(model)
        fp = models.fingerprint(model)
        max_length = spec.max_length or getattr(model.config, "max_position_embeddings", None) or 8192
        vocab = model.get_input_embeddings().num_embeddings
        prompts, unscored = [], []
        for ds in self.suite.datasets:
            # --fidbench-limit shortens what is scored; a calibration-only set keeps the size its methods ask for
            for p in datasets.load(ds, tok, self.limit if ds.scored else None, vocab, max_length):
                fitted = datasets.fit(p, max_length, self.max_new_tokens, spec.overlong)
                (prompts if ds.scored else unscored).append(fitted)
        keys = {"eos_ids": eos_ids(model, tok), "device": models.device_key(model)}
        store = Store(models.cache_root(), spec.name, fp, self.max_new_tokens, self.batch_size, **keys)
        live = [p for p in prompts if p.skipped is None]
        tick = None
        if self.progress:
            tick = lambda done, total: self.progress(f"{spec.name}: base references", done, total)  # noqa: E731
            tick(0, len(live))
        refs = iter(store.get(model, live, tick))
        refs = [None if p.skipped else next(refs) for p in prompts]
        self.generated = store.generated
        if engine.plans_per_shape(engine.input_device(model)):
            engine.warm_up_shapes(model, [r for r in refs if r is not None])
        # Calibration continuations: generated in batches, in cache entries of their own (the batch size is in the key).
        continuations = Store(models.cache_root(), spec.name, fp, self.max_new_tokens, GENERATE_BATCH, **keys)
        shared = prefill.Prefills(int(self.suite.share_prefill_gib * 2**30)) if self.suite.share_prefill_gib else None
        return Loaded(spec, model, tok, fp, prompts, refs, unscored, continuations, self.progress, shared)

    @staticmethod
    def _scored(loaded: Loaded, prompt, ref: Reference, logits: torch.Tensor, on_sample) -> tuple:
        """A sample's scores from its teacher-forced logits, and its non-finite positions (count, first)."""
        s = metrics.score(logits, ref)
        if prompt.answers:  # task success at the answers' positions, beside token fidelity
            s.answers = metrics.answer_scores(loaded.tokenizer, ref.g_ids, s.hit1, prompt.answers)
        if on_sample:
            on_sample(logits)
        return s, non_finite(logits)

    @contextlib.contextmanager
    def _reloaded_if_changed(self, loaded: Loaded, method):
        """A method that raised may have left the weights changed: the next case then reloads the model."""
        try:
            yield
        except Exception:
            if method.leaves_model_changed or models.fingerprint(loaded.model) != loaded.fingerprint:
                self.loaded = None
            raise

    def run(self, case: Case, method=None, timer: Callable | None = None, on_sample=None) -> dict:
        """Evaluate one model × variant over every prompt; the returned dict is the report's case record.

        ``timer(model, method, reference, recorded)``, called with the method still applied, the first scored
        sample's reference and its shared prefill (None: prefilled live), times it apart from the evaluation;
        what it returns is the record's ``timing.timed``.
        ``on_sample(logits)``, if given, sees each sample's teacher-forced (N, V) logits after scoring, in the
        order the samples are scored (batched: by prompt length).
        The model's fingerprint is checked after the method's ``apply`` exits: a method that leaves the weights
        changed fails its case, and the next case reloads the model rather than score the changed one."""
        method = method or build(case.variant.method, case.variant.params)
        own_loop = method.kind == "own_loop"  # a legacy Modifier's own loop replaces engine + metrics
        free = self.free_run or case.variant.free_run
        if free and own_loop:  # before the model loads
            raise ValueError(f"{case.id}: method {method.name!r} scores samples in its own loop (kind 'own_loop'), "
                             f"so it cannot free-run; run it without --fidbench-free-run")
        text = self.suite.text_scored_by(case.variant)
        if free and text:
            raise ValueError(f"{case.id}: free running compares the method's own continuation with the base model's, "
                             f"and the windows of text dataset {text[0]!r} have none (their reference is the text "
                             f"itself); run it without --fidbench-free-run (deselect it: -k 'not {case.variant.name}')")
        loaded = self.load(case.model)
        mode = engine.resolve_mode(method, self.decode)
        eos = eos_ids(loaded.model, loaded.tokenizer)  # the rules the references were generated by
        per_dataset: dict[str, list] = {}
        samples, skipped = [], []
        timing = {"method_s": 0.0} if own_loop else {"prefill_s": 0.0, "decode_s": 0.0}
        if free:
            timing["free_run_s"] = 0.0
        scored = set(self.suite.scored_by(case.variant))
        work = [(p, r) for p, r in zip(loaded.prompts, loaded.references) if p.dataset in scored]
        # Prompts per forward: --fidbench-batch-size for a method that batches (Method.batches), prompts of similar
        # lengths together (engine.batches); the report keeps the suite's order.
        batched = self.batch_size > 1 and method.batches and not own_loop
        # A record holds one prompt's prefill, so replaying it runs one prompt per forward: batches, when asked
        # for, come first, and shared prefills serve the cases that run one prompt at a time.
        shared = loaded.prefills if method.base_prefill and not own_loop and not batched else None
        if shared is not None:
            timing["prefills_replayed"] = 0  # samples whose prefill_s is the method's work on a recorded prefill
        size = self.batch_size if batched else 1
        timing["batch_size"] = size
        ties = 0  # scored positions at a near-tie, batched runs only (metrics.NEAR_TIE)
        live = [k for k, (_, ref) in enumerate(work) if ref is not None]
        groups = [[live[i] for i in b] for b in engine.batches([len(work[k][1].p_ids) for k in live], size)] \
            if size > 1 else [[k] for k in live]
        scored_rows: dict[int, tuple] = {}  # index in work -> (scores, the report's sample)
        with self._reloaded_if_changed(loaded, method), method.apply(loaded.model, loaded) as model:
            done = 0
            for group in groups:
                if self.progress:
                    self.progress(f"{case.id}: prompts", done, len(live))
                done += len(group)
                refs = [work[k][1] for k in group]
                if own_loop:
                    t0 = time.perf_counter()
                    s = metrics.PartialScores.of(method.score_sample(model, refs[0]), f"method {method.name!r}")
                    timing["method_s"] += time.perf_counter() - t0
                    results = [(s, (s.non_finite, s.first_non_finite))]  # as the method counted them in its logits
                    gens = [None]
                elif len(group) > 1:
                    logits, clock = engine.teacher_force_batch(model, method, [(r.p_ids, r.g_ids) for r in refs], mode)
                    prefill_s, decode_s = clock.seconds()
                    timing["prefill_s"] += prefill_s
                    timing["decode_s"] += decode_s
                    results = [self._scored(loaded, work[k][0], ref, forced, on_sample)
                              for k, ref, forced in zip(group, refs, logits)]
                    ties = ties + sum(metrics.near_ties(forced) for forced in logits)
                    gens = [None] * len(group)
                    if free:
                        made, clock = engine.greedy_batch(model, method, [r.p_ids for r in refs],
                                                          [len(r.g_ids) for r in refs], eos)
                        timing["free_run_s"] += sum(clock.seconds())
                        gens = [(ids, non_finite(rows)[0]) for ids, rows in made]
                else:  # one prompt (alone in its batch too): live, or replaying its shared base prefill
                    recorded = shared.get(model, refs[0].p_ids) if shared is not None else None
                    forced = engine.teacher_force(model, method, refs[0].p_ids, refs[0].g_ids, mode, recorded)
                    if recorded is not None:
                        timing["prefills_replayed"] += 1
                    timing["prefill_s"] += forced.prefill_s
                    timing["decode_s"] += forced.decode_s
                    results = [self._scored(loaded, work[group[0]][0], refs[0], forced.logits, on_sample)]
                    gens = [None]
                    if free:  # after teacher forcing: method.begin resets per-sample state for the second pass
                        # free running is refused for own_loop methods above, so `recorded` is this sample's
                        gen = engine.free_run(model, method, refs[0].p_ids, len(refs[0].g_ids), eos, recorded)
                        timing["free_run_s"] += gen.prefill_s + gen.decode_s
                        gens = [(gen.ids, gen.non_finite)]
                for k, ref, (s, bad), gen in zip(group, refs, results, gens):
                    prompt = work[k][0]
                    free_row = None  # the sample's free-running fields of the report
                    if free:
                        ids, bad_steps = gen
                        free_row = {"base_text": loaded.tokenizer.decode(ref.g_ids, skip_special_tokens=True),
                                    "free_text": loaded.tokenizer.decode(ids, skip_special_tokens=True),
                                    "free_tokens": len(ids), "free_non_finite": bad_steps, "answers": prompt.answers}
                        s.free = metrics.free_run(ref.g_ids, ids, free_row["base_text"], free_row["free_text"],
                                                  prompt.answers)
                    scored_rows[k] = (s, report.sample(prompt, ref, s, *bad, free=free_row))
            if size > 1:
                timing["near_ties"] = int(ties)
            for k, (prompt, ref) in enumerate(work):
                if ref is None:
                    skipped.append({"dataset": prompt.dataset, "index": prompt.index, "reason": prompt.skipped})
                else:
                    per_dataset.setdefault(prompt.dataset, []).append(scored_rows[k][0])
                    samples.append(scored_rows[k][1])
            if self.progress:
                self.progress(f"{case.id}: prompts", len(live), len(live))
            first = next((r for r in loaded.references if r is not None), None)
            if timer is not None and first is not None:
                timing["timed"] = timer(model, method, first, shared.get(model, first.p_ids) if shared else None)
        record = report.case(case, loaded, method, mode, per_dataset, samples, skipped, timing, free)
        if method.leaves_model_changed:
            self.loaded = None  # changed by design (also forwards the fingerprint cannot see): reload for the next case
        elif models.fingerprint(loaded.model) != loaded.fingerprint:  # one pass over the weights, once per case
            self.loaded = None  # the next case reloads the model instead of scoring the changed one
            record["outcome"] = "failed"
            record["failures"].insert(0, f"method {method.name!r} (variant {case.variant.name!r}) left the model's "
                                         f"weights changed after its apply() exited (it must restore them); the "
                                         f"model is reloaded for the next case")
        return record


def non_finite(logits: torch.Tensor) -> tuple[int, int | None]:
    """How many positions of (N, V) ``logits`` hold a NaN or inf, and the first of them (read once per sample)."""
    bad = (~torch.isfinite(logits)).any(-1).nonzero()[:, 0].tolist()
    return len(bad), (bad[0] if bad else None)
