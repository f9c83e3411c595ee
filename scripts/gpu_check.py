"""GPU check: the default model on each device placement, every checked method, in both teacher-forcing modes.

Prints per placement × method × mode the fidelity scores, the argmax agreement of parallel with stepwise
teacher forcing, and prefill / decode times, all from the harness's own ``Bench.run`` (the model warmed up
by ``Bench.load``, phases timed by the engine with CUDA events).
Exits 1 if a check fails: origin must reproduce its own reference stepwise, parallel must agree with
stepwise (argmax) on at least --min-agreement of the tokens. Methods not registered are skipped, said so.

    python scripts/gpu_check.py                                  # cuda and auto, bf16 (scripts/gpu_check.sh)
    python scripts/gpu_check.py --devices cpu,auto --dtype fp32 --limit 1 --max-new-tokens 8   # CPU dry run
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fidbench.harness import Bench  # noqa: E402
from fidbench.methods import REGISTRY  # noqa: E402
from fidbench.suite import Case, ModelSpec, Suite, Variant, load  # noqa: E402

# Methods checked, with the parameters of their default-suite variant (defaults where it has none).
METHODS = {"origin": {}, "topk": {"keep": 0.1}, "snapkv": {}, "kivi": {}}


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--devices", default="cuda,auto", help="comma-separated model placements (cuda, cuda:N, auto, cpu)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--limit", type=int, default=2, help="prompts per dataset")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--datasets", default=None,
                   help="comma-separated datasets of fidbench.yaml (default: all it scores)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--min-agreement", type=float, default=0.9, help="parallel vs stepwise argmax agreement floor")
    p.add_argument("--budget-s", type=float, default=420.0, help="start no new case after this many seconds")
    p.add_argument("--report", default=None, help="write the results as JSON here")
    return p.parse_args()


def run_mode(bench, case, mode):
    """``Bench.run`` of the case in ``mode`` (a fresh method: its counters are its own); per-prompt argmax,
    the record's scores and timing."""
    argmax = []
    bench.decode = mode
    record = bench.run(case, on_sample=lambda logits: argmax.append(logits.argmax(-1).cpu()))
    scores, timing = record["scores"], record["timing"]
    p_tokens = sum(s["prompt_tokens"] for s in record["samples"])
    d_tokens = scores["n_tokens"] - scores["n_samples"]
    return argmax, record, {
        "acc1": scores["acc1"], "acc5": scores["acc5"], "kl_mean": scores["kl_mean"],
        "first_divergence": scores["first_divergence"], **timing,
        "prefill_ms_per_1k_tokens": 1e6 * timing["prefill_s"] / max(p_tokens, 1),
        "decode_ms_per_token": 1e3 * timing["decode_s"] / max(d_tokens, 1),
    }


def main() -> int:
    args = parse()
    start = time.perf_counter()
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print("gpu_check:", json.dumps(env))
    if any(d.startswith("cuda") for d in args.devices.split(",")) and not torch.cuda.is_available():
        print("FAIL: a cuda placement was asked for but torch sees no CUDA device")
        return 1
    # The default suite's datasets: its scored ones (or those named) and its calibration-only ones.
    datasets = [d for d in load(ROOT / "fidbench.yaml").datasets
                if not d.scored or not args.datasets or d.name in args.datasets.split(",")]
    methods = []
    for name in args.methods.split(","):
        if name in REGISTRY:
            methods.append((name, METHODS.get(name, {})))
        else:
            print(f"skipped {name}: not registered in this fidbench (registered: {', '.join(sorted(REGISTRY))})")

    results, failures = [], []
    for device in args.devices.split(","):
        spec = ModelSpec(name=f"{args.model}-{device.replace(':', '')}-{args.dtype}", path=args.model,
                         dtype=args.dtype, device=device)
        suite = Suite(Path("gpu_check"), args.max_new_tokens, "auto", [spec], datasets)
        bench = Bench(suite, limit=args.limit, progress=False)
        t0 = time.perf_counter()
        loaded = bench.load(spec)
        where = sorted({str(p.device) for p in loaded.model.parameters()})
        n = sum(r is not None for r in loaded.references)
        print(f"\n== {spec.name}: weights on {', '.join(where)}; {n} prompts; load + {bench.generated} references "
              f"in {time.perf_counter() - t0:.1f} s")
        for name, params in methods:
            if time.perf_counter() - start > args.budget_s:
                print(f"skipped {name} on {device}: time budget of {args.budget_s:.0f} s spent")
                failures.append(f"{name} on {device} not run (time budget)")
                continue
            case = Case(spec, Variant(name, name, params), {})
            modes = ["parallel", "stepwise"] if REGISTRY[name].parallel_exact else ["stepwise"]
            runs = {mode: run_mode(bench, case, mode) for mode in modes}
            agreement = None
            if len(runs) == 2:
                par, step = runs["parallel"][0], runs["stepwise"][0]
                agreement = float(torch.cat([a == b for a, b in zip(par, step)]).double().mean())
                if agreement < args.min_agreement:
                    failures.append(f"{name} on {device}: parallel/stepwise argmax agreement {agreement:.4f} "
                                    f"< {args.min_agreement}")
            for mode, (_, record, r) in runs.items():
                row = {"placement": device, "method": name, "params": params, "mode": mode, **r,
                       "parallel_stepwise_agreement": agreement, "kept": record["kept"]}
                results.append(row)
                print(f"{name:8s} {mode:9s} acc1 {r['acc1']:.4f} acc5 {r['acc5']:.4f} kl {r['kl_mean']:.5f} "
                      f"first_div {r['first_divergence']:.1f} | prefill {r['prefill_ms_per_1k_tokens']:.1f} ms/1k tok, "
                      f"decode {r['decode_ms_per_token']:.2f} ms/tok"
                      + (f" | parallel~stepwise argmax agreement {agreement:.4f}" if agreement is not None else ""))
            if name == "origin" and runs["stepwise"][2]["acc1"] < 1.0:
                failures.append(f"origin on {device}: stepwise acc1 {runs['stepwise'][2]['acc1']:.4f} < 1 "
                                f"(the reference is the same computation)")
        del bench, loaded
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    total = time.perf_counter() - start
    print(f"\ngpu_check finished in {total:.1f} s")
    if args.report:
        Path(args.report).write_text(json.dumps({"environment": env, "args": vars(args), "results": results,
                                                 "failures": failures, "seconds": total}, indent=1))
    for f in failures:
        print("FAIL:", f)
    print("gpu_check:", "FAILED" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
