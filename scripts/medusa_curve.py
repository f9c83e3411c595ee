"""Learning curve of ``fidbench train-medusa``'s default recipe (docs/methods.md, "Medusa"): the training prompts
(data/train.jsonl) split by prompt into a training part and a held-out part (every ``--holdout``-th prompt);
heads trained from scratch for each step count on the training part, each with its own warm-up and cosine
decay (the recipe's schedule depends on the total); printed per step count: held-out acc@1 / acc@5 of each
head over the held-out generated tokens, the last-10 % training loss and the CPU seconds of the fit.

    OMP_NUM_THREADS=1 python scripts/medusa_curve.py --steps 150 300 600 1200
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from fidbench import models
from fidbench.medusa_train import IGNORE, Settings, distill, examples, fit


@torch.inference_mode()
def held_out(heads, model, x, y) -> list[tuple[float, float]]:
    """(acc@1, acc@5) of each head over the held-out positions where it has a target."""
    lm_head = model.get_output_embeddings()
    out = []
    for i in range(y.shape[1]):
        mask = y[:, i] != IGNORE
        logits = lm_head(heads.heads[i](x[mask]))
        top = logits.topk(5, dim=-1).indices
        gold = y[mask, i]
        out.append(((top[:, 0] == gold).double().mean().item(), (top == gold[:, None]).any(-1).double().mean().item()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[150, 300, 600, 1200])
    parser.add_argument("--holdout", type=int, default=5, help="every N-th training prompt is held out")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-cache", type=Path, help="keep the hidden states and targets here between runs")
    args = parser.parse_args()
    model, tok = models.load(args.model)
    base = Settings()
    t0 = time.process_time()
    if args.data_cache and args.data_cache.is_file():
        x, y, xt, yt = torch.load(args.data_cache)
    else:
        seqs = distill(model, tok, base)
        x, y = examples(model, [s for i, s in enumerate(seqs) if i % args.holdout], base.heads)
        xt, yt = examples(model, [s for i, s in enumerate(seqs) if not i % args.holdout], base.heads)
        if args.data_cache:
            torch.save((x, y, xt, yt), args.data_cache)
    print(json.dumps({"train_positions": len(x), "held_out_positions": len(xt),
                      "data_cpu_s": round(time.process_time() - t0)}), flush=True)
    for steps in args.steps:
        settings = dataclasses.replace(base, steps=steps)
        t1 = time.process_time()
        heads, _, last = fit(model, x, y, settings)
        cpu = time.process_time() - t1
        accs = held_out(heads, model, xt, yt)
        print(json.dumps({"steps": steps, "epochs": round(steps * settings.batch / len(x), 1),
                          "acc1": [round(a, 4) for a, _ in accs], "acc5": [round(b, 4) for _, b in accs],
                          "loss_last": [round(v, 3) for v in last], "fit_cpu_s": round(cpu)}), flush=True)


if __name__ == "__main__":
    main()
