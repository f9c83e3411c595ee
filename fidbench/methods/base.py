"""The method API: a method is a dataclass whose fields are its parameters, registered by name.

The harness owns the evaluation loop. A method only says how it changes the model, and declares
which ``kind`` of change it is (``"none"``: ``origin``, the base model itself):
- ``"attention"``: ``attend(call)``, a per-layer attention hook (sparse attention, KV eviction as a
  mask, KV quantization, low-precision attention); it returns the attention output, or ``None`` to
  run the model's dense attention unchanged. The default ``apply`` installs the hook.
- ``"weights"``: ``apply(model, context)``, a context manager that changes weights once, yields the
  model to evaluate and restores the weights on exit. ``context`` is the harness's loaded model
  (``fidbench.harness.Loaded``: tokenizer, prompts, ``calibration(dataset, n, continued)``).
- ``"model"``: ``apply`` yields another model to evaluate (``checkpoint``).
- ``"cache"``: ``new_cache(model)`` gives the cache object every prefill starts from (a transformers
  ``Cache`` subclass, e.g. its ``QuantizedCache``); the model computes through it unchanged.
- ``"own_loop"``: ``score_sample(model, ref)`` scores a sample with the method's own loop (``legacy``)
  and returns metric means (each checked finite and in its range) and ``n_tokens``, and where it
  computes logits, ``non_finite`` / ``first_non_finite`` (NaN or inf positions: the case then fails, as
  a teacher-forced one does); the harness skips the engine and reports every metric it did not give as None.
An attention method also declares its ``role`` in a deployment, so that methods of different roles stack
(``fidbench.methods.stack``): ``"select"`` (which keys a query sees: KV eviction, Quest, top-k; it hands
its mask to ``call.dense``), ``"cache"`` (what the cache stores: KIVI, GEAR; it hands the keys and values
queries read to ``call.dense``) or ``"kernel"`` (how attention is computed: FP8, Sage, Sparge); ``None``:
it does not compose. A method whose prefill is the base model's says so (``base_prefill``). Every method may
also override ``begin(prompt_len)`` (reset per-sample state before each prefill; the attributes it sets are named
in ``per_sample``, so that a batch of prompts can keep one state per row) and ``kept()`` (what it kept or changed,
for the report).

Every subclass is made a dataclass when it is defined, so helper base classes keep their fields.
Parameters are checked against their resolved annotations when a suite builds a method.
"""

from __future__ import annotations

import contextlib
import dataclasses
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from .. import attention

REGISTRY: dict[str, type[Method]] = {}
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 4
_repr.maxlevel = 2
show = _repr.repr  # a user's value in an error message, bounded: a suite's value may be huge (aliases of aliases)
KINDS = ("none", "attention", "weights", "model", "cache", "own_loop")
ROLES = ("select", "cache", "kernel")  # the order a stack applies attention methods in (see the module doc)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to suites under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}: a registered method needs a name")
    if cls.name in REGISTRY:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    if cls.kind not in KINDS:
        raise ValueError(f"method {cls.name!r}: kind must be one of {', '.join(KINDS)}, got {cls.kind!r}")
    if cls.role is not None and (cls.role not in ROLES or cls.kind != "attention"):
        raise ValueError(f"method {cls.name!r}: role must be None or, for kind 'attention', one of {', '.join(ROLES)}, "
                         f"got {cls.role!r}")
    if cls.kind == "attention" and cls.attend is Method.attend:
        raise ValueError(f"method {cls.name!r} is of kind 'attention' but defines no attend(call) hook")
    REGISTRY[cls.name] = cls
    return cls


