"""Reports for the tests of the report tools (compare, merge, floors, plot): synthetic ones, with case records
shaped like ``fidbench.report.case``'s built from per-sample scores, and real ones from a tiny pytester project."""

import json
import shutil

from helpers import ROOT

from fidbench import stats

ENVIRONMENT = {"versions": {"python": "3.12.0", "fidbench": "0.1.0", "torch": "2.13.0", "transformers": "5.24.0"},
               "machine": {"platform": "test"}, "commit": "c0ffee", "dirty": False}
SETTINGS = {"suite": "fidbench.yaml", "limit": None, "max_new_tokens": 16, "decode": "auto", "batch_size": 1}


def sample(dataset: str, index: int, acc1: float, kl_mean: float, n_tokens: int = 16,
           acc5: float | None = None) -> dict:
    acc5 = min(1.0, acc1 + 0.25) if acc5 is None else acc5
    return {"dataset": dataset, "index": index, "prompt_tokens": 40 + index, "template": "chat", "truncated_from": None,
            "acc1": acc1, "acc5": acc5, "kl_mean": kl_mean, "n_tokens": n_tokens}


def _scores(samples: list[dict]) -> dict:
    tokens = sum(s["n_tokens"] for s in samples)
    out = {m: sum(s[m] * s["n_tokens"] for s in samples) / tokens for m in stats.METRICS}
    return {**out, "kl_p99": 4 * out["kl_mean"], "nll_ratio": 1 + out["kl_mean"], "first_divergence": 16 * out["acc1"],
            "n_samples": len(samples), "n_tokens": tokens, "acc1_by_position": [out["acc1"], out["acc1"] / 2]}


def record(model: str, variant: str, samples: list[dict], method: str | None = None, kv_fraction: float | None = None,
           fingerprint: str | None = None) -> dict:
    datasets = {}
    for s in samples:
        datasets.setdefault(s["dataset"], []).append(s)
    return {
        "id": f"{model}-{variant}", "model": model, "model_type": "llama", "fingerprint": fingerprint or f"fp-{model}",
        "method": method or variant.split("-")[0], "kind": "attention", "variant": variant, "params": {},
        "decode": "parallel", "scores": _scores(samples), "datasets": {d: _scores(g) for d, g in datasets.items()},
        "ci": stats.intervals(samples), "ci_level": stats.LEVEL,
        "timing": {"prefill_s": 0.1, "decode_s": 0.2},
        "kept": {} if kv_fraction is None else {"kv_fraction": kv_fraction}, "floors": {}, "failures": [],
        "samples": samples, "skipped": [],
    }


def document(cases: list[dict], **settings) -> dict:
    return {"format": 2, "environment": ENVIRONMENT, "settings": {**SETTINGS, **settings}, "cases": cases}


def write(path, cases: list[dict], **settings):
    path.write_text(json.dumps(document(cases, **settings)))
    return path


def project(pytester, checkpoint, suite: str, prompts: int = 4):
    """A pytester project running fidbench's fidelity test over ``checkpoint`` (as ``tiny``) with ``suite``'s
    methods on the first ``prompts`` facts and ``prompts`` code prompts; its own reference cache."""
    shutil.copytree(checkpoint, pytester.path / "tiny")
    shutil.copy(ROOT / "tests" / "methods" / "test_fidelity.py", pytester.path / "test_fidelity.py")
    for name in ("facts", "code"):
        lines = (ROOT / "data" / f"{name}.jsonl").read_text().splitlines()[:prompts]
        (pytester.path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (pytester.path / "fidbench.yaml").write_text(
        "generation: {max_new_tokens: 12}\nmodels:\n  tiny: {path: tiny, max_length: 256}\n"
        "datasets: {facts: facts.jsonl, code: code.jsonl}\n" + suite)
    return pytester


def run(pytester, out: str, *args) -> dict:
    """Run the project's cases (``args`` select them) and read the report written to ``out``."""
    result = pytester.runpytest("--fidbench-quiet", "--benchmark-disable", "-p", "no:cacheprovider",
                                           "--fidbench-report", out, *args)
    assert result.ret == 0, result.stdout.str()
    return json.loads((pytester.path / out).read_text())
