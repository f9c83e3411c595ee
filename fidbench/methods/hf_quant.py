"""``hf-quant``: the base model loaded again through a transformers quantization config (torchao, HQQ,
optimum-quanto, bitsandbytes), the way people quantize on the fly with ``from_pretrained(...,
quantization_config=...)``, and scored against the base model's references.

``config`` holds the backend's own parameters, passed as they are to transformers' config class:
``hqq``: ``HqqConfig`` (``nbits``, ``group_size``, ``axis``, ...); ``quanto``: ``QuantoConfig`` (``weights``:
int2/int4/int8/float8); ``bitsandbytes``: ``BitsAndBytesConfig`` (``load_in_4bit``, ``bnb_4bit_quant_type``,
...); ``torchao``: ``TorchAoConfig(quant_type=...)`` where ``config`` is ``{quant_type: NAME, ...}``, NAME a
config class of ``torchao.quantization`` (``Int8WeightOnlyConfig``, ``Int4WeightOnlyConfig``, ...) and the
other keys its arguments. Every backend leaves ``lm_head`` (and so tied embeddings) in full precision, as
fidbench's own weight methods do by default.

The copy loads from the base model's directory (the embedded default's converted safetensors), in its dtype,
on its device. Memory: on a GPU the base model waits in host memory while the copy is scored, so the device
holds one model at a time (a model spread over GPUs by ``device: auto`` stays where it is); on a CPU both stay
resident. Measured for the default model on a CPU (process peak RSS, the library's import included): 0.53 GB
with the base alone; with the quantized copy loaded and one 199-token forward, 1.33 GB (torchao int4), 1.39 GB
(bitsandbytes nf4), 1.72 GB (optimum-quanto int4). Which backends run on a CPU: docs/methods.md; those that
do not are refused with the device they need.
"""

from __future__ import annotations

import contextlib
import importlib.metadata

import torch

from .. import models
from ._optional import require
from .base import Method, register

# backend: (transformers config class, module to import, PyPI package)
BACKENDS = {
    "hqq": ("HqqConfig", "hqq", "hqq"),
    "quanto": ("QuantoConfig", "optimum.quanto", "optimum-quanto"),
    "bitsandbytes": ("BitsAndBytesConfig", "bitsandbytes", "bitsandbytes"),
    "torchao": ("TorchAoConfig", "torchao", "torchao"),
}
# What fails on a CPU (measured with torch 2.13 CPU, transformers 5.25, torchao 0.18): refused there, naming the device.
NEEDS_CUDA = {
    "Int4WeightOnlyConfig": "torchao's int4 weight-only tensor packs for CUDA kernels (on a CPU it asks for the mslk "
                            "kernel library); on a CPU use IntxWeightOnlyConfig with weight_dtype: int4",
}


def _torchao_args(kwargs: dict) -> dict:
    """A torchao config's arguments from YAML: ``*dtype: int4`` is ``torch.int4``, ``mapping_type: ASYMMETRIC``
    a ``MappingType``, ``granularity: 32`` (or ``weight_granularity``) ``PerGroup(32)`` and ``PerAxis``
    ``PerAxis(0)``."""
    import torchao.quantization as ao

    out = {}
    for key, value in kwargs.items():
        if key.endswith("dtype") and isinstance(value, str):
            value = getattr(torch, value.removeprefix("torch."))
        elif key == "mapping_type" and isinstance(value, str):
            value = ao.MappingType[value]
        elif key.endswith("granularity") and isinstance(value, int):
            value = ao.PerGroup(value)
        elif key.endswith("granularity"):
            value = ao.PerAxis(0) if value == "PerAxis" else getattr(ao, value)()
        out[key] = value
    return out


@register
class HFQuant(Method):
    name = "hf-quant"
    description = "the base model reloaded with a transformers quantization config (torchao, hqq, quanto, bitsandbytes)"
    defaults_from = ("none of its own: the library's config class with its own defaults, as "
                     "`from_pretrained(quantization_config=...)` gets them")
    kind = "model"
    test_params = {"covered_by": "tests/test_quantlibs.py::test_hf_quant_scores_the_library_quantized_model"}
    backend: str = ""
    config: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        self.inference_mode = self.backend != "quanto"  # quanto's QLinear fails on inference tensors

    def validate(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"hf-quant: backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "torchao" and "quant_type" not in (self.config or {}):
            raise ValueError("hf-quant (torchao): config needs quant_type, a config class of torchao.quantization "
                             "(e.g. Int8WeightOnlyConfig)")

    def quantization_config(self):
        import transformers

        cls, module, package = BACKENDS[self.backend]
        require(f"hf-quant: backend {self.backend!r}", module, package)
        kwargs = dict(self.config or {})
        if self.backend == "torchao":
            import torchao.quantization

            name = kwargs.pop("quant_type")
            if not hasattr(torchao.quantization, name):
                raise ValueError(f"hf-quant (torchao): torchao.quantization has no {name!r}")
            return transformers.TorchAoConfig(quant_type=getattr(torchao.quantization, name)(**_torchao_args(kwargs)))
        return getattr(transformers, cls)(**kwargs)

    @contextlib.contextmanager
    def apply(self, model, context=None):
        if context is None:
            raise ValueError("hf-quant: needs the harness's loaded context (the base model's spec)")
        device = next(model.parameters()).device
        scheme = (self.config or {}).get("quant_type", self.backend)
        if scheme in NEEDS_CUDA and device.type != "cuda":
            raise ValueError(f"hf-quant: {self.backend} {scheme} needs a CUDA GPU, the base model is on {device}: "
                             f"{NEEDS_CUDA[scheme]}")
        config = self.quantization_config()
        spread = hasattr(model, "hf_device_map") and len(set(model.hf_device_map.values())) > 1
        parked = device.type == "cuda" and not spread  # a model spread by accelerate stays where it is
        if parked:
            model.to("cpu")
            torch.cuda.empty_cache()
        try:
            where = "auto" if spread else str(device)
            try:
                other, _ = models.load(context.spec.path, context.spec.tokenizer, context.spec.dtype, where,
                                       quantization_config=config)
            except NotImplementedError as e:  # e.g. HQQ: transformers 5.x has no on-the-fly quantize ops for it
                import transformers

                raise ValueError(f"hf-quant: transformers {transformers.__version__} cannot quantize with "
                                 f"{self.backend} while loading: {e}") from None
            package = BACKENDS[self.backend][2]
            self._loaded = {"backend": self.backend, "config": dict(self.config or {}),
                            "library": f"{package} {importlib.metadata.version(package)}"}
            yield other
        finally:
            if parked:
                torch.cuda.empty_cache()
                model.to(device)

    def kept(self) -> dict:
        return dict(getattr(self, "_loaded", {}))
