"""``gptq``: GPTQ weight quantization (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers").

Same grid as ``rtn`` (``bits``, ``group``, ``symmetric``, ``zero_point``: ``"integer"`` by default, as GPTQ's
``quant.py`` rounds the zero point; ``"float"``, the group's minimum), but each linear layer's columns are
quantized one at a time and the error is spread over the columns not yet quantized, weighted by the inverse
Hessian H = 2 X Xᵀ of the layer's inputs X on ``samples`` calibration prompts of the suite dataset ``dataset``
(``--fidbench-limit`` limits them too unless the dataset is calibration-only, ``score: false``), each followed
by the base model's greedy continuation when ``continued`` (``_weights.Calibrated``). Decoder layers are
processed in order, each calibrated on the outputs of the already quantized ones, as the paper does; ``damp``
adds that fraction of the mean diagonal to H; ``act_order`` quantizes columns by decreasing H diagonal (groups
then follow that order). Weights are restored on exit.
"""

import contextlib
from typing import Literal

import torch

from . import _weights as weights
from .base import register


def gptq(w: torch.Tensor, h: torch.Tensor, bits: int, group: int, symmetric: bool, damp: float,
         act_order: bool, integer_zero: bool = True) -> torch.Tensor:
    """GPTQ-quantized copy of ``w`` (out, in) for inputs with Hessian ``h`` (in, in), in float32."""
    w, h = w.float().clone(), h.float().clone()
    cols = w.shape[1]
    weights.zero_dead_inputs(w, h)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(cols, device=h.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = weights.inverse_cholesky(h, damp, "gptq")  # the paper's U, H⁻¹ = UᵀU
    q = torch.zeros_like(w)
    if group == 0:
        scale, offset = weights.quant_params(w, bits, symmetric, integer_zero)
    # Blocks hold whole groups so a group's grid is fitted to its columns after all earlier updates.
    block = group * max(1, 128 // group) if group else 128
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb, hb = w[:, b0:b1].clone(), hinv[b0:b1, b0:b1]
        err = torch.zeros_like(wb)
        for i in range(b1 - b0):
            if group and i % group == 0:
                scale, offset = weights.quant_params(wb[:, i : i + group], bits, symmetric, integer_zero)
            col = wb[:, i : i + 1]
            q[:, b0 + i : b0 + i + 1] = weights.quant_apply(col, scale, offset, bits, symmetric)
            e = (col - q[:, b0 + i : b0 + i + 1]) / hb[i, i]
            wb[:, i:] -= e * hb[i : i + 1, i:]
            err[:, i : i + 1] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q[:, torch.argsort(perm)]


@register
class GPTQ(weights.Calibrated):
    name = "gptq"
    description = ("GPTQ `bits` weight quantization of the decoder's linear layers, calibrated on `samples` "
                   "prompts of `dataset`")
    defaults_from = ("IST-DASLab/gptq llama.py/quant.py (wbits 4, percdamp 0.01, act_order off, asymmetric with an "
                     "integer zero point); group 128 as the paper's grouped results (its code's default is one group "
                     "per row); calibration: fidbench's suite settings")
    kind = "weights"
    test_params = {"degenerate": {"bits": 16}, "real": {"bits": 4, "group": 32}}
    bits: int = 4
    group: int = 128
    symmetric: bool = False
    zero_point: Literal["integer", "float"] = "integer"
    damp: float = 0.01
    act_order: bool = False

    def validate(self):
        weights.check_bits(self.name, self.bits, self.group)
        super().validate()
        weights.check_damp(self.name, self.damp)

    @contextlib.contextmanager
    def apply(self, model, context=None):
        prompts = self.calibration(context)
        lins = weights.decoder_linears(model)
        hessians = weights.Hessians()

        def transform(layer_linears):
            # GPTQ treats rows independently, so linears with one Hessian (same input, e.g. q/k/v) are
            # quantized as one stack of rows in one pass (fewer column steps).
            for same, h in hessians.groups(layer_linears):
                stacked = torch.cat([lin.weight for lin in same])
                with weights.one_thread():
                    q = gptq(stacked, h, self.bits, self.group, self.symmetric, self.damp, self.act_order,
                             self.zero_point == "integer")
                for lin, part in zip(same, q.split([lin.weight.shape[0] for lin in same])):
                    lin.weight.copy_(part.to(lin.weight.dtype))

        with weights.restored(lin.weight for lin in lins):
            if self.bits < 16:
                weights.sequential(model, prompts, hessians.observe, transform)
            self._report = {**weights.quant_report([lin.weight for lin in lins], self.bits, self.group, self.symmetric),
                            **self.calibration_report(prompts)}
            yield model
