"""The suite file: models × method variants × datasets, generation settings and fidelity floors.

Every problem is reported as a ``SuiteError`` naming the file and the offending key.
"""

from __future__ import annotations

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
    kind: str  # "conversations" or "references" (original {"p_ids", "g_ids"} lines)
    scored: bool = True  # False: calibration data for methods only, never evaluated


@dataclass
class Variant:
    name: str
    method: str
    params: dict
    tags: list[str] = field(default_factory=list)  # extra pytest markers: `pytest -m quick`


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
    models: list[ModelSpec] = field(default_factory=list)
    datasets: list[DatasetSpec] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)
    floors: dict = field(default_factory=dict)  # model -> variant -> metric -> bound

    def cases(self) -> list[Case]:
        """Every model × variant, in file order (stable across xdist workers)."""
        out = []
        for model in self.models:
            for variant in self.variants:
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


def _name(where: str, name) -> str:
    if not isinstance(name, str) or not _ID.match(name):
        raise SuiteError(f"{where}: name {name!r} may hold only letters, digits and _ . + : [ ] / -")
    return name


def _local(suite: Path, value):
    """A model path relative to the suite file when such a directory exists, else as written (hub id)."""
    candidate = suite.parent / str(value)
    return str(candidate.resolve()) if candidate.is_dir() else str(value)


def _floors(where: str, data) -> dict:
    known = metrics.known_metrics()
    for metric, bound in _keys(where, data, known).items():
        if not isinstance(bound, (int, float)) or isinstance(bound, bool):
            raise SuiteError(f"{where}.{metric}: floor must be a number, got {bound!r}")
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

    gen = _keys(f"{f}: generation", raw.get("generation") or {}, {"max_new_tokens", "decode"})
    suite.max_new_tokens = gen.get("max_new_tokens", suite.max_new_tokens)
    if not isinstance(suite.max_new_tokens, int) or suite.max_new_tokens < 1:
        raise SuiteError(f"{f}: generation.max_new_tokens must be a positive integer")
    suite.decode = gen.get("decode", suite.decode)
    if suite.decode not in ("auto", "parallel", "stepwise"):
        raise SuiteError(f"{f}: generation.decode must be auto, parallel or stepwise, got {suite.decode!r}")

    model_keys = {"path", "tokenizer", "dtype", "device", "max_length", "overlong"}
    for name, spec in _keys(f"{f}: models", raw["models"], set(raw["models"] or {})).items():
        where = f"{f}: models.{_name(f'{f}: models', name)}"
        spec = _keys(where, spec or {}, model_keys)
        model = ModelSpec(name=name, **{k: _local(path, v) if k in ("path", "tokenizer") else v for k, v in spec.items()})
        model.path = model.path or name
        if model.dtype not in DTYPES:
            raise SuiteError(f"{where}.dtype: {model.dtype!r} is not one of {', '.join(sorted(DTYPES))}")
        if model.overlong not in OVERLONG:
            raise SuiteError(f"{where}.overlong: {model.overlong!r} is not one of {', '.join(OVERLONG)}")
        if not re.match(r"^(cpu|cuda(:\d+)?|auto|mps)$", str(model.device)):
            raise SuiteError(f"{where}.device: {model.device!r} is not cpu, cuda, cuda:N or auto")
        if model.max_length is not None and (not isinstance(model.max_length, int) or model.max_length <= suite.max_new_tokens):
            raise SuiteError(f"{where}.max_length must be an integer above max_new_tokens ({suite.max_new_tokens})")
        suite.models.append(model)

    for name, spec in _keys(f"{f}: datasets", raw["datasets"], set(raw["datasets"] or {})).items():
        where = f"{f}: datasets.{_name(f'{f}: datasets', name)}"
        spec = {"path": spec} if isinstance(spec, str) else dict(_keys(where, spec, {"path", "references", "score"}))
        scored = spec.pop("score", True)
        if not isinstance(scored, bool):
            raise SuiteError(f"{where}.score: must be true or false, got {scored!r}")
        if len(spec) != 1:
            raise SuiteError(f"{where}: give exactly one of 'path' (conversations) or 'references' (p_ids/g_ids)")
        kind, rel = next(iter(spec.items()))
        file = (path.parent / rel).resolve()
        if not file.exists():
            raise SuiteError(f"{where}: file {file} does not exist")
        suite.datasets.append(DatasetSpec(name, file, "references" if kind == "references" else "conversations", scored))

    default_floors: dict = {}
    for name, spec in _keys(f"{f}: methods", raw["methods"], set(raw["methods"] or {})).items():
        where = f"{f}: methods.{_name(f'{f}: methods', name)}"
        spec = dict(spec or {})
        method = spec.pop("method", name)
        if method not in REGISTRY:
            raise SuiteError(f"{where}.method: unknown method {method!r} (registered: {', '.join(sorted(REGISTRY))})")
        if "floors" in spec:
            default_floors[name] = _floors(f"{where}.floors", spec.pop("floors"))
        tags = spec.pop("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and t.isidentifier() for t in tags):
            raise SuiteError(f"{where}.tags: must be a list of marker names (letters, digits, _), got {tags!r}")
        try:
            build(method, spec, where)
        except ValueError as e:
            raise SuiteError(str(e)) from None
        suite.variants.append(Variant(name, method, spec, tags))
    suite.floors["*"] = default_floors

    variants = {v.name for v in suite.variants}
    for model, per_variant in _keys(f"{f}: floors", raw.get("floors") or {}, {m.name for m in suite.models}).items():
        for variant, bounds in _keys(f"{f}: floors.{model}", per_variant or {}, variants).items():
            suite.floors.setdefault(model, {})[variant] = _floors(f"{f}: floors.{model}.{variant}", bounds)
    if not suite.models or not any(d.scored for d in suite.datasets) or not suite.variants:
        raise SuiteError(f"{f}: models, datasets (at least one scored) and methods must each name at least one entry")
    return suite
