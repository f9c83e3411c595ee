"""The noise floor of a variant's scores: the same prompts scored in parallel and stepwise, one prompt per forward
and all in one batch, on the default model. The four computations are equal in exact arithmetic; in fp32 they sum
in different orders (the matmuls' blocking depends on how many rows a forward holds), and a method that rounds
(e4m3, int8, low-bit caches) can turn a ~1e-6 difference into a rounding that goes the other way.

    python benchmarks/noise.py --threads 1 --variants fp8-attention,sage-attention,snapkv-25 --max-prompt 100

Prints, per variant and computation, acc@1, KL and how many argmaxes differ from the first computation (parallel at
batch 1, or stepwise for a method that is not exact in parallel).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from batch import chat_references  # benchmarks/batch.py

from fidbench import engine, harness, metrics
from fidbench.methods import build
from fidbench.suite import load

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default=str(ROOT / "fidbench.yaml"))
    p.add_argument("--variants", default="fp8-attention,sage-attention")
    p.add_argument("--limit", type=int, default=1, help="prompts per dataset (default 1)")
    p.add_argument("--max-prompt", type=int, default=100, help="only prompts shorter than this (tokens)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    suite = load(a.suite)
    loaded = harness.Bench(suite, limit=a.limit, progress=lambda *_: None).load(suite.models[0])
    refs = [r for r in chat_references(suite, loaded) if len(r.p_ids) < a.max_prompt]
    if not refs:
        p.error(f"no prompt of the suite's default chat sets at --limit {a.limit} is shorter than --max-prompt "
                f"{a.max_prompt} tokens")
    print(f"{len(refs)} prompts of {[len(r.p_ids) for r in refs]} tokens, {sum(len(r.g_ids) for r in refs)} "
          f"positions", flush=True)
    variants = {v.name: v for v in suite.variants}
    for name in a.variants.split(","):
        method = build(variants[name].method, variants[name].params)
        with method.apply(loaded.model, loaded) as model:
            runs = {}
            for mode in ("parallel", "stepwise") if method.parallel_exact else ("stepwise",):
                runs[f"{mode}, batch 1"] = [engine.teacher_force(model, method, r.p_ids, r.g_ids, mode).logits
                                            for r in refs]
                if method.batches:
                    runs[f"{mode}, batch {len(refs)}"], _ = engine.teacher_force_batch(
                        model, method, [(r.p_ids, r.g_ids) for r in refs], mode)
        base = next(iter(runs.values()))
        for what, logits in runs.items():
            s = metrics.aggregate([metrics.score(x, r) for x, r in zip(logits, refs)])
            flips = sum(int((x.argmax(-1) != y.argmax(-1)).sum()) for x, y in zip(logits, base))
            print(f"{name:16s} {what:18s} acc@1 {s['acc1']:.4f}  KL {s['kl_mean']:.5f}  argmax != first: {flips}",
                  flush=True)


if __name__ == "__main__":
    main()
