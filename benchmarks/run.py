#!/usr/bin/env python
"""fidbench's performance benchmark: each target measured side by side with its baseline.

1. engine: scoring a 1,024-token prompt's 128-token reference (``teacher_force`` + ``metrics.score``)
   vs one bare forward of the same tokens (``forward``), and origin's vs the two bare model calls the
   engine makes (``forwards``); the parallel decode vs the token-by-token loop (``stepwise``); each
   method's stepwise decode per token vs origin's (``origin step``);
2. method overhead: each method's prefill vs origin's (``origin``);
3. long prompts: a ``--long-tokens`` prompt per method, peak memory and time vs origin's (``origin``):
   CUDA peak in-process on a GPU, peak RSS in a fresh process per method on a CPU;
4. the harness: Bench.load + Bench.run(origin) of the default suite in a fresh process, references
   cached: the time outside model forwards (``forward``), and the first case vs the second (``second case``).

    python benchmarks/run.py                                          # every target: CPU, fp32, the default model
    python benchmarks/run.py --targets 1,2 --quick                    # a quick look
    python benchmarks/run.py --shape 8b --device cuda --dtype bf16    # Llama-3.1-8B's shape, random weights
    python benchmarks/run.py --show                                   # the tables of benchmarks/last.json

Baseline and ours run side by side, ``--repeats`` times; a row shows the repeat whose ratio is the
median. Every record is written to ``--out`` as soon as it is measured (records of other devices,
dtypes, models, targets and methods there are kept), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # a fresh clone runs without installing fidbench first

import torch  # noqa: E402

from fidbench import datasets, engine, metrics, models  # noqa: E402
from fidbench.harness import Bench, Loaded  # noqa: E402
from fidbench.methods import REGISTRY, build  # noqa: E402
from fidbench.reference import Store  # noqa: E402
from fidbench.suite import ModelSpec  # noqa: E402
from fidbench.suite import load as load_suite  # noqa: E402

SUITE = ROOT / "fidbench.yaml"
OUT = ROOT / "benchmarks" / "last.json"
ENGINE_METHODS = ("origin", "topk", "streamingllm", "snapkv", "h2o", "tova")  # target 1
LLAMA = dict(num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0)
SHAPES = {  # random-weight Llamas of real shapes (--shape); the vocabulary is the tokenizer's
    "8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "3b": dict(LLAMA, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               tie_word_embeddings=True),
    "1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               tie_word_embeddings=True),
    "tiny": dict(LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),  # a test aid: exercises every path in seconds on a CPU
}
SUMMARIZE = ("summarization", "Summarize each of the news articles above in a few sentences.")
PASSKEY = ("passkey", "What is the pass key? Answer with the number only.")


def criterion(r: dict) -> tuple[str, bool]:
    """What a record must meet (the targets in benchmarks/README.md), and whether it does."""
    target, base, ratio = r["target"], r["baseline"], r["ratio"]
    if target == 1 and base == "forward":
        bound = 1.1 if r["method"] == "origin" else 1.3
        return f"ratio <= {bound}", ratio <= bound
    if target == 1 and base == "forwards":
        return "ratio <= 1.1", ratio <= 1.1
    if target == 1 and base == "stepwise":
        return "ratio <= 1/15, argmax >= 99.9 %", ratio <= 1 / 15 and (r["argmax_agreement"] or 0) >= 0.999
    if target == 1:  # origin step: 1.5x for the stepwise-only methods and for H2O / TOVA, which evict every step
        bound = 1.5 if r["mode"] == "stepwise" or r["method"] in ("h2o", "tova") else 1.2
        return f"ratio <= {bound}", ratio <= bound
    if target == 2:
        bound = 2.0 if r["method"] == "sage-attention" else 1.3
        return f"ratio <= {bound}", ratio <= bound
    if target == 3 and r.get("peak_cuda_mb"):
        peak = r["peak_cuda_mb"] / r["baseline_peak_cuda_mb"]
        return "cuda peak and time <= 1.5x origin", peak <= 1.5 and ratio <= 1.5
    if target == 3:
        return "peak RSS <= 1.5x origin", r["peak_rss_mb"] <= 1.5 * r["baseline_peak_rss_mb"]
    if base == "forward":
        return "outside forwards < 10 %", ratio < 0.10
    return "first case <= 1.2x the second", ratio <= 1.2


# ---------------------------------------------------------------- measuring

def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def hwm_mb() -> float:
    """This process's peak resident set: VmHWM (Linux, resettable), else ru_maxrss (since the process started)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclasses.dataclass
