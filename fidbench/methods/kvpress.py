"""``kvpress``: any press of the installed kvpress (NVIDIA/kvpress, ``pip install 'fidbench[kvpress]'``), applied
as kvpress applies it, scored like every method.

``{method: kvpress, press: SnapKVPress, compression_ratio: 0.9, press_params: {window_size: 64}}``. Wrapper presses
take their inner press as a spec of the same form: ``inner: {press: SnapKVPress, compression_ratio: 0.5}`` fills
the wrapper's one press field (AdaKVPress's ``press``, DecodingPress's ``base_press``), a list fills ComposedPress's
``presses``, and a mapping of field names to specs fills a press with several (PrefillDecodingPress). The top-level
``compression_ratio`` is set on the outer press (a wrapper passes it to its inner press, as kvpress's properties
do). Names, parameters and their types are checked against the presses' signatures before any model loads.

How it runs (kind ``"model"``: ``apply`` yields the model wrapped as kvpress's pipeline drives it). No fidbench
attention hook runs, so fidbench masks nothing on top of the press: what decode queries see is the cache the press
left, physically. The prefill is ``with press(model): model(prompt, DynamicCache())``: kvpress's forward hooks
compress each layer's cache physically after its attention (the prefill's own logits are those of the dense
layers, as in kvpress), or record keys to hide per head (``masked_key_indices``: AdaKV, DuoAttention, DMS), which
kvpress's patch of transformers' attention functions replaces by keys drawing no attention while decoding. The
whole prompt is compressed (kvpress's pipeline would leave a separate question uncompressed: fidbench prompts have
none). Teacher forcing then feeds the reference over that cache with logical position ids (the prompt length
plus the tokens fed, or the compressed length for presses that re-rotate keys, as kvpress's pipeline does), with
the press's hooks installed again only for decoding presses (DecodingPress, PrefillDecodingPress, DMSPress with
``decoding``), once from the first decode step to the next prefill (a decoding press counts steps and resets
when its context exits). Decoding presses run stepwise (``parallel_exact`` False). A prefill-only press leaves a
fixed cache, so the reference goes in one forward, except where one forward cannot be exact: when layers keep
different lengths (PyramidKV), transformers builds one causal mask from the first layer's length; where a press
hides keys, kvpress searches one fake key that draws no attention from every query of the forward (a search that
fails for many queries in few dimensions: 46 queries of a 16-dimensional head did). There the wrapper feeds the
tokens one at a time, exactly what a stepwise decode does. Every sample gets a fresh press (presses keep per-run
buffers). After the method, the attributes kvpress's hooks left on the attention modules (``masked_key_indices``,
``rotary_emb``) are removed, so later cases run the model unchanged.

``kept()``: per layer, the cache entries a KV head holds (minus the keys it hides) over the positions fed so
far, read once per sample from the cache the press left: after the prefill for prefill-only presses (the prompt
positions kept, fidbench's ``kv_fraction``), after the last decode step for decoding presses.

Presses that fetch files from the internet (trained scorers, head patterns, statistics) are refused unless
their file parameter points at a local copy (``path`` is passed to it); a missing kvpress fails with the
install command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
import typing
from typing import Any

import torch

from .base import Method, _type_name, accepts, register

INSTALL = "pip install 'fidbench[kvpress]'"
# Presses that download during post_init_from_model: what they fetch, and the parameter taking a local copy.
NEEDS_FILES = {
    "DuoAttentionPress": ("head patterns from mit-han-lab/duo-attention (or BookSum for on-the-fly scoring)", None),
    "ExpectedAttentionStatsPress": ("query statistics from the Hugging Face hub", "stats_folder"),
    "FastKVzipPress": ("trained gates from the Hugging Face hub (Jang-Hyun/Fast-KVzip)", None),
    "KVzapPress": ("a trained scorer from the Hugging Face hub (nvidia/KVzap-<type>-<model>)", None),
    "LUKVPress": ("layer importances from baidu-baige/LU-KV", None),
    "QFilterPress": ("Q-filters from the Hugging Face hub (nthngdy/<model>_qfilt)", None),
    "RestoreKVPress": ("restore embeddings and an adapter from the Hugging Face hub (higokri/RestoreKV-<model>)", None),
}

# Presses that need a prompt fidbench's datasets do not have: why.
NEEDS_QUESTION = {
    "FinchPress": "it needs context + delimiter token + question (update_model_and_tokenizer adds the token, and "
                  "the press cuts its window at it); fidbench's prompts have no separate question",
}


@functools.cache
def presses() -> dict[str, type]:
    """Every press class the installed kvpress exports, by name; ValueError with the install command without it."""
    try:
        import kvpress
    except ImportError as e:
        raise ValueError(f"kvpress is not installed ({e}); install it with: {INSTALL}") from None
    bases = (kvpress.BasePress, kvpress.ScorerPress)  # abstract: they compress nothing themselves
    return {n: c for n in dir(kvpress) if isinstance(c := getattr(kvpress, n), type)
            and issubclass(c, kvpress.BasePress) and c not in bases}


def _press_types(hint) -> bool:
    """Whether an annotation holds a press (``ScorerPress``, ``Optional[DecodingPress]``, ``list[BasePress]``)."""
    import kvpress

    if isinstance(hint, type):
        return issubclass(hint, kvpress.BasePress)
    return any(_press_types(a) for a in typing.get_args(hint))


def fields(cls: type) -> dict[str, tuple[Any, bool]]:
    """A press class's parameters: name -> (annotation, required). From its ``__init__``: a few presses
    (CriticalKVPress) write their own instead of the dataclass's."""
    hints = typing.get_type_hints(cls.__init__)
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: (hints.get(p.name, Any), p.default is inspect.Parameter.empty)
            for p in params if not p.name.startswith("_")}  # _: kvpress's internals


