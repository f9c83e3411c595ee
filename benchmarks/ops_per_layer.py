"""Aten operations the host issues per decoder layer, in one prefill and one decode step, per method.

On a GPU a forward of a large model at short prompts is bound by the host issuing kernels, not by the
kernels themselves (benchmarks/LOG.md, "8B table on the H200"), so a method's extra cost there is its
extra operations per layer. Counted on a CPU with a TorchDispatchMode over every aten op, on tiny Llamas
of 2 and 6 layers (the difference over 4 layers is per layer, the fixed costs cancel):

    python benchmarks/ops_per_layer.py [METHOD ...]    # default: origin and every attention method
"""

import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import calibration, tiny_model  # noqa: E402

from fidbench import engine  # noqa: E402
from fidbench.methods import REGISTRY, build  # noqa: E402


class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops(method: str, layers: int, prompt: int = 200) -> tuple[int, int]:
    """(prefill ops, decode-step ops) of one sample on a tiny Llama of ``layers`` layers."""
    model = tiny_model("llama", num_hidden_layers=layers)
    g = torch.Generator().manual_seed(1)
    p_ids = torch.randint(0, 283, (prompt,), generator=g).tolist()
    g_ids = torch.randint(0, 283, (4,), generator=g).tolist()
    m = build(method, REGISTRY[method].test_params["real"] if method != "origin" else {})
    with m.apply(model, calibration()) as applied:
        stepper = engine.Stepper(applied, m, p_ids, g_ids)
        with Ops() as prefill:
            stepper.prefill()
        with Ops() as step:
            stepper.step()
    return prefill.count, step.count


def main() -> None:
    names = sys.argv[1:] or ["origin"] + sorted(n for n, c in REGISTRY.items() if c.kind == "attention")
    print(f"{'method':18s} {'prefill':>8s} {'decode':>8s}   aten ops per layer (tiny Llama: 6 layers minus 2, over 4)")
    for name in names:
        (p2, d2), (p6, d6) = ops(name, 2), ops(name, 6)
        print(f"{name:18s} {(p6 - p2) / 4:8.1f} {(d6 - d2) / 4:8.1f}", flush=True)


if __name__ == "__main__":
    main()
