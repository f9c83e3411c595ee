"""``sparsegpt``: SparseGPT one-shot pruning (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models
Can Be Accurately Pruned in One-Shot"), after the reference code IST-DASLab/sparsegpt (``sparsegpt.py ::
SparseGPT.fasterprune``, ``llama.py :: llama_sequential``).

Each nn.Linear of the decoder layers is pruned column by column, and every pruned weight's error is
spread over the row's columns not yet visited, weighted by the inverse Hessian of the layer's inputs
(H = 2 X Xᵀ / n on ``samples`` calibration prompts of ``dataset``; Hessian, damping and the upper
Cholesky factor U of H⁻¹ shared with ``gptq``, fidbench/methods/_weights.py). Columns go in blocks of
``blocksize``; the mask is chosen from the current (already updated) weights by the paper's score
w² / U_jj²: per block over all its rows and columns for ``sparsity`` (adaptive mask selection), or
per row among every M consecutive columns for an N:M ``pattern`` (keep N). Decoder layers are pruned
in order, each calibrated on the outputs of the already pruned ones, as the reference does
(``true_sequential`` off: every linear of a layer from one forward). Weights are restored on exit.

Differences from the reference:
- a block prunes exactly round(sparsity × its size) weights (lowest scores); the reference prunes
  every weight scoring at most the int(size × sparsity)-th smallest score, one more (plus ties), so
  that ``sparsity: 0`` would still prune one weight per block;
- calibration: the suite's ``dataset`` prompts, with ``continued`` each followed by the base model's
  greedy continuation (the default suites: 98 prompts, about 13,000 tokens), instead of 128 random
  2048-token windows of C4 (``_weights.Calibrated`` says why continuations); the Hessian is normalized by tokens, not
  sequences (a common factor, which changes neither the mask nor the updates);
- no joint quantization (the reference's ``--wbits``), weights stay in the model's dtype.
"""

import contextlib

import torch

from . import _weights as weights
from .base import register


def sparsegpt(w: torch.Tensor, u: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None,
              blocksize: int) -> torch.Tensor:
    """Pruned copy of ``w`` (out, in), float32, given U (in, in), the upper Cholesky factor of the inverse Hessian."""
    w = w.float().clone()
    cols = w.shape[1]
    if nm is not None and cols % nm[1]:
        raise ValueError(f"pattern {nm[0]}:{nm[1]}: a layer has {cols} inputs, not a multiple of {nm[1]}")
    d = u.diagonal()
    for b0 in range(0, cols, blocksize):
        b1 = min(b0 + blocksize, cols)
        wb, ub = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.zeros_like(wb)
        keep = None
        if nm is None:
            keep = weights.prune_mask(wb.square() / d[b0:b1].square(), sparsity, None, per_row=False)
        for i in range(b1 - b0):
            if nm is not None and i % nm[1] == 0:  # blocks start at multiples of M: the groups stay aligned
                j = slice(i, i + nm[1])
                keep = weights.prune_mask(wb[:, j].square() / d[b0:b1][j].square(), None, nm, per_row=True)
            col = wb[:, i]
            q = col * (keep[:, i] if nm is None else keep[:, i % nm[1]])
            e = (col - q) / ub[i, i]
            wb[:, i:] -= e[:, None] * ub[i : i + 1, i:]
            wb[:, i] = q  # exactly 0 where pruned (the update above leaves w - w·1 there)
            err[:, i] = e
        w[:, b0:b1] = wb
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return w


@register
class SparseGPT(weights.Calibrated):
    name = "sparsegpt"
    description = ("SparseGPT: prune `sparsity` or N:M `pattern` with inverse-Hessian updates of the kept weights "
                   "(calibrated on `dataset`)")
    defaults_from = ("IST-DASLab/sparsegpt (percdamp 0.01, blocksize 128); target sparsity or pattern must be given; "
                     "calibration: fidbench's suite settings")
    kind = "weights"
    test_params = {"degenerate": {"pattern": "4:4"}, "real": {"pattern": "2:4"}}
    sparsity: float | None = None
    pattern: str | None = None
    damp: float = 0.01
    blocksize: int = 128

    def validate(self):
        self._nm = weights.check_pruning(self.name, self.sparsity, self.pattern)
        super().validate()
        weights.check_damp(self.name, self.damp)
        m = self._nm[1] if self._nm else 1
        if self.blocksize < 1 or self.blocksize % m:
            raise ValueError(f"sparsegpt: blocksize must be a positive multiple of M ({m}), got {self.blocksize}")

    @contextlib.contextmanager
    def apply(self, model, context=None):
        prompts = self.calibration(context)
        lins = weights.decoder_linears(model)
        hessians = weights.Hessians()

        def transform(layer_linears):
            # Linears reading one input share its Hessian and its factor U, but are pruned one by one:
            # an unstructured block's threshold spans the rows of one layer only.
            for same, h in hessians.groups(layer_linears):
                stacked = torch.cat([lin.weight for lin in same]).float()
                weights.zero_dead_inputs(stacked, h)
                u = weights.inverse_cholesky(h, self.damp, self.name)
                for lin, w in zip(same, stacked.split([lin.weight.shape[0] for lin in same])):
                    with weights.one_thread():
                        lin.weight.copy_(sparsegpt(w, u, self.sparsity, self._nm, self.blocksize).to(lin.weight.dtype))

        with weights.restored(lin.weight for lin in lins):
            weights.sequential(model, prompts, hessians.observe, transform)
            self._report = {**weights.prune_report([lin.weight for lin in lins], self._nm),
                            **self.calibration_report(prompts)}
            yield model