class Method:
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # Where the defaults come from: the reference's script, config or table whose evaluation setting they are,
    # or why fidbench chose them where no reference has one (``fidbench methods`` prints it).
    defaults_from: ClassVar[str] = ""
    kind: ClassVar[str] = "attention"
    role: ClassVar[str | None] = None  # an attention method's part in a stack (see the module doc)
    # True when teacher forcing the whole reference in one forward computes exactly what a
    # token-by-token decode would (the method's state does not depend on earlier decode steps).
    parallel_exact: ClassVar[bool] = True
    # True for KV-cache methods: they compress full-attention layers only and leave sliding-window
    # layers to the model's own window (fidbench.methods._kv), so a model without a full-attention
    # layer is refused rather than run unchanged.
    full_attention_only: ClassVar[bool] = False
    # A KV method that tests/test_physical.py does not check against a physically pruned cache says why here
    # (that test fails for a KV method neither checked there nor saying why).
    not_physically_checked: ClassVar[str] = ""
    # True when the method's hook never changes a prefill attention call's output (it may look at it):
    # its prefill is the base model's, which a suite may then record once per prompt and replay for
    # every such case (fidbench.prefill; replaying a hook that does change it is an error).
    base_prefill: ClassVar[bool] = False
    # True when apply() leaves the model changed by design (legacy's ``copy: false``): the next case then
    # reloads the model. Any other method that leaves the weights changed fails its case.
    leaves_model_changed: ClassVar[bool] = False
    # False when the method's library cannot compute on inference tensors (optimum-quanto's quantized linears):
    # the engine then runs its forwards under torch.no_grad instead of torch.inference_mode.
    inference_mode: ClassVar[bool] = True
    # Parameters for the family matrix (tests/test_families.py) on tiny models with a 40-token prompt
    # and a 24-token reference: "degenerate" must reproduce origin, "real" must change the logits.
    # Either may be None with a "why"; "covered_by" names the test that covers a method needing
    # inputs the matrix cannot build (another checkpoint, a Modifier file).
    test_params: ClassVar[dict] = {}
    # The attributes ``begin`` sets afresh for each sample (kept sets, scores, a generator); everything else is
    # parameters or totals over samples. A batch of prompts keeps one such state per row and hands each row's
    # to the method around that row's attention calls. None: not declared, so a method with a ``begin`` of its
    # own scores one prompt per forward (tests/test_batch.py holds every declared method equal to batch 1).
    per_sample: ClassVar[tuple[str, ...] | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        dataclasses.dataclass(cls)  # in place: every subclass collects its own fields and its bases'

    def validate(self) -> None:
        """Raise ValueError naming the parameter when a value is out of range."""

    @classmethod
    def resolve_paths(cls, params: dict, root: Path) -> dict:
        """``params`` with the files it names made absolute against ``root``, the suite file's directory, before
        the method is built: a suite names the same files from whatever directory it runs in."""
        return params

    def __post_init__(self):
        self.validate()
        self._kept: dict[int, list] = {}

    @property
    def batches(self) -> bool:
        """Whether B prompts may share a forward (``--fidbench-batch-size``): kinds none, weights, model (the model
        takes a padded batch with its mask) and attention (each row's attention calls reach the hook as the calls
        of that prompt alone, ``fidbench.attention``), where the per-sample state is declared (``per_sample``) by
        every method that has a ``begin`` of its own, here and in its ``parts``. Caches (their quantization groups
        would span rows) and kvpress's presses (they compress the cache physically) score one prompt per forward."""
        return self.kind in ("none", "weights", "model", "attention") and self._state_declared()

    def _state_declared(self) -> bool:
        own = type(self).begin is Method.begin or self.per_sample is not None
        return own and all(part._state_declared() for part in self.parts())

    def parts(self) -> list[Method]:
        """Methods this one runs inside itself (a stack's members, adakv's scorer): their state is its state."""
        return []

    def sample_state(self):
        """This sample's state (``per_sample``, its parts' too): what a batch keeps for each of its rows."""
        return {n: getattr(self, n) for n in self.per_sample or ()}, [part.sample_state() for part in self.parts()]

    def use_sample_state(self, state) -> None:
        """Make ``state`` (from ``sample_state``) this method's current sample."""
        own, parts = state
        for name, value in own.items():
            setattr(self, name, value)
        for part, part_state in zip(self.parts(), parts):
            part.use_sample_state(part_state)

    def params(self) -> dict:
        return dataclasses.asdict(self)

    def runs_on(self, config) -> bool:
        """False where every attention layer slides and this method compresses only full-attention ones."""
        return not self.full_attention_only or "full_attention" in attention.layer_kinds(config)

    @contextlib.contextmanager
    def apply(self, model, context=None):
        if not self.runs_on(model.config):
            raise ValueError(
                f"method {self.name!r} cannot run on {model.config.model_type}: every attention layer of this "
                f"model uses a sliding window, and {self.name} compresses only full-attention layers (sliding "
                f"ones keep the model's own window), so it would run the base model unchanged"
            )
        if self.kind != "attention":
            yield model
        else:
            with attention.installed(model, self.name):
                yield model

    def new_cache(self, model):
        """The cache a prefill starts from; None: the model's own (a DynamicCache)."""
        return None

    def begin(self, prompt_len: int) -> None:
        """Called before each sample's prefill."""

    def attend(self, call: attention.AttentionCall):
        return None

    def record(self, layer: int, kept, visible) -> None:
        """Count ``kept`` of ``visible`` key positions (summed over heads and queries) at ``layer``.

        Counts may be tensors: they are summed where they live and read once, in ``kept()``, so a
        hook never waits for the GPU.
        """
        acc = self._kept.setdefault(layer, [0, 0])
        acc[0] = acc[0] + kept
        acc[1] = acc[1] + visible

    def record_mask(self, call: attention.AttentionCall, mask: torch.Tensor | None = None) -> None:
        """Record what decode queries attend to: the prompt keys ``mask`` (bool, True = attend; None =
        everything the model shows) leaves visible, against those the model's own mask shows.

        Works on every layer kind: on a sliding-window layer the prompt keys are those still inside
        the window. Prefill calls record nothing.
        """
        if call.phase.name != "decode":
            return
        n = call.prompt_keys()
        visible = call.visible()[..., :n]
        shape = (*call.query.shape[:3], n)  # (batch, heads, queries, prompt keys)
        seen = visible.expand(shape).sum()
        kept = seen if mask is None else (mask[..., :n] & visible).expand(shape).sum()
        self.record(call.layer_idx, kept, seen)

    def kept(self) -> dict:
        """Fraction of visible prompt KV entries that decode queries attended, overall and per layer."""
        if not self._kept:
            return {}
        layers = sorted(self._kept)
        counts = [(float(self._kept[i][0]), float(self._kept[i][1])) for i in layers]
        kept = sum(k for k, _ in counts)
        visible = sum(v for _, v in counts)
        return {
            "kv_fraction": kept / visible if visible else 1.0,
            "kv_fraction_per_layer": [k / max(v, 1.0) for k, v in counts],
        }


def beside(root: Path, value):
    """A relative file path ``value`` as seen from ``root``, made absolute; an absolute one or a non-string (left
    to the parameter's type check) as given."""
    return str((root / value).resolve()) if isinstance(value, str) and value else value


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))


