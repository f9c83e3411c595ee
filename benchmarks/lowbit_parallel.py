"""fp8-attention, sage-attention and sparge-attention: the decode of one teacher-forced forward against the
token-by-token decode it replaces, side by side on the default suite's model and references.

    OMP_NUM_THREADS=1 python benchmarks/lowbit_parallel.py --limit 1 [--out benchmarks/lowbit_parallel.json]

For each method and prompt the two modes run alternately (``--repeats`` times each), so a busy machine
slows both alike; the ratio of their summed decode seconds is the figure, with the argmax agreement of
the two modes' logits. Prefills are the same in both modes and are not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from fidbench import engine, suite
from fidbench.harness import Bench
from fidbench.methods import build

METHODS = ("fp8-attention", "sage-attention", "sparge-attention")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fidbench.yaml")
    parser.add_argument("--limit", type=int, default=1, help="prompts per dataset")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    s = suite.load(args.config)
    bench = Bench(s, limit=args.limit,
                  progress=lambda what, done, total: print(f"{what} {done}/{total}", file=sys.stderr))
    loaded = bench.load(s.models[0])
    refs = [r for r in loaded.references if r is not None]
    rows = []
    for name in args.methods.split(","):
        seconds = {"parallel": 0.0, "stepwise": 0.0}
        agree = total = 0
        for ref in refs:
            for _ in range(args.repeats):
                logits = {}
                for mode in ("stepwise", "parallel"):
                    method = build(name, {})
                    with method.apply(loaded.model) as m:
                        forced = engine.teacher_force(m, method, ref.p_ids, ref.g_ids, mode)
                    seconds[mode] += forced.decode_s
                    logits[mode] = forced.logits
                agree += int((logits["parallel"].argmax(-1) == logits["stepwise"].argmax(-1)).sum())
                total += logits["parallel"].shape[0]
        row = {"method": name, "prompts": len(refs), "tokens": sum(len(r.g_ids) for r in refs),
               "stepwise_decode_s": seconds["stepwise"] / args.repeats,
               "parallel_decode_s": seconds["parallel"] / args.repeats,
               "speedup": seconds["stepwise"] / seconds["parallel"], "argmax_agreement": agree / total}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1) + "\n")  # kept as it goes: a cut run keeps its rows
    return 0


if __name__ == "__main__":
    sys.exit(main())
