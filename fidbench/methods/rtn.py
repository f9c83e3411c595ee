"""``rtn``: round-to-nearest weight quantization of the decoder's linear layers.

Every row of each nn.Linear weight inside the decoder layers is split into groups of ``group`` input
columns (0: the whole row; a shorter last group when the width is not a multiple), and each group is
rounded to ``bits`` with its own scale (asymmetric: and a zero point; see ``_weights.quant_params``).
``zero_point``: ``"integer"`` (default) rounds it to an integer level, as the quantizer of GPTQ's repository
(IST-DASLab/gptq ``quant.py``, whose RTN baseline it is) and AWQ's ``pseudo_quantize_tensor`` do;
``"float"`` keeps the group's minimum as the offset (llama.cpp's Q4_1, fidbench's earlier default).
The embeddings and lm_head (tied in many small models) stay in full precision unless ``embeddings``.
``bits: 16`` leaves the model unchanged. The weights are restored on exit.
"""

import contextlib
from typing import Literal

import torch

from . import _weights as weights
from .base import Method, register


@register
class RTN(Method):
    name = "rtn"
    description = ("round-to-nearest `bits` weight quantization of the decoder's linear layers, in groups of "
                   "`group` inputs")
    defaults_from = ("IST-DASLab/gptq's RTN baseline (quant.py: asymmetric, integer zero point); group 128 as GPTQ's "
                     "and AWQ's grouped results; embeddings and lm_head full precision as there")
    kind = "weights"
    test_params = {"degenerate": {"bits": 16}, "real": {"bits": 3}}
    bits: int = 4
    group: int = 128
    symmetric: bool = False
    zero_point: Literal["integer", "float"] = "integer"
    embeddings: bool = False

    def validate(self):
        weights.check_bits(self.name, self.bits, self.group)

    def targets(self, model) -> list[torch.nn.Parameter]:
        params = [lin.weight for lin in weights.decoder_linears(model)]
        if self.embeddings:
            params += [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
        return list({id(p): p for p in params}.values())  # tied embeddings once

    @contextlib.contextmanager
    def apply(self, model, context=None):
        params = self.targets(model)
        with weights.restored(params):
            if self.bits < 16:
                with torch.no_grad():
                    for p in params:
                        p.copy_(weights.fake_quant(p, self.bits, self.group, self.symmetric,
                                                   self.zero_point == "integer"))
            self._report = weights.quant_report(params, self.bits, self.group, self.symmetric)
            yield model

    def kept(self) -> dict:
        return getattr(self, "_report", {})  # filled by apply