class Measure:
    out: object
    seconds: float  # wall time, the device synchronized at both ends
    host_s: float  # until the host returned from the call: on a GPU, the time spent queueing work
    rss_mb: float  # peak resident set during the call
    cuda_mb: float | None  # peak CUDA memory allocated during the call


def measure(device: str, fn) -> Measure:
    """Run ``fn()`` with the process's memory peaks reset first (RSS via clear_refs, CUDA's allocator)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM back to the current RSS
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    host = time.perf_counter() - t0
    sync(device)
    seconds = time.perf_counter() - t0
    return Measure(out, seconds, host, hwm_mb(), torch.cuda.max_memory_allocated() / 2**20 if cuda else None)


class TimeBox(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: float | None):
    """Raise ``TimeBox`` in the block after ``seconds`` (SIGALRM; None: no limit)."""
    if not seconds:
        yield
        return

    def stop(*_):
        raise TimeBox(f"stopped after its time box of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.argmax(-1) == b.argmax(-1)).double().mean().item()


# ---------------------------------------------------------------- model, prompts, references

def model_spec(args) -> ModelSpec:
    default = load_suite(SUITE).models[0]
    if args.shape:
        return ModelSpec(f"llama-{args.shape}-random", tokenizer=args.tokenizer or default.path, dtype=args.dtype,
                         device=args.device, max_length=SHAPES[args.shape]["max_position_embeddings"])
    name = default.name if args.model == default.path else Path(args.model).name
    return dataclasses.replace(default, path=args.model, name=name, dtype=args.dtype, device=args.device)


def make_model(args, spec: ModelSpec):
    """(model, tokenizer): ``--shape``'s random-weight Llama built in place (seeded: every process builds
    the same weights, so its references are cached), or the model directory / embedded model loaded."""
    if not args.shape:
        return models.load(spec.path, spec.tokenizer, spec.dtype, spec.device)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(models.resolve(spec.tokenizer), local_files_only=True)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         **SHAPES[args.shape])
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=models.DTYPES[args.dtype], attn_implementation="sdpa")
    return model.eval(), tok


@dataclasses.dataclass
class Setup:
    args: argparse.Namespace
    loaded: Loaded  # the harness's context (methods that calibrate read its prompts)

    @property
    def model(self):
        return self.loaded.model

    @property
    def device(self) -> str:
        return self.args.device


def setup(args) -> Setup:
    """The model through the harness's own ``Bench.load`` (warm-up included). The benchmark scores its own
    prompts, so every suite dataset is loaded as calibration data only: methods read it, no reference is made."""
    suite = load_suite(SUITE)
    spec = model_spec(args)
    suite.models, suite.datasets = [spec], [dataclasses.replace(d, scored=False) for d in suite.datasets]
    model, tokenizer = make_model(args, spec)
    return Setup(args, Bench(suite, progress=False).load(spec, model=model, tokenizer=tokenizer))


def long_prompt(s: Setup, dataset_instruction: tuple[str, str], n_tokens: int) -> list[int]:
    """A prompt of exactly ``n_tokens``: the dataset's documents joined, rendered with the chat
    template, and cut in the middle like the harness's overlong policy (head and tail kept)."""
    dataset, instruction = dataset_instruction
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
    """The base model's greedy ``n``-token continuation, end of sequence ignored so it has exactly ``n``
    tokens; cached in the benchmark's own store (never mixed with suite references)."""
    store = Store(models.cache_root() / "benchmark", s.loaded.spec.name, s.loaded.fingerprint, n,
                  device=models.device_key(s.model))
    return store.get(s.model, [datasets.Prompt("benchmark", 0, p_ids)], progress=False)[0]


