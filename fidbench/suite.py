"""The suite file: models × method variants × datasets, generation settings and fidelity floors.

Every problem is reported as a ``SuiteError`` naming the file and the offending key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import metrics
from .methods import REGISTRY, build
from .models import DTYPES

OVERLONG = ("truncate", "skip")
_ID = re.compile(r"^[A-Za-z0-9_.+:\[\]/-]+$")  # characters pytest keeps in test ids


class SuiteError(ValueError):
    pass


@dataclass
class ModelSpec:
    name: str
    path: str = ""  # a directory (relative to the suite file), a locally cached hub id, or an embedded name
    tokenizer: str | None = None
    dtype: str = "fp32"
    device: str = "cpu"
    max_length: int | None = None  # default: the model's max_position_embeddings
    overlong: str = "truncate"


@dataclass
class DatasetSpec:
    name: str
    path: Path
    kind: str  # "conversations", "references" (original {"p_ids", "g_ids"} lines) or "text" (plain text)
    scored: bool = True  # False: calibration data for methods only, never evaluated
    default: bool = True  # False: scored only by the variants that name it in their ``datasets``
    window: int | None = None  # text: tokens per window (default: the model's max_length)
    stride: int | None = None  # text: tokens between window starts (default: half the window)


@dataclass
class Variant:
    name: str
    method: str
    params: dict
    tags: list[str] = field(default_factory=list)  # extra pytest markers: `pytest -m quick`
    datasets: list[str] | None = None  # the datasets it scores (default: every scored dataset with default: true)
    models: list[str] | None = None  # the models it runs on (default: all); e.g. heads or a checkpoint made for one
    free_run: bool = False  # also let the method generate on its own and score that (fidbench.engine.free_run)


@dataclass
class Case:
    model: ModelSpec
    variant: Variant
    floors: dict

    @property
    def id(self) -> str:
        return f"{self.model.name}-{self.variant.name}"


@dataclass
class Suite:
    path: Path
    max_new_tokens: int = 64
    decode: str = "auto"
    share_prefill_gib: float = 0  # > 0: record base prefills once, up to this much memory (fidbench.prefill)
    models: list[ModelSpec] = field(default_factory=list)
    datasets: list[DatasetSpec] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    floors: dict = field(default_factory=dict)  # model -> variant -> metric -> bound

    def scored_by(self, variant: Variant) -> list[str]:
        """Names of the datasets ``variant`` scores, in suite order."""
        return [d.name for d in self.datasets if d.scored and (
            d.name in variant.datasets if variant.datasets is not None else d.default)]

    def cases(self) -> list[Case]:
        """Every model × variant, in file order (stable across xdist workers)."""
        out = []
        for model in self.models:
            for variant in self.variants:
                if variant.models is not None and model.name not in variant.models:
                    continue
                floors = dict(self.floors.get("*", {}).get(variant.name, {}))
                floors.update(self.floors.get(model.name, {}).get(variant.name, {}))
                out.append(Case(model, variant, floors))
        return out


def _keys(where: str, data, allowed: set[str], required: set[str] = frozenset()) -> dict:
    if not isinstance(data, dict):
        raise SuiteError(f"{where}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise SuiteError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(data))
    if missing:
        raise SuiteError(f"{where}: missing key {missing[0]!r}")
    return data


def _mapping(where: str, data) -> dict:
    """``data`` when it is a mapping (an empty section is an empty one), else an error naming the key."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise SuiteError(f"{where}: expected a mapping of names to entries, got {type(data).__name__}")
    return data


def _name(where: str, name) -> str:
    if not isinstance(name, str) or not _ID.match(name):
        raise SuiteError(f"{where}: name {name!r} may hold only letters, digits and _ . + : [ ] / -")
    return name


def _local(suite: Path, value):
    """A model path relative to the suite file when such a directory exists, else as written (hub id)."""
    candidate = suite.parent / str(value)
    return str(candidate.resolve()) if candidate.is_dir() else str(value)


def _floors(where: str, data) -> dict:
    """Floors by metric: finite numbers inside the metric's range (outside it a floor never or always holds)."""
    known = metrics.known_metrics()
    for metric, bound in _keys(where, data, known).items():
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound):
            raise SuiteError(f"{where}.{metric}: floor must be a finite number, got {bound!r}")
        lo, hi = metrics.floor_range(metric)
        if not lo <= bound <= hi:
            minimum = metric in metrics.HIGHER_IS_BETTER
            never = bound > hi if minimum else bound < lo
            raise SuiteError(f"{where}.{metric}: floor {bound} is outside the metric's range [{lo:g}, {hi:g}]: "
                             f"this {'minimum' if minimum else 'maximum'} would {'never' if never else 'always'} hold")
    return dict(data)


