"""Per-linear output error of sparsegpt, wanda and magnitude at 50 % on one decoder layer of the full-precision model:
on the calibration prompts sparsegpt is fitted to, on held-out prompts, and on the base model's own greedy
continuations of those (the positions fidbench scores). Median over tokens of each token's relative error.

    python scripts/sparsegpt_layer_error.py MODEL_DIR 15
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fidbench.methods import _weights as W
from fidbench.methods.sparsegpt import sparsegpt

DATA = Path(__file__).resolve().parent.parent / "data"


def prompts(tok, name, n):
    out = []
    for line in (DATA / f"{name}.jsonl").read_text().splitlines()[:n]:
        ids = tok.apply_chat_template([json.loads(line)["conversations"][0]], add_generation_prompt=True)
        out.append(ids if isinstance(ids, list) else ids["input_ids"])
    return out


def main(path, index):
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cal = prompts(tok, "calibration", 16)
    held = sum((prompts(tok, d, 2) for d in ("chat", "code", "math", "facts", "translation")), [])
    starts = [len(p) for p in held]
    with torch.no_grad():
        gen = [model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False)[0].tolist() for p in held]
    layer = W.decoder_layers(model)[index]
    names = {m: n for n, m in layer.named_modules()}
    xs = {lin: [] for lin in W.linears(layer)}
    hooks = [lin.register_forward_hook(lambda m, a, o: xs[m].append(a[0].reshape(-1, a[0].shape[-1]))) for lin in xs]
    hooks.append(layer.register_forward_hook(W._stop))
    with torch.no_grad():
        for ids in cal + gen:
            try:
                model(input_ids=torch.tensor([ids]), use_cache=False)
            except W._Stop:
                pass
    for lin, x in xs.items():
        xc = torch.cat(x[:16])
        sets = {"calibration": xc, "held-out prompts": torch.cat([a[:s] for a, s in zip(x[16:], starts)]),
                "continuations": torch.cat([a[s:] for a, s in zip(x[16:], starts)])}
        w = lin.weight.detach().float()
        h, ws = 2 * xc.T @ xc / xc.shape[0], w.clone()
        W.zero_dead_inputs(ws, h)
        pruned = {"sparsegpt": sparsegpt(ws, W.inverse_cholesky(h, 0.01, "sparsegpt"), 0.5, None, 128),
                  "wanda": w * W.prune_mask(w.abs() * xc.square().sum(0).sqrt(), 0.5, None, per_row=True),
                  "magnitude": w * W.prune_mask(w.abs(), 0.5, None, per_row=False)}
        for what, xt in sets.items():
            err = {k: ((xt @ (w - q).T).square().sum(-1) / (xt @ w.T).square().sum(-1).clamp(min=1e-12)).median().item()
                   for k, q in pruned.items()}
            print(index, names[lin], what, " ".join(f"{k} {v:.4f}" for k, v in err.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