def suite_params(name: str) -> dict | None:
    """The parameters of the first variant of ``name`` in fidbench.yaml (None when the suite has none)."""
    return next((dict(v.params) for v in load_suite(SUITE).variants if v.method == name), None)


def instantiate(s: Setup, name: str):
    """(method, None), or (None, why it is skipped). A method runs with its defaults, or with its first
    suite variant's parameters when its defaults do not validate (magnitude, wanda need a sparsity).
    Methods of kind "model" and "own_loop" need the user's files; an attention method is applied once
    dry, which catches one that cannot run on this model."""
    if name not in REGISTRY:
        return None, f"{name}: not registered in this checkout (skipped; rerun after it is merged)"
    try:
        method = build(name, {})
    except ValueError as e:
        params = suite_params(name)
        if params is None:
            return None, f"{name}: needs parameters the benchmark cannot invent ({e})"
        method = build(name, params)
    if method.kind in ("model", "own_loop"):
        return None, f"{name}: of kind {method.kind!r}, it needs the user's files"
    if method.kind == "attention":
        try:
            with method.apply(s.model, s.loaded):
                pass
        except (ValueError, OSError, RuntimeError) as e:
            return None, f"{name}: cannot be applied with default parameters ({e})"
    return method, None


def methods_for(s: Setup, default, notes: list[str]) -> dict:
    """name -> method for a target: ``--methods`` or ``default``, less ``--skip``; origin first."""
    names = [n for n in (s.args.methods or default) if n not in s.args.skip]
    methods = {}
    for name in sorted(set(names), key=lambda n: (n != "origin", names.index(n))):
        method, why = instantiate(s, name)
        if method is None:
            notes.append(why)
        else:
            methods[name] = method
    return methods


# ---------------------------------------------------------------- records

class Recorder:
    """Records of this run: each written to ``path`` as soon as it is made, merged with the file's others."""

    def __init__(self, args, meta: dict):
        self.path, self.meta, self.records = args.out, meta, []

    def add(self, target: int, method: str, case: str, baseline: str, ours: float, base: float, **extra) -> dict:
        r = {"target": target, "case": f"{method}: {case}", "method": method, "baseline": baseline, "ours_s": ours,
             "baseline_s": base, "ratio": ours / base, "argmax_agreement": None, **extra, **self.meta}
        r["criterion"], r["met"] = criterion(r)
        self.records.append(r)
        save(self.path, [r])
        print(f"  target {target} {r['case']} vs {baseline}: {ours:.4f}s / {base:.4f}s = {r['ratio']:.3f} "
              f"({'met' if r['met'] else 'NOT met'}: {r['criterion']})", flush=True)
        return r

    def pair(self, target: int, method: str, case: str, baseline: str, ours: list, base: list,
             value=lambda m: m.seconds, **extra) -> dict:
        """Record the repeat whose ours / baseline ratio (of ``value`` of each Measure) is the median, the lower one
        for an even count: each repeat ran ours right beside its baseline, so a pair shares the machine's load."""
        ratios = [value(o) / value(b) for o, b in zip(ours, base)]
        i = ratios.index(statistics.median_low(ratios))
        o, b = ours[i], base[i]
        if o.cuda_mb is not None:
            extra.update(peak_cuda_mb=o.cuda_mb, baseline_peak_cuda_mb=b.cuda_mb)
        if isinstance(o.out, engine.Forced):
            extra.update(prefill_s=o.out.prefill_s, decode_s=o.out.decode_s)
        return self.add(target, method, case, baseline, value(o), value(b), ratios=ratios, host_s=o.host_s,
                        baseline_host_s=b.host_s, peak_rss_mb=o.rss_mb, baseline_peak_rss_mb=b.rss_mb, **extra)


