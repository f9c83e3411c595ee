"""``checkpoint``: evaluate another checkpoint (GPTQ / AWQ / pruned / fine-tuned model directory or
hub id) against the base model's references.

The checkpoint is loaded like a suite model (``fidbench.models.load``) on the base model's device,
in ``dtype`` (default: the base model's), and must share the base model's vocabulary: the same
``config.vocab_size`` and the same token ids, else its predictions would be compared with the wrong
tokens. Nothing of the base model changes.
"""

from __future__ import annotations

import contextlib

from .. import models
from .base import Method, register


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
                f"base model's ({len(differ)} differ, e.g. {differ[:3]}): the references' token ids would mean other text"
            )
        self._loaded = {"checkpoint": self.path, "dtype": dtype, "model_type": other.config.model_type}
        yield other

    def kept(self) -> dict:
        return dict(getattr(self, "_loaded", {}))
