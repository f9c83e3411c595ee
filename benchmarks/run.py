#!/usr/bin/env python
"""fidbench's performance benchmark (issue 5): each target measured side by side with its baseline.

1. engine overhead: scoring a >= 1,000-token prompt with a 128-token reference vs one bare forward
   of prompt + reference (``forward``), and its decode part vs the one-token-per-step loop (``stepwise``);
2. method overhead: each registered method's prefill vs origin's (``origin``);
3. long prompts: an 8,000-token prompt per method in its own process, peak RSS vs origin's (``origin``);
4. references: a second run of a small suite, the fraction of its time outside model forwards (``forward``).

    python benchmarks/run.py                          # every target: CPU, fp32, the default model
    python benchmarks/run.py --targets 1,2 --quick    # a quick look
    python benchmarks/run.py --device cuda --dtype bf16
    python benchmarks/run.py --show                   # the table of benchmarks/last.json

Baseline and ours run side by side, interleaved ``--repeats`` times; the table shows the repeat whose
ratio is the median. Results go to benchmarks/last.json (records of other devices, dtypes and
targets there are kept).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a fresh clone runs without installing fidbench first

import torch  # noqa: E402

from fidbench import datasets, engine, metrics, models  # noqa: E402
from fidbench.harness import Bench, Loaded  # noqa: E402
from fidbench.methods import REGISTRY, build  # noqa: E402
from fidbench.methods.base import Method  # noqa: E402
from fidbench.reference import Store  # noqa: E402
from fidbench.suite import load as load_suite  # noqa: E402

SUITE = ROOT / "fidbench.yaml"
OUT = ROOT / "benchmarks" / "last.json"
ENGINE_METHODS = ("origin", "topk", "streamingllm", "snapkv")  # target 1
CRITERIA = {  # (target, baseline) -> (what must hold, check)
    (1, "forward"): ("ratio <= 1.2", lambda r: r["ratio"] <= 1.2),
    (1, "stepwise"): ("ratio <= 1/15, argmax >= 99.9 %",
                      lambda r: r["ratio"] <= 1 / 15 and (r["argmax_agreement"] or 0) >= 0.999),
    (2, "origin"): ("ratio <= 1.3", lambda r: r["ratio"] <= 1.3),
    (3, "origin"): ("peak <= 1.5x origin", lambda r: (r.get("peak_cuda_mb") or r["peak_rss_mb"])
                    <= 1.5 * (r.get("baseline_peak_cuda_mb") or r["baseline_peak_rss_mb"])),  # GPU memory on a GPU
    (4, "forward"): ("outside forwards < 10 %", lambda r: r["ratio"] < 0.10),
}


# ---------------------------------------------------------------- measuring

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_mb(key: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _hwm_mb() -> float:
    """This process's peak resident set: VmHWM (resettable), else ru_maxrss (since the process started)."""
    return _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Peak:
    """Peak memory of the process during a block: resident set (Linux resets VmHWM via clear_refs), CUDA."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        self.rss_mb = _hwm_mb()
        self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if self.device.startswith("cuda") else None


def timed(device: str, fn):
    """(result, seconds, Peak) of ``fn()``."""
    with Peak(device) as peak:
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        seconds = time.perf_counter() - t0
    return out, seconds, peak


def paired(ours: list[float], base: list[float]) -> dict:
    """The repeat whose ours / baseline ratio is the median (the lower one for an even count).

    Each repeat runs ours right beside its baseline, so a pair shares the machine's load of the
    moment; the median pair resists load that drifts between repeats (a shared machine)."""
    ratios = [o / b for o, b in zip(ours, base)]
    i = ratios.index(statistics.median_low(ratios))
    return {"ours_s": ours[i], "baseline_s": base[i], "ratios": ratios, "index": i}


def highest(peaks: list[Peak]) -> Peak:
    return max(peaks, key=lambda p: p.rss_mb)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).double().mean().item()


# ---------------------------------------------------------------- model, prompts, references

@dataclasses.dataclass
class Setup:
    args: argparse.Namespace
    model: object
    loaded: Loaded  # the harness's context: methods that calibrate read its prompts

    @property
    def device(self) -> str:
        return self.args.device


def model_spec(args):
    spec = load_suite(SUITE).models[0]
    name = spec.name if args.model == spec.path else Path(args.model).name
    return dataclasses.replace(spec, path=args.model, name=name, dtype=args.dtype, device=args.device)


def setup(args, fingerprint: bool = True) -> Setup:
    spec = model_spec(args)
    model, tok = models.load(spec.path, spec.tokenizer, spec.dtype, spec.device)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = [p for ds in load_suite(SUITE).datasets for p in datasets.load(ds, tok, None, vocab)]
    fp = models.fingerprint(model) if fingerprint else ""
    return Setup(args, model, Loaded(spec, model, tok, fp, prompts, [None] * len(prompts)))


def long_prompt(s: Setup, dataset: str, n_tokens: int, instruction: str) -> list[int]:
    """A prompt of exactly ``n_tokens``: the dataset's documents joined, rendered with the chat
    template, and cut in the middle like the harness's overlong policy (head and tail kept)."""
    rows = [json.loads(line) for line in (ROOT / "data" / f"{dataset}.jsonl").read_text().splitlines() if line.strip()]
    bodies = [r["conversations"][-1]["content"].rsplit("\n\n", 1)[0] for r in rows]
    text = ""
    for body in bodies * (1 + n_tokens // 500):
        text += body + "\n\n"
        ids, _ = datasets.render(s.loaded.tokenizer, [{"role": "user", "content": text + instruction}], dataset)
        if len(ids) >= n_tokens:
            break
    prompt = datasets.fit(datasets.Prompt(dataset, 0, ids), n_tokens + 1, 1, "truncate")
    assert len(prompt.p_ids) == n_tokens, (len(prompt.p_ids), n_tokens)
    return prompt.p_ids


def reference(s: Setup, p_ids: list[int], n: int):
    """The base model's greedy ``n``-token continuation, end-of-sequence ignored so it has exactly ``n``
    tokens; cached in the benchmark's own store (never mixed with suite references)."""
    store = Store(models.cache_root() / "benchmark", s.loaded.spec.name, s.loaded.fingerprint, n,
                  device=models.device_key(s.model))
    return store.get(s.model, [datasets.Prompt("benchmark", 0, p_ids)], progress=False)[0]


def methods_for(target_default, wanted: list[str] | None) -> tuple[list[str], list[str]]:
    """(methods to run, notes on the ones skipped because they are not registered)."""
    names = wanted or list(target_default)
    notes = [f"{n}: not registered in this checkout (skipped; rerun after it is merged)" for n in names if n not in REGISTRY]
    return [n for n in names if n in REGISTRY], notes


APPLY_ERRORS = (ValueError, OSError, RuntimeError)


def suite_params(name: str) -> dict | None:
    """The parameters of the first variant of ``name`` in fidbench.yaml (None when the suite has none)."""
    for variant in load_suite(SUITE).variants:
        if variant.method == name:
            return dict(variant.params)
    return None


def family(method) -> str:
    """``attention`` (the method hooks attention: it acts on every prefill and decode) or ``weights``
    (it only overrides ``apply``: it changes the model once, and the forwards are the dense model's)."""
    return "weights" if type(method).attend is Method.attend and type(method).apply is not Method.apply else "attention"


def instantiate(s: Setup, name: str, dry_weights: bool = True):
    """(method, None) or (None, why it is skipped): methods needing user files or own loops are skipped.

    A method runs with its defaults; one whose defaults do not validate (magnitude and wanda need a
    sparsity or a pattern) runs with the parameters of its first variant in fidbench.yaml. A dry
    ``apply`` catches methods that cannot run; ``dry_weights=False`` spares it to weight methods,
    whose apply can calibrate for a minute (gptq), for callers that apply them once and check that."""
    try:
        method = build(name, {})
    except ValueError as e:
        params = suite_params(name)
        if params is None:
            return None, f"{name}: needs parameters the benchmark cannot invent ({e})"
        method = build(name, params)
    if getattr(method, "score_sample", None) is not None:
        return None, f"{name}: scores samples with its own loop, outside the engine"
    if dry_weights or family(method) == "attention":
        try:
            with method.apply(s.model, s.loaded):
                pass
        except APPLY_ERRORS as e:
            return None, f"{name}: cannot be applied with default parameters ({e})"
    return method, None


@contextlib.contextmanager
def applied(s: Setup, method, spent: list[float]):
    """``method.apply`` with the time of entering it appended to ``spent`` (a weight method's one-time cost)."""
    _sync(s.device)
    t0 = time.perf_counter()
    with method.apply(s.model, s.loaded) as model:
        _sync(s.device)
        spent.append(time.perf_counter() - t0)
        yield model


# ---------------------------------------------------------------- targets

def target1(s: Setup, notes: list[str]) -> list[dict]:
    a = s.args
    names, skipped = methods_for(ENGINE_METHODS, a.methods)
    notes += skipped
    p_ids = long_prompt(s, "summarization", a.prompt_tokens, "Summarize each of the news articles above in a few sentences.")
    ref = reference(s, p_ids, a.reference_tokens)
    full = torch.tensor([p_ids + ref.g_ids[:-1]], device=s.device)
    n = len(ref.g_ids)

    @torch.inference_mode()
    def bare():
        # The floor: one forward of prompt + reference computing exactly the N logits fidbench scores.
        return s.model(input_ids=full, logits_to_keep=n).logits[0].float()

    methods = {}
    for name in names:
        method, why = instantiate(s, name)
        if method is None:
            notes.append(why)
        else:
            methods[name] = method
    runs = {name: {"bare": [], "ours": [], "step": []} for name in methods}
    for r in range(a.repeats):
        for name, method in methods.items():
            mode = engine.resolve_mode(method, "auto")
            out = runs[name]
            out["bare"].append(timed(s.device, bare))
            with method.apply(s.model, s.loaded) as model:
                def ours():
                    forced = engine.teacher_force(model, method, p_ids, ref.g_ids, mode)
                    metrics.score(forced.logits, ref)
                    return forced
                out["ours"].append(timed(s.device, ours))
                out["step"].append(timed(s.device, lambda: engine.teacher_force(model, method, p_ids, ref.g_ids, "stepwise")))
            print(f"  target 1 repeat {r + 1}/{a.repeats} {name}: bare {out['bare'][-1][1]:.2f}s, "
                  f"ours {out['ours'][-1][1]:.2f}s (decode {out['ours'][-1][0].decode_s:.2f}s), "
                  f"stepwise decode {out['step'][-1][0].decode_s:.2f}s", flush=True)
            if r:  # the first repeat's logits give the agreement; later ones would only fill memory
                out["bare"][-1] = (None, *out["bare"][-1][1:])
                out["ours"][-1][0].logits = out["step"][-1][0].logits = None
    records = []
    for name, out in runs.items():
        ours_logits, step_logits, bare_logits = out["ours"][0][0].logits, out["step"][0][0].logits, out["bare"][0][0]
        pair = paired([t for _, t, _ in out["ours"]], [t for _, t, _ in out["bare"]])
        chosen = out["ours"][pair["index"]][0]
        records.append(record(
            1, f"{name}: score {len(p_ids)}+{n} tokens ({engine.resolve_mode(methods[name], 'auto')})", "forward",
            pair["ours_s"], pair["baseline_s"], agreement(ours_logits, bare_logits) if name == "origin" else None,
            highest([p for _, _, p in out["ours"]]), highest([p for _, _, p in out["bare"]]),
            ratios=pair["ratios"], prefill_s=chosen.prefill_s, decode_s=chosen.decode_s,
        ))
        pair = paired([f.decode_s for f, _, _ in out["ours"]], [f.decode_s for f, _, _ in out["step"]])
        records.append(record(
            1, f"{name}: decode {n} tokens", "stepwise", pair["ours_s"], pair["baseline_s"],
            agreement(ours_logits, step_logits), highest([p for _, _, p in out["ours"]]),
            highest([p for _, _, p in out["step"]]), ratios=pair["ratios"],
        ))
    return records


def target2(s: Setup, notes: list[str]) -> list[dict]:
    a = s.args
    names, skipped = methods_for(sorted(REGISTRY), a.methods)
    notes += skipped
    p_ids = long_prompt(s, "summarization", a.prompt_tokens, "Summarize each of the news articles above in a few sentences.")
    ref = reference(s, p_ids, a.reference_tokens)
    methods = {"origin": build("origin", {})}
    apply_s = {"origin": []}
    frozen = {}  # weight methods: the model they made, built once (gptq calibrates for a minute) and reused
    for name in names:
        if name == "origin":
            continue
        method, why = instantiate(s, name, dry_weights=False)
        if method is None:
            notes.append(why)
            continue
        apply_s[name] = []
        if family(method) == "weights":
            try:
                with applied(s, method, apply_s[name]) as model:
                    frozen[name] = copy.deepcopy(model)
            except APPLY_ERRORS as e:
                notes.append(f"{name}: cannot be applied with default parameters ({e})")
                continue
        methods[name] = method
    runs = {name: [] for name in methods}
    for r in range(a.repeats):
        for name, method in methods.items():  # origin first in every round: each method sits beside it
            use = contextlib.nullcontext(frozen[name]) if name in frozen else applied(s, method, apply_s[name])
            with use as model:
                forced, _, peak = timed(s.device, lambda: engine.teacher_force(model, method, p_ids, ref.g_ids[:1], "auto"))
            runs[name].append((forced.prefill_s, peak))
        print(f"  target 2 repeat {r + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1][0]:.2f}s" for k, v in runs.items()), flush=True)
    origin = runs["origin"]
    records = []
    for name, out in runs.items():
        if name != "origin":
            pair = paired([t for t, _ in out], [t for t, _ in origin])
            records.append(record(2, f"{name}: prefill {len(p_ids)} tokens", "origin", pair["ours_s"], pair["baseline_s"],
                                  None, highest([p for _, p in out]), highest([p for _, p in origin]), ratios=pair["ratios"],
                                  family=family(methods[name]), params=methods[name].params(),
                                  apply_s=statistics.median(apply_s[name])))
    return records