def key(r: dict) -> tuple:
    return r.get("device"), r.get("dtype"), r.get("model"), r["target"], r.get("method"), r["baseline"]


def save(path: Path, records: list[dict]) -> None:
    """Merge ``records`` into the results file: they replace those of the same device, dtype, model, target,
    method and baseline; written atomically, so a run killed mid-write keeps the previous file."""
    new = {key(r) for r in records}
    old = json.loads(path.read_text()) if path.exists() else []
    merged = sorted([r for r in old if key(r) not in new] + records,
                    key=lambda r: (r.get("device") or "", r.get("dtype") or "", r.get("model") or "", r["target"]))
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, path)


def table(records: list[dict]) -> str:
    head = ["target", "case", "baseline", "ours s", "baseline s", "ratio", "argmax agree", "peak MB (ours / base)",
            "target met"]
    rows = []
    for r in records:
        peak = f"{r['peak_rss_mb']:.0f} / {r['baseline_peak_rss_mb']:.0f}" if r.get("baseline_peak_rss_mb") else ""
        if r.get("peak_cuda_mb") is not None:
            peak += f" (cuda {r['peak_cuda_mb']:.0f} / {r.get('baseline_peak_cuda_mb') or 0:.0f})"
        agree = "" if r["argmax_agreement"] is None else f"{100 * r['argmax_agreement']:.1f} %"
        rows.append([str(r["target"]), r["case"], r["baseline"], f"{r['ours_s']:.3f}", f"{r['baseline_s']:.3f}",
                     f"{r['ratio']:.3f}", agree, peak, f"{'yes' if r['met'] else 'NO'} ({r['criterion']})"])
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def tables(records: list[dict]) -> str:
    """One table per device, dtype, model and command, under a line saying where and how it was measured."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("device"), r.get("dtype"), r.get("model"), r.get("command")), []).append(r)
    return "\n\n".join(f"{d}, {t}, {m}: `{c}`\n\n{table(rs)}" for (d, t, m, c), rs in groups.items())


# ---------------------------------------------------------------- targets

def target1(s: Setup, rec: Recorder, notes: list[str]) -> None:
    a, model, device = s.args, s.model, s.device
    p_ids = long_prompt(s, SUMMARIZE, a.prompt_tokens)
    ref = reference(s, p_ids, a.reference_tokens)
    n = len(ref.g_ids)
    full = torch.tensor([p_ids + ref.g_ids[:-1]], device=device)
    prompt, rest = full[:, : len(p_ids)], full[:, len(p_ids) :]

    @torch.inference_mode()
    def bare():  # the floor: one forward of prompt + reference computing exactly the N logits fidbench scores
        return model(input_ids=full, logits_to_keep=n).logits[0]

    @torch.inference_mode()
    def forwards():  # the engine's two model calls and nothing else: prefill (last position), then decode
        _, cache = engine.call_model(model, None, input_ids=prompt, logits_to_keep=1)
        return engine.call_model(model, cache, input_ids=rest)[0]

    origin_step = None  # origin's stepwise decode per token, the baseline of every method's
    for name, method in methods_for(s, a.engine_methods, notes).items():
        parallel = method.parallel_exact
        runs = {"bare": [], "forwards": [], "ours": [], "step": []}
        try:
            with time_box(a.time_box):
                for r in range(a.repeats):
                    if parallel:
                        runs["bare"].append(measure(device, bare))
                    if name == "origin":
                        runs["forwards"].append(measure(device, forwards))
                    with method.apply(model, s.loaded) as m:
                        if parallel:
                            def ours(m=m, method=method):
                                forced = engine.teacher_force(m, method, p_ids, ref.g_ids, "parallel")
                                metrics.score(forced.logits, ref)
                                return forced
                            runs["ours"].append(measure(device, ours))

                        def step(m=m, method=method):
                            return engine.teacher_force(m, method, p_ids, ref.g_ids, "stepwise")
                        runs["step"].append(measure(device, step))
                    if r:  # the first repeat's logits give the agreement; later ones would only fill memory
                        for x in runs["bare"][-1:] + runs["forwards"][-1:]:
                            x.out = None
                        for x in runs["ours"][-1:] + runs["step"][-1:]:
                            x.out.logits = None
        except TimeBox as e:
            notes.append(f"target 1 {name}: {e} ({len(runs['step'])} of {a.repeats} repeats done)")
        if not runs["step"]:
            continue
        step_token = statistics.median(x.out.decode_s / (n - 1) for x in runs["step"])
        if parallel and runs["ours"]:
            ours, score = runs["ours"], f"score {len(p_ids)}+{n} tokens (parallel)"
            logits = ours[0].out.logits
            rec.pair(1, name, score, "forward", ours, runs["bare"],
                     argmax_agreement=agreement(logits, runs["bare"][0].out.float()) if name == "origin" else None)
            if name == "origin":
                rec.pair(1, name, score, "forwards", ours, runs["forwards"])
            rec.pair(1, name, f"decode {n} tokens", "stepwise", ours, runs["step"], value=lambda m: m.out.decode_s,
                     argmax_agreement=agreement(logits, runs["step"][0].out.logits))
        if name == "origin":
            origin_step = step_token
        elif origin_step:
            rec.add(1, name, "stepwise decode per token", "origin step", step_token, origin_step,
                    mode="parallel" if parallel else "stepwise", tokens=n - 1)


def target2(s: Setup, rec: Recorder, notes: list[str]) -> None:
    a, model, device = s.args, s.model, s.device
    p_ids = long_prompt(s, SUMMARIZE, a.prompt_tokens)
    methods = methods_for(s, sorted(REGISTRY), notes)
    origin = methods.pop("origin", None) or build("origin", {})

    def prefill(m, method) -> Measure:  # a one-token reference: the prefill alone
        return measure(device, lambda: engine.teacher_force(m, method, p_ids, p_ids[-1:], "auto"))

    for name, method in methods.items():
        ours, base, apply_s = [], [], None
        try:
            with time_box(a.time_box):
                if method.kind == "weights":  # apply once (gptq calibrates for a minute): origin's repeats just before
                    base = [prefill(model, origin) for _ in range(a.repeats)]
                    t0 = time.perf_counter()
                    with method.apply(model, s.loaded) as m:
                        sync(device)
                        apply_s = time.perf_counter() - t0
                        ours = [prefill(m, method) for _ in range(a.repeats)]
                else:
                    for _ in range(a.repeats):
                        base.append(prefill(model, origin))
                        with method.apply(model, s.loaded) as m:
                            ours.append(prefill(m, method))
        except TimeBox as e:
            notes.append(f"target 2 {name}: {e}")
        if not ours:
            continue
        rec.pair(2, name, f"prefill {len(p_ids)} tokens", "origin", ours, base, value=lambda m: m.out.prefill_s,
                 kind=method.kind, params=method.params(), apply_s=apply_s)


def long_run(s: Setup, name: str, p_ids: list[int], g_ids: list[int]) -> dict:
    """One method over the long prompt: its time and the peak memory during it (reset after ``apply``,
    so a weight method's saved copy of the weights counts like the model itself)."""
    method, why = instantiate(s, name)
    if method is None:
        return {"skipped": why}
    mode = engine.resolve_mode(method, "auto")
    with time_box(s.args.time_box), method.apply(s.model, s.loaded) as m:
        run = measure(s.device, lambda: engine.teacher_force(m, method, p_ids, g_ids, mode))
    return {"seconds": run.seconds, "mode": mode, "rss_mb": run.rss_mb, "cuda_mb": run.cuda_mb,
            "kind": method.kind, "params": method.params()}


def child_args(a) -> list[str]:
    args = ["--device", a.device, "--dtype", a.dtype, "--model", a.model]
    args += ["--shape", a.shape] if a.shape else []
    args += ["--tokenizer", a.tokenizer] if a.tokenizer else []
    args += ["--time-box", str(a.time_box)] if a.time_box else []
    return args + (["--threads", str(a.threads)] if a.threads else [])


def child(cmd: list[str], env=None) -> dict:
    """Run ``run.py`` in a fresh process; its last JSON line, or {"failed": the last line of its errors}."""
    proc = subprocess.run([sys.executable, __file__, *cmd], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"failed": (proc.stderr.strip().splitlines() or ["(no output)"])[-1]}
    return json.loads(lines[-1])


def target3(s: Setup, rec: Recorder, notes: list[str]) -> None:
    """On a GPU each method runs in this process (CUDA's peak is reset per call); on a CPU in a fresh
    process each, since freed memory stays in a process's resident set."""
    a = s.args
    p_ids = long_prompt(s, PASSKEY, a.long_tokens)
    g_ids = reference(s, p_ids, a.long_reference_tokens).g_ids
    names = ["origin"] + [n for n in methods_for(s, sorted(REGISTRY), notes) if n != "origin"]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"p_ids": p_ids, "g_ids": g_ids}, fh)
    # glibc keeps freed tensors in a fragmented heap; with large blocks mmapped, freed memory goes back at once.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    base = None
    for name in names:
        if s.device.startswith("cuda"):
            try:
                res = long_run(s, name, p_ids, g_ids)
            except TimeBox as e:
                res = {"failed": str(e)}
        else:
            res = child(["--child", "long", "--method", name, "--input", fh.name] + child_args(a), env)
        if "seconds" not in res:
            notes.append(res.get("skipped") or f"target 3 {name}: the {len(p_ids)}-token run failed: {res['failed']}")
            if name == "origin":
                break
            continue
        print(f"  target 3 {name}: {res['seconds']:.1f}s, peak RSS {res['rss_mb']:.0f} MB"
              + (f", cuda {res['cuda_mb']:.0f} MB" if res["cuda_mb"] else ""), flush=True)
        if name == "origin":
            base = res
            continue
        cuda = {"peak_cuda_mb": res["cuda_mb"], "baseline_peak_cuda_mb": base["cuda_mb"]} if res["cuda_mb"] else {}
        rec.add(3, name, f"{len(p_ids)}+{len(g_ids)} tokens ({res['mode']})", "origin", res["seconds"], base["seconds"],
                peak_rss_mb=res["rss_mb"], baseline_peak_rss_mb=base["rss_mb"], kind=res["kind"], params=res["params"],
                **cuda)
    os.unlink(fh.name)


