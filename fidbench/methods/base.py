"""The method API: a method is a dataclass whose fields are its parameters, registered by name.

The harness owns the evaluation loop. A method only says how it changes the model:
- ``attend(call)``: per-layer attention hook (sparse attention, KV eviction as a mask, KV quantization);
  return the attention output, or ``None`` to run the model's dense attention unchanged.
- ``apply(model, context)``: a context manager for changes made once (weights, another checkpoint);
  it yields the model to evaluate and undoes its changes on exit. The default installs the
  attention hook when the class defines ``attend``. ``context`` is the harness's loaded model
  (``fidbench.harness.Loaded``: tokenizer, prompts, ``calibration(dataset, n)``).
- ``begin(prompt_len)``: reset per-sample state before each prefill.
- ``kept()``: what the method kept or changed, for the report.
- ``score_sample(model, ref)``, optional: a method that scores a sample with its own loop (``legacy``)
  returns metric means and ``n_tokens``; the harness then skips the engine and reports every
  metric it did not give as None.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

from .. import attention

REGISTRY: dict[str, type["Method"]] = {}


def register(cls: type["Method"]) -> type["Method"]:
    """Class decorator: make ``cls`` available to suites under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    # A subclass of a dataclass inherits `is_dataclass`; only the class's own marker says its fields are collected.
    REGISTRY[cls.name] = cls if "__dataclass_fields__" in cls.__dict__ else dataclasses.dataclass(cls)
    return REGISTRY[cls.name]


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # True when teacher forcing the whole reference in one forward computes exactly what a
    # token-by-token decode would (the method's state does not depend on earlier decode steps).
    parallel_exact: ClassVar[bool] = True

    def validate(self) -> None:
        """Raise ValueError naming the parameter when a value is out of range."""

    def __post_init__(self):
        self.validate()
        self._kept: dict[int, list[float]] = {}

    def params(self) -> dict:
        return dataclasses.asdict(self)

    @contextlib.contextmanager
    def apply(self, model, context=None):
        if type(self).attend is Method.attend:
            yield model
        else:
            with attention.installed(model):
                yield model

    def begin(self, prompt_len: int) -> None:
        """Called before each sample's prefill."""

    def attend(self, call: attention.AttentionCall):
        return None

    def record(self, layer: int, kept: float, visible: float) -> None:
        """Count ``kept`` of ``visible`` key positions (summed over heads and queries) at ``layer``."""
        acc = self._kept.setdefault(layer, [0.0, 0.0])
        acc[0] += float(kept)
        acc[1] += float(visible)

    def kept(self) -> dict:
        """Fraction of visible KV entries that decode queries attended, overall and per layer."""
        if not self._kept:
            return {}
        layers = sorted(self._kept)
        kept = sum(self._kept[i][0] for i in layers)
        visible = sum(self._kept[i][1] for i in layers)
        return {
            "kv_fraction": kept / visible if visible else 1.0,
            "kv_fraction_per_layer": [self._kept[i][0] / max(self._kept[i][1], 1.0) for i in layers],
        }


# YAML values accepted for annotated parameter types (bool is not a number here).
_TYPES = {
    "float": (float, int),
    "int": int,
    "bool": bool,
    "str": str,
    "float|None": (float, int, type(None)),
    "int|None": (int, type(None)),
    "str|None": (str, type(None)),
}


def build(method: str, params: dict) -> Method:
    """Instantiate a registered method, with clear errors for unknown names and parameters."""
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; registered: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[method]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for method {method!r}; "
            f"it takes: {', '.join(sorted(fields)) or 'no parameters'}"
        )
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in params.items():
        expected = _TYPES.get(str(types[key]).replace(" ", ""))
        if expected and (not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool)):
            raise ValueError(f"method {method!r}: parameter {key!r} must be {types[key]}, got {value!r}")
    try:
        return cls(**params)
    except TypeError as e:
        raise ValueError(f"method {method!r}: {e}") from None
