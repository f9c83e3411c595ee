"""Prompts per forward (``--fidbench-batch-size``), side by side: teacher forcing and free running of the suite's
prompts at batch 1 and at larger batches, under the variants that batch, on the default model.

    python benchmarks/batch.py --threads 1                          # origin and rtn-8, limit 2, batches 1, 4, 8
    python benchmarks/batch.py --threads 1 --variants snapkv-25,h2o-25,fp8-attention --sizes 1 8
    python benchmarks/batch.py --shape 8b --tokenizer benchmarks/gpu/tokenizer --device cuda --dtype bf16 \
        --variants origin --sizes 1 8 16    # Llama-3.1-8B's shape, random weights (benchmarks/run.py --shape)

Every size runs over the same prompts and the same batch-1 references (the ones a suite at batch 1 caches),
interleaved repeat by repeat so that other work on the machine weighs on each alike; a record is each size's
median seconds, its ratio to batch 1, and how far its results are from batch 1's (teacher forcing: argmax flips
and the largest logit difference; free running: continuations that differ). Each record is written to ``--out``
(default benchmarks/batch.json) as soon as it is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import run  # benchmarks/run.py: the random-weight models of real shapes
import torch
from suite import save  # benchmarks/suite.py: records written atomically

from fidbench import engine, harness
from fidbench.methods import build
from fidbench.reference import eos_ids
from fidbench.suite import load

ROOT = Path(__file__).resolve().parent.parent


def chat_references(suite, loaded) -> list:
    """The base references of the suite's default scored sets that the model generated (not the text sets, whose
    reference is their own text)."""
    generated = {d.name for d in suite.datasets if d.default and d.scored and d.kind != "text"}
    return [r for p, r in zip(loaded.prompts, loaded.references) if r is not None and p.dataset in generated]


def chunks(refs: list, size: int) -> list[list]:
    """As the harness batches: prompts of similar lengths together (``engine.batches``)."""
    return [[refs[i] for i in b] for b in engine.batches([len(r.p_ids) for r in refs], size)]


def force(model, method, refs, size: int) -> tuple[float, dict]:
    """Seconds to teacher-force every reference at ``size`` prompts per forward (in the method's own mode, as a suite
    runs it: parallel where it is exact), and each sample's logits."""
    mode = engine.resolve_mode(method, "auto")
    engine.sync(engine.input_device(model))
    t0 = time.perf_counter()
    out = {}
    for group in chunks(refs, size):
        if len(group) == 1:  # as the harness does: a prompt alone in its batch runs as at batch 1
            logits = [engine.teacher_force(model, method, group[0].p_ids, group[0].g_ids, mode).logits]
        else:
            logits, _ = engine.teacher_force_batch(model, method, [(r.p_ids, r.g_ids) for r in group], mode)
        out.update((id(r), x.cpu()) for r, x in zip(group, logits))
    engine.sync(engine.input_device(model))
    return time.perf_counter() - t0, out


def free(model, method, refs, size: int, eos: set[int]) -> tuple[float, dict]:
    """Seconds to free-run every prompt (as long as its reference) at ``size`` prompts per forward, and the ids."""
    t0 = time.perf_counter()
    out = {}
    for group in chunks(refs, size):
        if len(group) == 1:
            ids = [engine.free_run(model, method, group[0].p_ids, len(group[0].g_ids), eos).ids]
        else:
            made, _ = engine.greedy_batch(model, method, [r.p_ids for r in group], [len(r.g_ids) for r in group], eos)
            ids = [t for t, _ in made]
        out.update((id(r), x) for r, x in zip(group, ids))
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default=str(ROOT / "fidbench.yaml"))
    p.add_argument("--variants", default="origin,rtn-8", help="comma-separated variants of the suite")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8], help="prompts per forward (1 is the baseline)")
    p.add_argument("--limit", type=int, default=2, help="prompts per dataset (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--phases", default="teacher forcing,free running", help="comma-separated (default: both)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", help="the model's device (default: the suite's)")
    p.add_argument("--shape", choices=sorted(run.SHAPES), help="a random-weight Llama of this shape instead")
    p.add_argument("--tokenizer", help="--shape's tokenizer (default: the default model's)")
    p.add_argument("--dtype", default="fp32", help="--shape's dtype (default fp32)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "batch.json"))
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if 1 not in a.sizes:
        p.error("--sizes must hold 1, the baseline")
    suite = load(a.suite)
    bench = harness.Bench(suite, limit=a.limit, progress=lambda what, done, total: None)
    if a.shape:
        a.device, a.model = a.device or "cpu", None
        spec = run.model_spec(a)
        model, tokenizer = run.make_model(a, spec)
        loaded = bench.load(spec, model=model, tokenizer=tokenizer)
    else:
        spec = dataclasses.replace(suite.models[0], device=a.device) if a.device else suite.models[0]
        loaded = bench.load(spec)
    refs = chat_references(suite, loaded)
    eos = eos_ids(loaded.model, loaded.tokenizer)
    variants = {v.name: v for v in suite.variants}
    records: list[dict] = []
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    print(f"{len(refs)} prompts ({sum(len(r.p_ids) for r in refs)} prompt tokens, "
          f"{sum(len(r.g_ids) for r in refs)} reference tokens) on {engine.input_device(loaded.model)}")
    for name in a.variants.split(","):
        variant = variants[name]
        method = build(variant.method, variant.params)
        if not method.batches:
            print(f"{name}: method {method.name!r} does not batch; skipped")
            continue
        with method.apply(loaded.model, loaded) as model:
            phases = {"teacher forcing": lambda s, m=method: force(model, m, refs, s),
                      "free running": lambda s, m=method: free(model, m, refs, s, eos)}
            for what in a.phases.split(","):
                measure = phases[what]
                seconds: dict[int, list[float]] = {s: [] for s in a.sizes}
                results: dict[int, dict] = {}
                for _ in range(a.repeats):
                    for size in a.sizes:
                        s, results[size] = measure(size)
                        seconds[size].append(s)
                base = statistics.median(seconds[1])
                for size in a.sizes:
                    median = statistics.median(seconds[size])
                    record = {"variant": name, "phase": what, "batch_size": size, "seconds": median,
                              "all_seconds": seconds[size], "ratio_to_batch_1": base / median,
                              "prompts": len(refs), "device": str(engine.input_device(model)),
                              "threads": torch.get_num_threads(), "model": spec.name, "command": command,
                              "machine": platform.node(), "torch": torch.__version__}
                    if what == "teacher forcing":
                        ones, got = results[1], results[size]
                        record["argmax_flips"] = sum(int((ones[k].argmax(-1) != got[k].argmax(-1)).sum()) for k in ones)
                        record["max_abs_logit_diff"] = max(float((ones[k] - got[k]).abs().max()) for k in ones)
                    else:
                        record["continuations_differing"] = sum(results[1][k] != results[size][k] for k in results[1])
                    records.append(record)
                    save(Path(a.out), records)  # a run cut short keeps every record so far
                    detail = {k: v for k, v in record.items() if k in ("argmax_flips", "max_abs_logit_diff",
                                                                        "continuations_differing")}
                    print(f"{name:10s} {what:16s} batch {size:2d}: {median:7.2f} s  {base / median:5.2f}x  {detail}",
                          flush=True)


if __name__ == "__main__":
    main()