def target4(s: Setup, rec: Recorder, notes: list[str]) -> None:
    a = s.args
    runs = []
    for attempt in ("first", "second"):  # the first makes sure every reference is cached
        runs.append(child(["--child", "suite", "--suite-limit", str(a.suite_limit)] + child_args(a)))
        if "failed" in runs[-1]:
            notes.append(f"target 4: the {attempt} suite run failed: {runs[-1]['failed']}")
            return
        print(f"  target 4 {attempt} process: {runs[-1]['total_s']:.1f}s, forwards {runs[-1]['forward_s']:.1f}s, "
              f"generated {runs[-1]['generated']}", flush=True)
    r = runs[1]
    if r["generated"]:
        notes.append(f"target 4: the second process generated {r['generated']} references (should be 0)")
    case = f"second process, suite limit {a.suite_limit} ({r['prompts']} prompts)"
    rec.add(4, "origin", case, "forward", r["total_s"] - r["forward_s"], r["total_s"], total_s=r["total_s"],
            forward_s=r["forward_s"], generated=r["generated"], first_run_generated=runs[0]["generated"],
            load_s=r["load_s"])
    first, second = (t["prefill_s"] + t["decode_s"] for t in r["timings"])
    rec.add(4, "origin", "first case of a fresh process (prefill + decode)", "second case", first, second,
            timing=r["timings"])