def load(path: str | Path) -> Suite:
    path = Path(path)
    if not path.exists():
        raise SuiteError(f"suite file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML: {e}") from None
    f = str(path)
    _keys(f, raw, {"generation", "models", "datasets", "methods", "floors"}, {"models", "datasets", "methods"})
    suite = Suite(path)

    gen = _keys(f"{f}: generation", raw.get("generation") or {}, {"max_new_tokens", "decode", "share_prefill_gib"})
    suite.max_new_tokens = gen.get("max_new_tokens", suite.max_new_tokens)
    if not isinstance(suite.max_new_tokens, int) or isinstance(suite.max_new_tokens, bool) or suite.max_new_tokens < 1:
        raise SuiteError(f"{f}: generation.max_new_tokens must be a positive integer")
    suite.decode = gen.get("decode", suite.decode)
    if suite.decode not in ("auto", "parallel", "stepwise"):
        raise SuiteError(f"{f}: generation.decode must be auto, parallel or stepwise, got {suite.decode!r}")
    suite.share_prefill_gib = gen.get("share_prefill_gib", suite.share_prefill_gib)
    if not isinstance(suite.share_prefill_gib, (int, float)) or isinstance(suite.share_prefill_gib, bool) \
            or suite.share_prefill_gib < 0:
        raise SuiteError(f"{f}: generation.share_prefill_gib must be a number of GiB >= 0 (0: every case prefills "
                         f"its prompts itself), got {suite.share_prefill_gib!r}")

    model_keys = {"path", "tokenizer", "dtype", "device", "max_length", "overlong"}
    for name, spec in _mapping(f"{f}: models", raw["models"]).items():
        where = f"{f}: models.{_name(f'{f}: models', name)}"
        spec = _keys(where, spec or {}, model_keys)
        for key in ("path", "tokenizer", "dtype", "device", "overlong"):
            if key in spec and not isinstance(spec[key], str):
                raise SuiteError(f"{where}.{key}: must be a string, got {spec[key]!r}")
        model = ModelSpec(name=name, **{k: _local(path, v) if k in ("path", "tokenizer") else v for k, v in spec.items()})
        model.path = model.path or name
        if model.dtype not in DTYPES:
            raise SuiteError(f"{where}.dtype: {model.dtype!r} is not one of {', '.join(sorted(DTYPES))}")
        if model.overlong not in OVERLONG:
            raise SuiteError(f"{where}.overlong: {model.overlong!r} is not one of {', '.join(OVERLONG)}")
        if not re.match(r"^(cpu|cuda(:\d+)?|auto|mps)$", str(model.device)):
            raise SuiteError(f"{where}.device: {model.device!r} is not cpu, cuda, cuda:N or auto")
        if model.max_length is not None and (not isinstance(model.max_length, int) or isinstance(model.max_length, bool)
                                             or model.max_length <= suite.max_new_tokens):
            raise SuiteError(f"{where}.max_length must be an integer above max_new_tokens ({suite.max_new_tokens})")
        suite.models.append(model)

    kinds = {"path": "conversations", "references": "references", "text": "text"}
    for name, spec in _mapping(f"{f}: datasets", raw["datasets"]).items():
        where = f"{f}: datasets.{_name(f'{f}: datasets', name)}"
        allowed = {*kinds, "score", "default", "window", "stride"}
        spec = {"path": spec} if isinstance(spec, str) else dict(_keys(where, spec, allowed))
        flags = {key: spec.pop(key, True) for key in ("score", "default")}
        for key, value in flags.items():
            if not isinstance(value, bool):
                raise SuiteError(f"{where}.{key}: must be true or false, got {value!r}")
        sizes = {key: spec.pop(key, None) for key in ("window", "stride")}
        if len(spec) != 1:
            raise SuiteError(f"{where}: give exactly one of 'path' (conversations), 'references' (p_ids/g_ids) "
                             f"or 'text' (plain text)")
        kind, rel = next(iter(spec.items()))
        for key, value in sizes.items():
            if value is not None and kind != "text":
                raise SuiteError(f"{where}.{key}: only a 'text' dataset is split into windows")
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SuiteError(f"{where}.{key}: must be a positive integer, got {value!r}")
        if None not in sizes.values() and sizes["stride"] >= sizes["window"]:
            raise SuiteError(f"{where}.stride: must be below the window ({sizes['window']}), so that every window "
                             f"after the first has context; got {sizes['stride']}")
        if not isinstance(rel, str):
            raise SuiteError(f"{where}.{kind}: must be a file path, got {rel!r}")
        file = (path.parent / rel).resolve()
        if not file.exists():
            raise SuiteError(f"{where}: file {file} does not exist")
        if not file.is_file():
            expected = "text" if kind == "text" else "JSONL"
            raise SuiteError(f"{where}: {file} is not a file (a {expected} file is expected)")
        suite.datasets.append(DatasetSpec(name, file, kinds[kind], flags["score"], flags["default"], **sizes))

    default_floors: dict = {}
    for name, spec in _mapping(f"{f}: methods", raw["methods"]).items():
        where = f"{f}: methods.{_name(f'{f}: methods', name)}"
        if not isinstance(spec, (dict, type(None))):
            raise SuiteError(f"{where}: expected a mapping of the method's parameters (and method, floors, tags), "
                             f"got {type(spec).__name__} {spec!r}")
        spec = dict(spec or {})
        if "stack" in spec:  # several methods applied together (fidbench.methods.stack)
            if "method" in spec:
                raise SuiteError(f"{where}: give either stack (its members) or method, not both")
            spec["method"], spec["members"] = "stack", spec.pop("stack")
        method = spec.pop("method", name)
        if not isinstance(method, str) or method not in REGISTRY:
            raise SuiteError(f"{where}.method: unknown method {method!r} (registered: {', '.join(sorted(REGISTRY))})")
        if "floors" in spec:
            default_floors[name] = _floors(f"{where}.floors", spec.pop("floors"))
        tags = spec.pop("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and t.isidentifier() for t in tags):
            raise SuiteError(f"{where}.tags: must be a list of marker names (letters, digits, _), got {tags!r}")
        names = spec.pop("datasets", None)
        scored = [d.name for d in suite.datasets if d.scored]
        if names is not None and (not isinstance(names, list) or not names or not all(n in scored for n in names)):
            raise SuiteError(f"{where}.datasets: must be a non-empty list of scored datasets of this suite "
                             f"({', '.join(scored)}), got {names!r}")
        only = spec.pop("models", None)
        known = [m.name for m in suite.models]
        if only is not None and (not isinstance(only, list) or not only or not all(m in known for m in only)):
            raise SuiteError(f"{where}.models: must be a non-empty list of models of this suite ({', '.join(known)}), "
                             f"got {only!r}")
        free_run = spec.pop("free_run", False)
        if not isinstance(free_run, bool):
            raise SuiteError(f"{where}.free_run: must be true or false, got {free_run!r}")
        if free_run and REGISTRY[method].kind == "own_loop":
            raise SuiteError(f"{where}.free_run: method {method!r} scores samples in its own loop (kind 'own_loop'), "
                             f"so fidbench cannot let it generate on its own")
        try:
            build(method, spec, where)
        except ValueError as e:
            raise SuiteError(str(e)) from None
        variant = Variant(name, method, spec, tags, names, only, free_run)
        if not suite.scored_by(variant) and any(d.scored for d in suite.datasets):  # none scored: refused below
            raise SuiteError(f"{where}: scores no dataset (every scored dataset has default: false); give datasets")
        suite.variants.append(variant)
    suite.floors["*"] = default_floors

    variants = {v.name for v in suite.variants}
    for model, per_variant in _keys(f"{f}: floors", raw.get("floors") or {}, {m.name for m in suite.models}).items():
        for variant, bounds in _keys(f"{f}: floors.{model}", per_variant or {}, variants).items():
            suite.floors.setdefault(model, {})[variant] = _floors(f"{f}: floors.{model}.{variant}", bounds)
    for case in suite.cases():
        free = sorted(set(case.floors) & set(metrics.FREE_RUN))
        if free and not case.variant.free_run:
            raise SuiteError(f"{f}: {case.id}: floors on {', '.join(free)}, free-running scores, need "
                             f"'free_run: true' in methods.{case.variant.name}")
    if not suite.models or not any(d.scored for d in suite.datasets) or not suite.variants:
        raise SuiteError(f"{f}: models, datasets (at least one scored) and methods must each name at least one entry")
    seen: dict[str, Case] = {}
    for case in suite.cases():  # pytest would rename a duplicate id, and the report would keep one of them
        if case.id in seen:
            other = seen[case.id]
            raise SuiteError(f"{f}: model {other.model.name!r} × variant {other.variant.name!r} and model "
                             f"{case.model.name!r} × variant {case.variant.name!r} have the same case id "
                             f"{case.id!r}; rename one of them")
        seen[case.id] = case
    return suite