def _child_args(a) -> list[str]:
    return ["--device", a.device, "--dtype", a.dtype, "--model", a.model] + (["--threads", str(a.threads)] if a.threads else [])


def target3(s: Setup, notes: list[str]) -> list[dict]:
    a = s.args
    names, skipped = methods_for(sorted(REGISTRY), a.methods)
    notes += skipped
    p_ids = long_prompt(s, "passkey", a.long_tokens, "What is the pass key? Answer with the number only.")
    ref = reference(s, p_ids, a.long_reference_tokens)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"p_ids": p_ids, "g_ids": ref.g_ids}, fh)
    results = {}
    # glibc keeps freed tensors in a fragmented heap, so the same run's peak RSS varied by 600 MB;
    # with large blocks mmapped, freed memory goes back at once and the peak is the live memory's.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for name in ["origin"] + [n for n in names if n != "origin"]:
        cmd = [sys.executable, __file__, "--child", "long", "--method", name, "--input", fh.name] + _child_args(a)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            notes.append(f"{name}: the {len(p_ids)}-token run failed: {tail}")
            print(f"  target 3 {name}: FAILED {tail}", flush=True)
            continue
        results[name] = json.loads(lines[-1])
        if results[name].get("skipped"):
            notes.append(results[name]["skipped"])
            del results[name]
            continue
        print(f"  target 3 {name}: {results[name]['seconds']:.1f}s, peak RSS {results[name]['peak_rss_mb']:.0f} MB", flush=True)
    os.unlink(fh.name)
    if "origin" not in results:
        notes.append("target 3: origin's long run failed, nothing to compare with")
        return []
    base = results["origin"]
    out = []
    for name, res in results.items():
        if name == "origin":
            continue
        cuda = {"peak_cuda_mb": res["peak_cuda_mb"], "baseline_peak_cuda_mb": base["peak_cuda_mb"]} if res["peak_cuda_mb"] else {}
        out.append(record(3, f"{name}: {len(p_ids)}+{len(ref.g_ids)} tokens ({res['mode']})", "origin", res["seconds"],
                          base["seconds"], None, res["peak_rss_mb"], base["peak_rss_mb"], rss_before_mb=res["rss_before_mb"],
                          baseline_rss_before_mb=base["rss_before_mb"], load_peak_rss_mb=res["load_peak_rss_mb"],
                          family=res["family"], params=res["params"], **cuda))
    return out


