"""``checkpoint``: evaluate another checkpoint (GPTQ / AWQ / pruned / fine-tuned model directory or
hub id) against the base model's references. In a suite, ``path`` and ``tokenizer`` are found as a model's
are: a directory relative to the suite file when one exists there, else a hub id.

The checkpoint is loaded like a suite model (``fidbench.models.load``) on the base model's device,
in ``dtype`` (default: the base model's), and must share the base model's vocabulary: the same
``config.vocab_size`` and the same token ids, else its predictions would be compared with the wrong
tokens. Nothing of the base model changes.
"""

from __future__ import annotations

import contextlib
import importlib.metadata

from .. import models
from ._optional import require
from .base import Method, register

# quant_method of a checkpoint's quantization_config: (module transformers imports to load it, PyPI package)
BACKENDS = {
    "compressed-tensors": ("compressed_tensors", "compressed-tensors"), "hqq": ("hqq", "hqq"),
    "quanto": ("optimum.quanto", "optimum-quanto"), "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "torchao": ("torchao", "torchao"), "gptq": ("gptqmodel", "gptqmodel"), "awq": ("gptqmodel", "gptqmodel"),
    "auto-round": ("auto_round", "auto-round"),
}


def _require_backend(path: str) -> str | None:
    """The checkpoint's quantization method (None: not quantized); refuses one whose backend is not installed,
    naming the package, where transformers' own message would not say what to install."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(models.resolve(path), local_files_only=True)
    except (OSError, ValueError):
        return None  # models.load reports what is wrong with the directory
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    method = str(getattr(method, "value", method))
    if method in BACKENDS:
        require(f"checkpoint: {path!r} is quantized with {method}; loading it", *BACKENDS[method])
    return method


def _vocab_size(model) -> int:
    return model.config.get_text_config().vocab_size


@register
class Checkpoint(Method):
    name = "checkpoint"
    description = "another model directory (quantized, pruned, ...) scored against the base model's references"
    defaults_from = "no reference setting: the checkpoint's own files (dtype: the base model's)"
    kind = "model"
    test_params = {"covered_by": "tests/test_checkpoint.py::test_checkpoint_of_the_base_directory_equals_origin"}
    path: str = ""
    tokenizer: str | None = None
    dtype: str | None = None

    @classmethod
    def resolve_paths(cls, params: dict, root):
        return {k: models.local(root, v) if k in ("path", "tokenizer") else v for k, v in params.items()}

    def validate(self):
        if not self.path:
            raise ValueError("checkpoint: path (the checkpoint's model directory or hub id) is required")
        if self.dtype is not None and self.dtype not in models.DTYPES:
            raise ValueError(f"checkpoint: dtype must be one of {', '.join(sorted(models.DTYPES))}, got {self.dtype!r}")

    @contextlib.contextmanager
    def apply(self, model, context=None):
        if context is None:
            raise ValueError("checkpoint: needs the harness's loaded context (base tokenizer and model spec)")
        dtype = self.dtype or context.spec.dtype
        quantized = _require_backend(self.path)
        try:
            other, tok = models.load(self.path, self.tokenizer, dtype, context.spec.device)
        except OSError as e:
            raise ValueError(
                f"checkpoint: cannot load {self.path!r}"
                f"{'' if self.tokenizer else ' (give tokenizer: if the directory has none)'}: {e}"
            ) from None
        if _vocab_size(other) != _vocab_size(model):
            raise ValueError(
                f"checkpoint: {self.path!r} has vocab_size {_vocab_size(other)}, the base model "
                f"{context.spec.name!r} has {_vocab_size(model)}: its logits cannot be scored against the references"
            )
        base_vocab, vocab = context.tokenizer.get_vocab(), tok.get_vocab()
        if vocab != base_vocab:
            differ = sorted(t for t in base_vocab.keys() | vocab.keys() if base_vocab.get(t) != vocab.get(t))
            raise ValueError(
                f"checkpoint: the tokenizer of {self.tokenizer or self.path!r} maps tokens to other ids than the "
                f"base model's ({len(differ)} differ, e.g. {differ[:3]}): the references' token ids would mean "
                "other text"
            )
        self._loaded = {"checkpoint": self.path, "dtype": dtype, "model_type": other.config.model_type}
        if quantized:
            self._loaded["quantization"] = quantized
            if quantized in BACKENDS:  # the library that loads it, and its version, for the report
                package = BACKENDS[quantized][1]
                self._loaded["library"] = f"{package} {importlib.metadata.version(package)}"
        yield other

    def kept(self) -> dict:
        return dict(getattr(self, "_loaded", {}))
