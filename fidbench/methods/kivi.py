"""``kivi``: KV-cache quantization after KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit
Quantization for KV Cache").

Keys are quantized per channel in groups of ``group`` consecutive tokens, values per token in groups
of ``group`` channels, both asymmetric min-max to ``bits`` (``16``: unchanged). KIVI keeps the most
recent tokens in full precision and quantizes them once its residual fills. This hook rebuilds, from
the full-precision cache the model holds, exactly what a query of a stepwise KIVI decode reads:

- keys enter a full-precision residual that is quantized as one chunk when it holds ``residual``
  tokens, after the query that filled it (as KIVI's kernels do). A query at position t reads positions
  from ``residual * (t // residual)`` on in full precision (1 to ``residual`` tokens, its own included),
  older ones quantized in token groups aligned to position 0;
- values enter a full-precision window and the oldest one is quantized once it holds more than
  ``residual``, after the query (KIVI appends, attends, then quantizes): a query at t reads positions
  ``t - residual .. t`` in full precision (``residual + 1`` values, its own included);
- prompt queries (prefill) read full-precision K/V: KIVI quantizes what the cache keeps for later tokens.

Follows KIVI's code (jy-yuan/KIVI ``models/llama_kivi.py``, ``LlamaAttention_KIVI.forward``, and
``quant/new_pack.py``); defaults group 32, residual 128, the setting of the paper's experiments and of its
repository's LongBench results (``docs/long_bench.md``: "a 32 group size and 128 residual length for both
KIVI-2 and KIVI-4"; ``mem_spd_test.py``); ``example.py`` and ``long_context_example.py`` use residual 32
(``residual: 32``). Differences: the quantizer
is fidbench's (``_weights.fake_quant``: min/max asymmetric like KIVI's, in float32, not fp16).

What a query reads depends only on its position and the K/V of tokens before it, which are the same
whether the reference is fed in one forward or token by token, so parallel teacher forcing is exact
(tests/test_quant_prune.py checks parallel == stepwise).

Sliding-window layers stay in full precision, like every KV method's (fidbench.methods._kv): their
cache drops old positions, so the position-aligned groups above cannot be rebuilt from it. Their
entries count as visible and unquantized in ``kept()``.
"""

import torch

from ..attention import AttentionCall
from ._kv import require_every_position
from ._weights import SCALE_BITS, fake_quant
from .base import Method, register


@register
class KIVI(Method):
    name = "kivi"
    description = ("KV cache quantized to `bits` (keys per channel, values per token, groups of `group`), "
                   "last `residual` tokens in full precision")
    defaults_from = ("KIVI paper experiments and jy-yuan/KIVI docs/long_bench.md: group 32, residual 128 for KIVI-2 "
                     "and KIVI-4 (example.py uses residual 32)")
    test_params = {"degenerate": {"bits": 16}, "real": {"bits": 2, "group": 4, "residual": 8}}
    role = "cache"
    full_attention_only = True
    base_prefill = True  # prompt queries read full-precision K/V
    bits: int = 2
    group: int = 32
    residual: int = 128

    def validate(self):
        if self.bits not in (2, 4, 8, 16):
            raise ValueError(f"kivi: bits must be 2, 4, 8 or 16 (unchanged), got {self.bits}")
        if self.group < 1:
            raise ValueError(f"kivi: group must be >= 1, got {self.group}")
        if self.residual < self.group or self.residual % self.group:
            raise ValueError(f"kivi: residual must be a positive multiple of group ({self.group}), got {self.residual}")

    def __post_init__(self):
        super().__post_init__()
        self._counts = [0, 0, 0]  # quantized keys, quantized values, visible entries (decode queries); tensors

    def attend(self, call: AttentionCall):
        if self.bits == 16 or call.phase.name != "decode":
            return None
        shape = (*call.query.shape[:3], call.key.shape[2])  # counted per query head, as a stack's selection masks come
        if call.sliding_window is not None:
            self._counts[2] = self._counts[2] + call.visible().expand(shape).sum()
            return None
        require_every_position(self, call)  # key index = position below
        n_q, n_k = call.query.shape[2], call.key.shape[2]
        pos_k = torch.arange(n_k, device=call.query.device)
        pos_q = pos_k[n_k - n_q :, None]
        key_full = pos_k >= (pos_q // self.residual) * self.residual  # (q, k)
        value_full = pos_k >= pos_q - self.residual
        visible = call.visible()
        for i, full in enumerate((key_full, value_full)):
            self._counts[i] = self._counts[i] + (visible & ~full).expand(shape).sum()
        self._counts[2] = self._counts[2] + visible.expand(shape).sum()
        if n_k - 1 < self.residual:  # no query has reached a full residual: no key is quantized yet (keys go first)
            return None
        key_q = fake_quant(call.key.transpose(-1, -2), self.bits, self.group, False).transpose(-1, -2)
        value_q = fake_quant(call.value, self.bits, self.group, False)
        # Every position appears once, in the copy holding what the query reads: quantized key and value,
        # quantized key and full value, or both full (a quantized value implies a quantized key).
        keys = torch.cat([key_q, key_q, call.key], dim=2)
        values = torch.cat([value_q, call.value, call.value], dim=2)
        mask = torch.cat([visible & ~value_full, visible & value_full & ~key_full, visible & key_full], dim=-1)
        return call.dense(mask=mask, key=keys, value=values)

    def kept(self) -> dict:
        keys, values, visible = (float(c) for c in self._counts)
        return {
            "bits": self.bits,
            "effective_bits": self.bits + 2 * SCALE_BITS / self.group if self.bits < 16 else 16,
            "kv_quantized": (keys + values) / (2 * visible) if visible else 0.0,
            "keys_quantized": keys / visible if visible else 0.0,
            "values_quantized": values / visible if visible else 0.0,
        }