def child_suite(args) -> dict:
    """Bench.load + Bench.run(origin) twice on the default suite, with the model's forwards timed apart."""
    suite = load_suite(SUITE)
    # Live prefills in both runs: a replayed one would make the second run's prefill the replay, not the warm one
    # the first run is compared with (fidbench.yaml shares prefills).
    suite.share_prefill_gib = 0
    spec = model_spec(args)
    suite.models = [spec]
    case = next(c for c in suite.cases() if c.variant.method == "origin")
    t0 = time.perf_counter()
    model, tok = make_model(args, spec)
    started, spent = [], []

    def before(*_):
        sync(args.device)
        started.append(time.perf_counter())

    def after(*_):
        sync(args.device)
        spent.append(time.perf_counter() - started.pop())

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)
    bench = Bench(suite, limit=args.suite_limit, progress=False)
    loaded = bench.load(spec, model=model, tokenizer=tok)
    load_s = time.perf_counter() - t0
    first = bench.run(case)["timing"]
    total, forward = time.perf_counter() - t0, sum(spent)
    second = bench.run(case)["timing"]
    return {"total_s": total, "forward_s": forward, "load_s": load_s, "generated": bench.generated,
            "prompts": sum(r is not None for r in loaded.references), "timings": [first, second]}


def child_long(args) -> dict:
    data = json.loads(Path(args.input).read_text())
    return long_run(setup(args), args.method, data["p_ids"], data["g_ids"])


