"""``quantized-cache``: transformers' own quantized KV cache (``QuantizedCache``, what
``generate(cache_implementation="quantized", cache_config=...)`` decodes with), run as it is.

Each prefill starts from a fresh ``QuantizedCache(backend, config, nbits, axis_key, axis_value, q_group_size,
residual_length)``, built as ``generate`` builds it; a parameter left at None takes transformers' default
(nbits 4, axes 0, group 64, residual 128; the ``fp8`` backend takes none of them). What it does with them
(transformers ``cache_utils.QuantizedLayer.update``):

- the prefill attends to its full-precision K/V, then the whole prompt's K/V is quantized;
- each decode step attends to the dequantized cache, the full-precision residual and its own K/V; the step that
  fills the residual to ``residual_length`` re-quantizes everything (the dequantized old part included, so old
  entries are quantized again) and empties the residual.

So what a token reads depends on how many steps came before it and in what chunks: teacher forcing is
stepwise, one token a step, exactly as ``generate`` feeds it (a parallel forward of the reference would attend
to full-precision K/V for all of it). tests/test_quantlibs.py checks the scored logits equal ``generate``'s
own with the same cache. Beside fidbench's ``kivi``, the differences are transformers' (docs/methods.md):
keys and values both grouped along ``axis``, the prompt quantized at once, repeated re-quantization.

The ``quanto`` backend needs ``pip install optimum-quanto``, ``hqq`` needs ``pip install hqq``; ``fp8`` (a
per-tensor scale frozen after the prefill) needs neither. Models with a sliding-window layer are refused by
transformers.
"""

from __future__ import annotations

from ._optional import require
from .base import Method, register

PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq"), "fp8": (None, None)}
NBITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}  # what transformers' layers accept
AXES = {"quanto": (0, -1), "hqq": (0, 1)}


@register
class QuantizedCacheMethod(Method):
    name = "quantized-cache"
    description = "transformers' QuantizedCache (KIVI-style residual; quanto, hqq or fp8 backend), decoded stepwise"
    defaults_from = "transformers' QuantizedCache: every option left unset takes its default; backend quanto"
    kind = "cache"
    parallel_exact = False  # the cache re-quantizes when its residual fills: state depends on the decode steps
    test_params = {"covered_by": "tests/test_quantlibs.py::test_quantized_cache_scores_what_generate_computes"}
    backend: str = "quanto"
    nbits: int | None = None
    residual_length: int | None = None
    q_group_size: int | None = None
    axis_key: int | None = None
    axis_value: int | None = None

    def options(self) -> dict:
        names = ("nbits", "residual_length", "q_group_size", "axis_key", "axis_value")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def validate(self):
        who = f"quantized-cache ({self.backend})"
        if self.backend not in PACKAGES:
            raise ValueError(f"quantized-cache: backend must be one of {', '.join(PACKAGES)}, got {self.backend!r}")
        if self.backend == "fp8":
            import transformers.cache_utils

            if self.options():
                raise ValueError(f"{who}: quantizes per tensor and takes none of {', '.join(self.options())}")
            if not hasattr(transformers.cache_utils, "Fp8QuantizedLayer"):
                raise ValueError(f"{who}: this transformers ({transformers.__version__}) has no fp8 quantized cache "
                                 "(its QuantizedCache takes quanto and hqq); upgrade transformers for it")
            return
        if self.nbits is not None and self.nbits not in NBITS[self.backend]:
            raise ValueError(f"{who}: nbits must be one of {NBITS[self.backend]}, got {self.nbits}")
        for axis in ("axis_key", "axis_value"):
            if getattr(self, axis) not in (None, *AXES[self.backend]):
                raise ValueError(f"{who}: {axis} must be one of {AXES[self.backend]}, got {getattr(self, axis)}")
        for size in ("residual_length", "q_group_size"):
            if getattr(self, size) is not None and getattr(self, size) < 1:
                raise ValueError(f"{who}: {size} must be >= 1, got {getattr(self, size)}")

    def new_cache(self, model):
        from transformers.cache_utils import QuantizedCache

        require(f"quantized-cache: backend {self.backend!r}", *PACKAGES[self.backend])
        return QuantizedCache(self.backend, model.config.get_text_config(decoder=True), **self.options())

    def kept(self) -> dict:
        return {"backend": self.backend, **self.options()}