def child_long(args) -> dict:
    """One method on the long prompt in this fresh process: its time and the process's peak RSS while it ran.

    The peak is the whole process's resident set (model included), but loading's own transient peak
    (higher than a long prefill's on CPU) is excluded by resetting the high-water mark after the load.
    """
    s = setup(args, fingerprint=False)
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    data = json.loads(Path(args.input).read_text())
    method, why = instantiate(s, args.method, dry_weights=False)
    if method is None:
        return {"skipped": why}
    mode = engine.resolve_mode(method, "auto")
    with contextlib.ExitStack() as stack:
        try:
            model = stack.enter_context(method.apply(s.model, s.loaded))
        except APPLY_ERRORS as e:
            return {"skipped": f"{args.method}: cannot be applied with default parameters ({e})"}
        # Reset after apply: a weight method's saved copy of the weights it changed (to restore them
        # on exit) is resident before the mark and so counted in the peak, like the model itself.
        with Peak(args.device) as peak:
            rss_before = _status_mb("VmRSS")
            _sync(args.device)
            t0 = time.perf_counter()
            engine.teacher_force(model, method, data["p_ids"], data["g_ids"], mode)
            _sync(args.device)
            seconds = time.perf_counter() - t0
    return {"seconds": seconds, "mode": mode, "load_peak_rss_mb": load_peak, "rss_before_mb": rss_before,
            "peak_rss_mb": peak.rss_mb, "peak_cuda_mb": peak.cuda_mb, "family": family(method), "params": method.params()}