def make(spec: dict, who: str):
    """A press from ``{press, compression_ratio?, press_params?, inner?, path?}``; errors start with ``who``."""
    spec = dict(spec)
    name = spec.pop("press", None)
    catalogue = presses()
    if not isinstance(name, str) or name not in catalogue:
        raise ValueError(f"{who}: unknown press {name!r}; kvpress {_version()} has: {', '.join(sorted(catalogue))}")
    who = f"{who}: {name}"
    cls = catalogue[name]
    ratio, params, inner, path = (spec.pop(k, None) for k in ("compression_ratio", "press_params", "inner", "path"))
    if spec:
        raise ValueError(f"{who}: unknown key(s) {', '.join(sorted(spec))}; a press spec takes press, "
                         f"compression_ratio, press_params, inner, path")
    params = dict(params or {})
    known = fields(cls)
    nested = sorted(k for k, (hint, _) in known.items() if _press_types(hint))
    unknown = sorted(set(params) - set(known))
    if unknown:
        plain = sorted(set(known) - set(nested))
        raise ValueError(f"{who}: unknown parameter(s) {', '.join(unknown)}; it takes: {', '.join(plain) or 'none'}"
                         + (f" (and inner presses for {', '.join(nested)})" if nested else ""))
    for key, value in params.items():
        hint = known[key][0]
        if key in nested:
            raise ValueError(f"{who}: {key} is a press: give it as inner")
        if not accepts(hint, value):
            raise ValueError(f"{who}: parameter {key!r} must be {_type_name(hint)}, "
                             f"got {value!r} ({type(value).__name__})")
    if inner is not None:
        if not nested:
            raise ValueError(f"{who}: it wraps no press, so it takes no inner")
        if isinstance(inner, dict) and "press" not in inner:  # field name -> spec
            bad = sorted(set(inner) - set(nested))
            if bad:
                raise ValueError(f"{who}: inner names {', '.join(bad)}; its press fields are {', '.join(nested)}")
            params.update({k: make(v, f"{who} {k}") for k, v in inner.items()})
        elif len(nested) > 1:
            raise ValueError(f"{who}: it has several press fields ({', '.join(nested)}): give inner as a mapping")
        elif isinstance(inner, list):
            params[nested[0]] = [make(s, f"{who} inner[{i}]") for i, s in enumerate(inner)]
        else:
            params[nested[0]] = make(inner, f"{who} inner")
    missing = sorted(k for k, (_, required) in known.items() if required and k not in params)
    if missing:
        raise ValueError(f"{who}: required parameter(s) missing: {', '.join(missing)}"
                         f"{' (give inner presses as inner)' if set(missing) & set(nested) else ''}")
    if name in NEEDS_QUESTION:
        raise ValueError(f"{who} cannot run on fidbench's prompts: {NEEDS_QUESTION[name]}")
    if name in NEEDS_FILES:
        what, local = NEEDS_FILES[name]
        if path is None or local is None:
            raise ValueError(f"{who} downloads {what} when it is applied, and fidbench runs offline: "
                             + (f"give path: a local copy (passed as {local})" if local else
                                "kvpress takes no local copy for it, so it cannot run here"))
        params[local] = path
    elif path is not None:
        raise ValueError(f"{who}: path is for presses that load files ({', '.join(sorted(NEEDS_FILES))})")
    if ratio is not None:
        if not accepts(float, ratio):
            raise ValueError(f"{who}: compression_ratio must be a number, got {ratio!r}")
        if "compression_ratio" in known:
            params["compression_ratio"] = ratio
    try:
        press = cls(**params)
        if ratio is not None and "compression_ratio" not in known:
            if not isinstance(getattr(cls, "compression_ratio", None), property):
                raise ValueError("it takes no compression_ratio")
            press.compression_ratio = ratio  # a wrapper's property sets its inner press's
    except (AssertionError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{who}: {e}") from None
    return press


def _version() -> str:
    from importlib.metadata import version

    import kvpress

    return version(kvpress.__name__)


def describe() -> str:
    """The installed presses with their parameters (for ``fidbench methods``), or why there are none."""
    try:
        catalogue = presses()
    except ValueError as e:
        return f"    (no presses: {e})"
    lines = [f"    presses of kvpress {_version()}:"]
    for name in sorted(catalogue):
        params = ", ".join(f"{k}: {_type_name(h)}" for k, (h, _) in fields(catalogue[name]).items())
        lines.append(f"      {name}({params})" + ("  [needs internet files]" if name in NEEDS_FILES else ""))
    return "\n".join(lines)


def _attention_modules(model) -> list:
    """The attention modules kvpress hooks (its own rule: ``model.model[.language_model].layers``)."""
    inner = model.model.language_model if hasattr(model.model, "language_model") else model.model
    return [layer.self_attn for layer in inner.layers]


@register
class KVPress(Method):
    name = "kvpress"
    description = "any press of the installed kvpress, applied as kvpress applies it (physical cache compression)"
    defaults_from = "the press class's own defaults in the installed kvpress (`fidbench methods` lists them)"
    kind = "model"
    test_params = {"covered_by": "tests/test_kvpress.py::test_compression_ratio_zero_is_origin_bit_for_bit"}
    press: str = ""
    compression_ratio: float | None = None
    press_params: dict = dataclasses.field(default_factory=dict)
    inner: dict | list | None = None
    path: str | None = None
    # The attention the press runs with, as a kvpress user loads the model: "eager" for presses that read the
    # attention weights (ObservedAttentionPress); restored afterwards. None: the model's own (SDPA).
    attn_implementation: str | None = None

    def spec(self) -> dict:
        spec = {"press": self.press, "compression_ratio": self.compression_ratio, "press_params": self.press_params,
                "inner": self.inner, "path": self.path}
        return {k: v for k, v in spec.items() if v is not None}

    def validate(self):
        if not self.press:
            raise ValueError(f"kvpress: press (a kvpress class name) is required; {INSTALL} provides them")
        if self.attn_implementation not in (None, "eager", "sdpa"):
            raise ValueError(f"kvpress: attn_implementation must be eager or sdpa, got {self.attn_implementation!r}")
        self._decoding = self.is_decoding(make(self.spec(), "kvpress"))

    @staticmethod
    def is_decoding(press) -> bool:
        """Whether kvpress's pipeline installs the press while decoding (its own rule)."""
        import kvpress

        return isinstance(press, (kvpress.DecodingPress, kvpress.PrefillDecodingPress)) or (
            isinstance(press, kvpress.DMSPress) and press.decoding)

    @property
    def parallel_exact(self) -> bool:
        """stepwise for a decoding press (it compresses between steps), parallel otherwise"""
        return not self._decoding

    def __post_init__(self):
        super().__post_init__()
        self._held = {}  # layer -> [entries held per KV head, positions] summed over samples
        self._last = {}  # this sample's latest count, per layer (a decoding press's changes with every step)

    @contextlib.contextmanager
    def apply(self, model, context=None):
        modules = _attention_modules(model)
        had_rotary = [hasattr(m, "rotary_emb") for m in modules]
        previous = model.config._attn_implementation
        if self.attn_implementation:
            model.set_attn_implementation(self.attn_implementation)
        pressed = Pressed(model, self)
        try:
            yield pressed
        finally:  # what kvpress's hooks leave on the modules would change later cases
            pressed.decoding.close()
            model.set_attn_implementation(previous)
            for module, had in zip(modules, had_rotary):
                module.__dict__.pop("masked_key_indices", None)
                if not had and hasattr(module, "rotary_emb"):
                    del module.rotary_emb

    def begin(self, prompt_len: int) -> None:
        self._fold()
        self.current = make(self.spec(), "kvpress")  # fresh per sample: presses keep per-run buffers

    def note_cache(self, model, cache, positions: int) -> None:
        """This sample's cache now: what each layer holds per KV head, minus the keys the press hides, of
        ``positions`` fed so far (shapes only: nothing is read from the device)."""
        for i, module in enumerate(_attention_modules(model)):
            keys = cache.layers[i].keys
            heads = keys.shape[0] * keys.shape[1]
            hidden = getattr(module, "masked_key_indices", None)
            self._last[i] = (keys.shape[2] - (0 if hidden is None else len(hidden[0]) / heads), positions)

    def _fold(self) -> None:
        for i, (held, positions) in self._last.items():
            acc = self._held.setdefault(i, [0, 0])
            acc[0] += held
            acc[1] += positions
        self._last = {}

    def kept(self) -> dict:
        self._fold()
        if not self._held:
            return {"press": self.spec()}
        per_layer = [self._held[i][0] / self._held[i][1] for i in sorted(self._held)]
        return {"kv_fraction": sum(h for h, _ in self._held.values()) / sum(n for _, n in self._held.values()),
                "kv_fraction_per_layer": per_layer, "press": self.spec()}


class Pressed(torch.nn.Module):
    """``model`` run as kvpress's pipeline runs it, behind the forward the engine calls (see the module doc)."""

    def __init__(self, model, method: KVPress):
        super().__init__()
        self.model, self.method = model, method
        self.config = model.config
        self.position = self.prompt = self.fed = 0  # the next token's logical position, the prompt, tokens fed
        self.decoding = contextlib.ExitStack()  # a decoding press's hooks: first decode step to next prefill

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def _run(self, ids, cache, positions=None, logits_to_keep=0):
        from .. import engine

        extra = {} if positions is None else {"position_ids": positions}
        return engine.call_model(self.model, cache, input_ids=ids, logits_to_keep=logits_to_keep, **extra)

    def forward(self, input_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        import kvpress
        from transformers import DynamicCache

        method, press = self.method, self.method.current
        decoding = method.is_decoding(press)
        if past_key_values is None:  # the prefill
            self.decoding.close()  # the last sample's decode is over (a decoding press resets on exit)
            cache = DynamicCache()
            with contextlib.nullcontext() if isinstance(press, kvpress.DecodingPress) else press(self.model):
                logits, cache = self._run(input_ids, cache, logits_to_keep=logits_to_keep)
            self.prompt = self.position = input_ids.shape[1]
            self.fed = 0
            rerotated = (kvpress.RestoreKVPress, kvpress.KeyRerotationPress)
            if isinstance(press, rerotated) or (isinstance(press, kvpress.FinchPress) and press.rerotate_keys):
                self.position = cache.get_seq_length()
            if not decoding:
                method.note_cache(self.model, cache, self.prompt)
            return types.SimpleNamespace(logits=logits, past_key_values=cache)
        n = input_ids.shape[1]
        positions = torch.arange(self.position, self.position + n, device=input_ids.device)[None]
        ragged = len({layer.keys.shape[2] for layer in past_key_values.layers}) > 1
        hides = any(getattr(m, "masked_key_indices", None) is not None for m in _attention_modules(self.model))
        if decoding and self.fed == 0:  # installed once for the whole decode, as kvpress's pipeline does
            self.decoding.enter_context(press(self.model))
        if n > 1 and (ragged or hides):  # see the module doc: token by token
            rows = [self._run(input_ids[:, t : t + 1], past_key_values, positions[:, t : t + 1])[0] for t in range(n)]
            logits, cache = torch.cat(rows, 1), past_key_values
        else:
            logits, cache = self._run(input_ids, past_key_values, positions, logits_to_keep)
        self.position += n
        self.fed += n
        if decoding:
            method.note_cache(self.model, cache, self.prompt + self.fed)  # noted each step: the last one stands
        return types.SimpleNamespace(logits=logits, past_key_values=cache)
