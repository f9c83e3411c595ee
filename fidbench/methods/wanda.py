"""``wanda``: Wanda pruning (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large
Language Models").

Scores each weight of the decoder's nn.Linear layers by |W_ij| · ||X_j||₂, the L2 norm of input feature
j over the calibration tokens (``samples`` prompts of the suite dataset ``dataset``; ``--fidbench-limit``
limits them too unless the dataset is calibration-only, ``score: false``; each followed by the base model's
greedy continuation when ``continued``, ``_weights.Calibrated``), and zeroes the lowest scores of each output
row: exactly ``round(sparsity * inputs)`` per row (the paper's per-output comparison group), or all but the N best
of every M consecutive inputs for an N:M ``pattern``. Layers are pruned in order, each calibrated on
the outputs of the already pruned ones, as the paper's code does. Weights are restored on exit.
"""

import contextlib

from . import _weights as weights
from .base import register


@register
class Wanda(weights.Calibrated):
    name = "wanda"
    description = ("zero the weights with the lowest |W|·||X|| per output row (calibrated on `dataset`): "
                   "`sparsity` or N:M `pattern`")
    defaults_from = ("locuslab/wanda (per-output-row comparison group); target sparsity or pattern must be given; "
                     "calibration: fidbench's suite settings")
    kind = "weights"
    test_params = {"degenerate": {"pattern": "4:4"}, "real": {"pattern": "2:4"}}
    sparsity: float | None = None
    pattern: str | None = None

    def validate(self):
        self._nm = weights.check_pruning(self.name, self.sparsity, self.pattern)
        super().validate()

    @contextlib.contextmanager
    def apply(self, model, context=None):
        prompts = self.calibration(context)
        lins = weights.decoder_linears(model)
        squares: dict = {}

        def observe(lin, x):
            squares[lin] = squares.get(lin, 0) + x.float().square().sum(0)

        def transform(layer_linears):
            for lin in layer_linears:
                score = lin.weight.abs().float() * squares.pop(lin).sqrt()
                lin.weight.mul_(weights.prune_mask(score, self.sparsity, self._nm, per_row=True))

        with weights.restored(lin.weight for lin in lins):
            weights.sequential(model, prompts, observe, transform)
            self._report = {**weights.prune_report([lin.weight for lin in lins], self._nm),
                            **self.calibration_report(prompts)}
            yield model