def target4(s: Setup, notes: list[str]) -> list[dict]:
    a = s.args
    cmd = [sys.executable, __file__, "--child", "suite", "--limit", str(a.suite_limit)] + _child_args(a)
    runs = []
    for attempt in ("first", "second"):  # the first makes sure every reference is cached
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            notes.append(f"target 4: the {attempt} suite run failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
            return []
        runs.append(json.loads(lines[-1]))
        print(f"  target 4 {attempt} run: {runs[-1]['total_s']:.1f}s, forwards {runs[-1]['forward_s']:.1f}s, "
              f"generated {runs[-1]['generated']}", flush=True)
    second = runs[1]
    rec = record(4, f"origin: second run, suite limit {a.suite_limit} ({second['prompts']} prompts)", "forward",
                 second["total_s"], second["forward_s"], None, second["peak_rss_mb"], None,
                 ratio=(second["total_s"] - second["forward_s"]) / second["total_s"],
                 generated=second["generated"], first_run_generated=runs[0]["generated"], outside=second["outside"])
    if second["generated"]:
        notes.append(f"target 4: the second run generated {second['generated']} references (should be 0)")
    return [rec]


def child_suite(args) -> dict:
    """Bench.load + Bench.run(origin) of the default suite, with model forwards timed apart."""
    suite = load_suite(SUITE)
    spec = model_spec(args)
    suite.models = [spec]
    case = next(c for c in suite.cases() if c.variant.method == "origin")
    spent = {"forward": 0.0}
    real_load = models.load

    def load_timed(*a, **kw):
        model, tok = real_load(*a, **kw)
        started = []

        def before(*_):
            _sync(args.device)
            started.append(time.perf_counter())

        def after(*_):
            _sync(args.device)
            spent["forward"] += time.perf_counter() - started.pop()

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)
        return model, tok

    models.load = load_timed
    parts = {}
    t0 = time.perf_counter()
    bench = Bench(suite, limit=args.limit, progress=False)
    loaded = bench.load(spec)
    parts["load_s"] = time.perf_counter() - t0
    bench.run(case)
    total = time.perf_counter() - t0
    return {"total_s": total, "forward_s": spent["forward"], "generated": bench.generated,
            "prompts": sum(r is not None for r in loaded.references), "outside": parts,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# ---------------------------------------------------------------- records and table

def record(target, case, baseline, ours_s, baseline_s, agree, ours_peak, base_peak, ratio=None, **extra) -> dict:
    rss = lambda p: p.rss_mb if isinstance(p, Peak) else p  # noqa: E731
    rec = {
        "target": target, "case": case, "method": case.split(":")[0], "baseline": baseline, "ours_s": ours_s, "baseline_s": baseline_s,
        "ratio": ratio if ratio is not None else ours_s / baseline_s, "argmax_agreement": agree,
        "peak_rss_mb": rss(ours_peak), "baseline_peak_rss_mb": rss(base_peak),
    }
    if isinstance(ours_peak, Peak) and ours_peak.cuda_mb is not None:
        rec["peak_cuda_mb"] = ours_peak.cuda_mb
        rec["baseline_peak_cuda_mb"] = base_peak.cuda_mb if isinstance(base_peak, Peak) else None
    rec.update(extra)
    criterion, check = CRITERIA[(target, baseline)]
    rec["criterion"], rec["met"] = criterion, bool(check(rec))
    return rec


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def table(records: list[dict]) -> str:
    head = ["target", "case", "baseline", "ours s", "baseline s", "ratio", "argmax agree", "peak MB (ours / base)", "target met"]
    rows = []
    for r in records:
        peak = f"{r['peak_rss_mb']:.0f} / {r['baseline_peak_rss_mb']:.0f}" if r.get("baseline_peak_rss_mb") else f"{r['peak_rss_mb']:.0f}"
        if r.get("peak_cuda_mb") is not None:
            peak += f" (cuda {r['peak_cuda_mb']:.0f} / {r.get('baseline_peak_cuda_mb') or 0:.0f})"
        agree = "" if r["argmax_agreement"] is None else f"{100 * r['argmax_agreement']:.1f} %"
        rows.append([str(r["target"]), r["case"], r["baseline"], f"{r['ours_s']:.3f}", f"{r['baseline_s']:.3f}",
                     f"{r['ratio']:.3f}", agree, peak, f"{'yes' if r['met'] else 'NO'} ({r['criterion']})"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def tables(records: list[dict]) -> str:
    """One table per device, dtype and command, each under a line saying where and how it was measured."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("device"), r.get("dtype"), r.get("command")), []).append(r)
    return "\n\n".join(f"{device}, {dtype}: `{command}`\n\n{table(rs)}" for (device, dtype, command), rs in groups.items())


def save(path: Path, records: list[dict]) -> None:
    """Write last.json: this run's records replace those of the same device, dtype, target and method."""
    key = lambda r: (r.get("device"), r.get("dtype"), r["target"], r.get("method"))  # noqa: E731
    new = {key(r) for r in records}
    old = json.loads(path.read_text()) if path.exists() else []
    kept = [r for r in old if key(r) not in new]
    path.write_text(json.dumps(sorted(kept + records, key=lambda r: (r.get("device") or "", r.get("dtype") or "", r["target"])),
                               indent=1) + "\n")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", default="1,2,3,4", help="comma-separated targets to run (default: all)")
    p.add_argument("--methods", help="comma-separated methods (default: target 1 the engine set, 2-3 every registered one)")
    p.add_argument("--quick", action="store_true", help="one repeat, a 2,000-token long prompt, one prompt per dataset")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the median-ratio pair is reported (default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=sorted(models.DTYPES), help="default fp32")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or model directory")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="targets 1-2 prompt length (default 1024)")
    p.add_argument("--reference-tokens", type=int, default=128, help="target 1 reference length (default 128)")
    p.add_argument("--long-tokens", type=int, default=8000, help="target 3 prompt length (default 8000)")
    p.add_argument("--long-reference-tokens", type=int, default=8, help="target 3 reference length (default 8)")
    p.add_argument("--suite-limit", type=int, default=2, help="target 4: prompts per dataset of fidbench.yaml (default 2)")
    p.add_argument("--profile", metavar="METHOD", help="profile target 1's case for METHOD with torch.profiler, then exit")
    p.add_argument("--out", type=Path, default=OUT, help="results file (default benchmarks/last.json)")
    p.add_argument("--show", action="store_true", help="print the table of the results file and exit")
    p.add_argument("--merge", type=Path, metavar="JSON",
                   help="merge the records of another run's --out file (e.g. a GPU machine's) into the results file and exit")
    p.add_argument("--child", choices=["long", "suite"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.targets = sorted({int(t) for t in a.targets.split(",")})
    a.methods = a.methods.split(",") if a.methods else None
    if a.quick:
        a.repeats, a.long_tokens, a.suite_limit = 1, min(a.long_tokens, 2000), 1
    return a


def profile(s: Setup) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    a = s.args
    p_ids = long_prompt(s, "summarization", a.prompt_tokens, "Summarize each of the news articles above in a few sentences.")
    ref = reference(s, p_ids, a.reference_tokens)
    method = build(a.profile, {})
    mode = engine.resolve_mode(method, "auto")
    with method.apply(s.model, s.loaded) as model:
        engine.teacher_force(model, method, p_ids[:64], ref.g_ids[:4], mode)  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
        with torch_profile(activities=activities) as prof:
            forced = engine.teacher_force(model, method, p_ids, ref.g_ids, mode)
            t0 = time.perf_counter()
            metrics.score(forced.logits, ref)
            score_s = time.perf_counter() - t0
    print(f"{a.profile}: prefill {forced.prefill_s:.3f}s, decode {forced.decode_s:.3f}s ({mode}), score {score_s:.3f}s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main(argv=None) -> None:
    a = parse(argv)
    if a.show:
        print(tables(json.loads(a.out.read_text())))
        return
    if a.merge:
        records = json.loads(a.merge.read_text())
        for r in records:  # records written before `method` was a field name it as their case does
            r.setdefault("method", r["case"].split(":")[0])
        save(a.out, records)
        print(f"merged {len(records)} records of {a.merge} into {a.out}")
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        out = child_long(a) if a.child == "long" else child_suite(a)
        print(json.dumps(out), flush=True)
        return
    s = setup(a)
    if a.profile:
        profile(s)
        return
    with torch.inference_mode():  # warm-up: the first forward of a process pays one-time setup
        s.model(input_ids=torch.tensor([list(range(64))], device=a.device))
    device = device_name(a.device)
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"fidbench benchmark on {device}, {a.dtype}, {a.model}, {a.repeats} repeat(s): {command.strip()}", flush=True)
    notes, records = [], []
    for t in a.targets:
        t0 = time.perf_counter()
        records += {1: target1, 2: target2, 3: target3, 4: target4}[t](s, notes)
        print(f"  target {t} took {time.perf_counter() - t0:.0f}s", flush=True)
    for r in records:
        r.update(device=device, dtype=a.dtype, model=a.model, repeats=a.repeats, quick=a.quick, command=command.strip())
    save(a.out, records)
    print()
    print(table(records))
    for note in notes:
        print(f"note: {note}")
    print(f"\nwritten: {a.out}")


if __name__ == "__main__":
    main()
