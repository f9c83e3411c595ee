"""``magnitude``: weight pruning by magnitude, the baseline of the Wanda and SparseGPT papers.

Zeroes the smallest |W| of each nn.Linear inside the decoder layers: unstructured, exactly
``round(sparsity * size)`` weights per matrix (the layer-wise comparison group those papers use for
this baseline), or an N:M ``pattern`` (``"2:4"``: two of every four consecutive inputs of a row kept).
Give one of ``sparsity`` or ``pattern``. Weights are restored on exit.
"""

import contextlib

import torch

from . import _weights as weights
from .base import Method, register


@register
class Magnitude(Method):
    name = "magnitude"
    description = ("zero the smallest-magnitude weights of the decoder's linear layers: `sparsity` per matrix "
                   "or N:M `pattern`")
    defaults_from = "no default target: sparsity or pattern must be given (the suite uses the papers' 50 % and 2:4)"
    kind = "weights"
    test_params = {"degenerate": {"sparsity": 0.0}, "real": {"sparsity": 0.5}}
    sparsity: float | None = None
    pattern: str | None = None

    def validate(self):
        self._nm = weights.check_pruning(self.name, self.sparsity, self.pattern)

    @contextlib.contextmanager
    def apply(self, model, context=None):
        params = [lin.weight for lin in weights.decoder_linears(model)]
        with weights.restored(params):
            with torch.no_grad():
                for p in params:
                    p.mul_(weights.prune_mask(p.abs(), self.sparsity, self._nm, per_row=False))
            self._report = weights.prune_report(params, self._nm)
            yield model

    def kept(self) -> dict:
        return getattr(self, "_report", {})  # filled by apply