# ---------------------------------------------------------------- profile, command line

def profile(s: Setup) -> None:
    """Target 1's case for one method under torch.profiler, and what its parts cost side by side."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    a, device = s.args, s.device
    p_ids = long_prompt(s, SUMMARIZE, a.prompt_tokens)
    ref = reference(s, p_ids, a.reference_tokens)
    method = build(a.profile, suite_params(a.profile) or {})
    mode = engine.resolve_mode(method, "auto")
    full = torch.tensor([p_ids + ref.g_ids[:-1]], device=device)

    @torch.inference_mode()
    def calls():
        _, cache = engine.call_model(s.model, None, input_ids=full[:, : len(p_ids)], logits_to_keep=1)
        return engine.call_model(s.model, cache, input_ids=full[:, len(p_ids) :])[0]

    def median(fn) -> Measure:  # of three
        return sorted((measure(device, fn) for _ in range(3)), key=lambda m: m.seconds)[1]

    with method.apply(s.model, s.loaded) as model:
        bare = median(torch.inference_mode()(lambda: s.model(input_ids=full, logits_to_keep=len(ref.g_ids))))
        two = median(calls)
        forced = median(lambda: engine.teacher_force(model, method, p_ids, ref.g_ids, mode))
        scored = median(lambda: metrics.score(forced.out.logits, ref))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
        with torch_profile(activities=activities) as prof:
            metrics.score(engine.teacher_force(model, method, p_ids, ref.g_ids, mode).logits, ref)
    print(f"{a.profile} ({mode}), {len(p_ids)}+{len(ref.g_ids)} tokens, medians of 3: "
          f"one bare forward {bare.seconds:.3f}s; the engine's two bare model calls {two.seconds:.3f}s "
          f"(host {two.host_s:.3f}s); teacher_force {forced.seconds:.3f}s (prefill {forced.out.prefill_s:.3f}s, "
          f"decode {forced.out.decode_s:.3f}s, host {forced.host_s:.3f}s); metrics.score {scored.seconds:.3f}s")
    print(prof.key_averages().table(sort_by=f"self_{'device' if device.startswith('cuda') else 'cpu'}_time_total",
                                    row_limit=20), flush=True)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--targets", help="comma-separated targets to run (default: all, none with --profile)")
    p.add_argument("--methods", help="comma-separated methods of every target (default: target 1 --engine-methods, "
                   "2-3 every registered one)")
    p.add_argument("--engine-methods", default=",".join(ENGINE_METHODS), help="target 1's default methods")
    p.add_argument("--skip", default="", help="comma-separated methods left out of every target")
    p.add_argument("--quick", action="store_true", help="one repeat, a 2,000-token long prompt, one prompt per dataset")
    p.add_argument("--repeats", type=int, default=5,
                   help="repeats side by side; the median-ratio pair is reported (default 5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=sorted(models.DTYPES), help="default fp32")
    p.add_argument("--model", default="smollm2-135m", help="embedded model name or model directory")
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="instead of --model: a random-weight Llama of Llama-3.1-8B's (8b), Llama-3.2-3B's (3b) "
                   "or -1B's (1b) shape built in place; tiny: a test aid")
    p.add_argument("--tokenizer",
                   help="--shape's tokenizer: a directory or embedded name (default: the default model's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--prompt-tokens", type=int, default=1024, help="targets 1-2 prompt length (default 1024)")
    p.add_argument("--reference-tokens", type=int, default=128, help="target 1 reference length (default 128)")
    p.add_argument("--long-tokens", type=int, default=8000, help="target 3 prompt length (default 8000)")
    p.add_argument("--long-reference-tokens", type=int, default=8, help="target 3 reference length (default 8)")
    p.add_argument("--suite-limit", type=int, default=2,
                   help="target 4: prompts per dataset of fidbench.yaml (default 2)")
    p.add_argument("--time-box", type=float,
                   help="seconds a method may take per target before it is stopped with a note")
    p.add_argument("--profile", metavar="METHOD", help="profile target 1's case for METHOD with torch.profiler first")
    p.add_argument("--out", type=Path, default=OUT, help="results file (default benchmarks/last.json)")
    p.add_argument("--show", action="store_true", help="print the tables of the results file and exit")
    p.add_argument("--merge", type=Path, metavar="JSON",
                   help="merge another run's --out file into the results file and exit")
    p.add_argument("--child", choices=["long", "suite"], help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.targets = sorted({int(t) for t in (a.targets or ("" if a.profile else "1,2,3,4")).split(",") if t})
    a.methods = a.methods.split(",") if a.methods else None
    a.engine_methods = a.engine_methods.split(",")
    a.skip = set(filter(None, a.skip.split(",")))
    if a.quick:
        a.repeats, a.long_tokens, a.suite_limit = 1, min(a.long_tokens, 2000), 1
    return a


def main(argv=None) -> None:
    a = parse(argv)
    if a.show:
        print(tables(json.loads(a.out.read_text())))
        return
    if a.merge:
        records = json.loads(a.merge.read_text())
        save(a.out, records)
        print(f"merged {len(records)} records of {a.merge} into {a.out}")
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child_long(a) if a.child == "long" else child_suite(a)), flush=True)
        return
    s = setup(a)
    if a.profile:
        profile(s)
    if not a.targets:
        return
    device = torch.cuda.get_device_name(torch.device(a.device)) if a.device.startswith("cuda") else \
        f"cpu ({torch.get_num_threads()} threads)"
    command = ("python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    print(f"fidbench benchmark on {device}, {a.dtype}, {s.loaded.spec.name}, {a.repeats} repeat(s): {command}",
          flush=True)
    rec = Recorder(a, {"device": device, "dtype": a.dtype, "model": s.loaded.spec.name, "repeats": a.repeats,
                       "quick": a.quick, "command": command})
    notes: list[str] = []
    for t in a.targets:
        t0 = time.perf_counter()
        try:  # a target that breaks leaves the others to run (and its own records so far written)
            {1: target1, 2: target2, 3: target3, 4: target4}[t](s, rec, notes)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            notes.append(f"target {t} failed: {type(e).__name__}: {e}")
        print(f"  target {t} took {time.perf_counter() - t0:.0f}s", flush=True)
    print()
    print(table(rec.records))
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(f"\nwritten: {a.out}")


if __name__ == "__main__":
    main()