def accepts(hint, value: Any) -> bool:
    """Whether a YAML ``value`` fits the annotation ``hint``: bool is not a number, an int is a float."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return any(accepts(a, value) for a in typing.get_args(hint))
    if origin is not None:  # dict[str, int], list[int], ...: the container type
        return isinstance(value, origin)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def parameters(cls: type[Method]) -> dict[str, Any]:
    """A method's parameters with their resolved annotations (postponed annotations included)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def build(method: str, params: dict, where: str | None = None) -> Method:
    """Instantiate a registered method, with clear errors for unknown names, parameters and types.

    ``where`` (e.g. the suite variant) starts every message."""
    who = where or f"method {method!r}"
    if method not in REGISTRY:
        raise ValueError(f"{who}: unknown method {method!r}; registered: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[method]
    hints = parameters(cls)
    unknown = sorted(set(params) - set(hints))
    if unknown:
        raise ValueError(
            f"{who}: unknown parameter(s) {', '.join(unknown)} for method {method!r}; "
            f"it takes: {', '.join(sorted(hints)) or 'no parameters'}"
        )
    for key, value in params.items():
        if not accepts(hints[key], value):
            raise ValueError(
                f"{who}: parameter {key!r} of method {method!r} must be {_type_name(hints[key])}, "
                f"got {show(value)} ({type(value).__name__})"
            )
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{who}: {e}") from None
    except Exception as e:  # a method's validate() that fails otherwise: still one line naming the variant
        raise ValueError(f"{who}: checking the parameters of method {method!r} raised {type(e).__name__}: {e}") from e
