"""The suite file: models × method variants × datasets, generation settings and fidelity floors.

Every problem is reported as a ``SuiteError`` naming the file and the offending key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import metrics, models
from .methods import REGISTRY, build
from .methods._weights import Calibrated
from .methods.base import show as _show
from .models import DTYPES

OVERLONG = ("truncate", "skip")
_ID = re.compile(r"^[A-Za-z0-9_.+:\[\]/-]+$")  # characters pytest keeps in test ids
# Markers that pytest or a plugin acts on: as a variant's tag each would change the case's outcome (xfail and
# skip turn a failed floor into exit 0) or how it runs, so a tag may not be one of them.
RESERVED_TAGS = frozenset({"skip", "skipif", "xfail", "usefixtures", "filterwarnings", "parametrize", "tryfirst",
                           "trylast", "benchmark", "xdist_group", "flaky", "timeout", "asyncio", "anyio"})
MAX_VALUES = 100_000  # values a suite may expand to: YAML aliases nested in aliases (a "billion laughs") go beyond


class SuiteError(ValueError):
    pass


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that ``1e-3`` is a float as in YAML 1.2 (YAML 1.1, PyYAML's, reads it as
    the string '1e-3')."""


_Loader.add_implicit_resolver(  # YAML 1.2's floats with an exponent and no dot, or no sign after e: 1e-3, 1.5e3
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _parse(text: str):
    """The suite file's data, read as ``yaml.safe_load`` does, except that a key given twice in one mapping is an
    error naming both lines (YAML keeps the last one, silently). Keys are compared on the composed document, before
    ``<<`` merges (whose keys a mapping may override) are flattened into it."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        stack, visited = [root], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in visited:  # an alias is the node it names: each is checked once
                continue
            visited.add(id(node))
            if isinstance(node, yaml.MappingNode):
                seen = {}
                for key_node, value_node in node.value:
                    stack.append(value_node)
                    if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                        continue
                    key, line = loader.construct_object(key_node), key_node.start_mark.line + 1
                    if key in seen:
                        raise SuiteError(f"line {line}: key {_show(key)} is given twice in one mapping (first on "
                                         f"line {seen[key]}); YAML would keep only the last, silently: remove or "
                                         f"rename one")
                    seen[key] = line
            elif isinstance(node, yaml.SequenceNode):
                stack.extend(node.value)
        return None if root is None else loader.construct_document(root)
    finally:
        loader.dispose()


def _count(data) -> int:
    """How many values ``data`` holds once every alias is expanded, counted up to just above ``MAX_VALUES``."""
    n, stack = 0, [data]
    while stack and n <= MAX_VALUES:
        value = stack.pop()
        n += 1
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return n


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

    def text_scored_by(self, variant: Variant) -> list[str]:
        """Names of the plain-text datasets ``variant`` scores: their windows' reference is the text, not the base
        model's own continuation, so nothing there can be compared with a free run."""
        return [d.name for d in self.datasets if d.kind == "text" and d.name in self.scored_by(variant)]

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
        raise SuiteError(f"{where}: unknown key {_show(unknown[0])} (allowed: {', '.join(sorted(allowed))})")
    missing = sorted(required - set(data))
    if missing:
        raise SuiteError(f"{where}: missing key {_show(missing[0])}")
    return data


def _mapping(where: str, data) -> dict:
    """``data`` when it is a mapping (an empty section is an empty one), else an error naming the key."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise SuiteError(f"{where}: expected a mapping of names to entries, got {type(data).__name__}")
    return data


def _name(where: str, name) -> str:
    if not isinstance(name, str) or not _ID.match(name):
        raise SuiteError(f"{where}: name {_show(name)} may hold only letters, digits and _ . + : [ ] / -")
    return name


def _floors(where: str, data) -> dict:
    """Floors by metric: finite numbers inside the metric's range (outside it a floor never or always holds)."""
    known = metrics.known_metrics()
    for metric, bound in _keys(where, data, known).items():
        if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not math.isfinite(bound):
            raise SuiteError(f"{where}.{metric}: floor must be a finite number, got {_show(bound)}")
        lo, hi = metrics.floor_range(metric)
        if not lo <= bound <= hi:
            minimum = metric in metrics.HIGHER_IS_BETTER
            never = bound > hi if minimum else bound < lo
            raise SuiteError(f"{where}.{metric}: floor {bound} is outside the metric's range [{lo:g}, {hi:g}]: "
                             f"this {'minimum' if minimum else 'maximum'} would {'never' if never else 'always'} hold")
    return dict(data)


def read(path: Path) -> str:
    """A suite file's text, with a clear error for one that is not UTF-8 or cannot be read."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SuiteError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); save the suite "
                         f"file as UTF-8") from None
    except OSError as e:
        raise SuiteError(f"{path}: cannot read the suite file ({e.strerror or e})") from None


def _calibration(where: str, method: Calibrated, suite: Suite, scored: list[str]) -> None:
    """A calibrated method's ``dataset`` is one of the suite's, and not one its variant scores (``scored``) unless
    the variant says ``calibrate_on_scored: true``: prompts a method was fitted on score better than unseen ones."""
    names = [d.name for d in suite.datasets]
    if method.dataset not in names:
        raise SuiteError(f"{where}.dataset: {_show(method.dataset)} is not a dataset of this suite "
                         f"({', '.join(names)}); {method.name} calibrates on one of them")
    if method.dataset in scored and not method.calibrate_on_scored:
        raise SuiteError(f"{where}.dataset: {method.dataset!r} is scored, so {method.name} would be scored on the "
                         f"prompts it was calibrated on, which inflates its scores; calibrate on a calibration-only "
                         f"dataset (score: false), or say calibrate_on_scored: true")


def load(path: str | Path) -> Suite:
    path = Path(path)
    if not path.exists():
        raise SuiteError(f"suite file {path} does not exist")
    text = read(path)
    try:
        raw = _parse(text) or {}
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML: {e}") from None
    except SuiteError as e:
        raise SuiteError(f"{path}: {e}") from None
    if _count(raw) > MAX_VALUES:
        raise SuiteError(f"{path}: the suite expands to more than {MAX_VALUES:,} values (YAML aliases of aliases, "
                         f"a 'billion laughs'?); refused")
    f = str(path)
    _keys(f, raw, {"generation", "models", "datasets", "methods", "floors"}, {"models", "datasets", "methods"})
    suite = Suite(path)

    gen = _keys(f"{f}: generation", raw.get("generation") or {}, {"max_new_tokens", "decode", "share_prefill_gib"})
    suite.max_new_tokens = gen.get("max_new_tokens", suite.max_new_tokens)
    if not isinstance(suite.max_new_tokens, int) or isinstance(suite.max_new_tokens, bool) or suite.max_new_tokens < 1:
        raise SuiteError(f"{f}: generation.max_new_tokens must be a positive integer")
    suite.decode = gen.get("decode", suite.decode)
    if suite.decode not in ("auto", "parallel", "stepwise"):
        raise SuiteError(f"{f}: generation.decode must be auto, parallel or stepwise, got {_show(suite.decode)}")
    suite.share_prefill_gib = gen.get("share_prefill_gib", suite.share_prefill_gib)
    if not isinstance(suite.share_prefill_gib, (int, float)) or isinstance(suite.share_prefill_gib, bool) \
            or not 0 <= suite.share_prefill_gib < math.inf:  # also refuses .nan
        raise SuiteError(f"{f}: generation.share_prefill_gib must be a finite number of GiB >= 0 (0: every case "
                         f"prefills its prompts itself), got {_show(suite.share_prefill_gib)}")

    model_keys = {"path", "tokenizer", "dtype", "device", "max_length", "overlong"}
    for name, spec in _mapping(f"{f}: models", raw["models"]).items():
        where = f"{f}: models.{_name(f'{f}: models', name)}"
        spec = _keys(where, spec or {}, model_keys)
        for key in ("path", "tokenizer", "dtype", "device", "overlong"):
            if key in spec and not isinstance(spec[key], str):
                raise SuiteError(f"{where}.{key}: must be a string, got {_show(spec[key])}")
        paths = {k: models.local(path.parent, v) for k, v in spec.items() if k in ("path", "tokenizer")}
        model = ModelSpec(name=name, **{**spec, **paths})
        model.path = model.path or name
        if model.dtype not in DTYPES:
            raise SuiteError(f"{where}.dtype: {_show(model.dtype)} is not one of {', '.join(sorted(DTYPES))}")
        if model.overlong not in OVERLONG:
            raise SuiteError(f"{where}.overlong: {_show(model.overlong)} is not one of {', '.join(OVERLONG)}")
        if not re.match(r"^(cpu|cuda(:\d+)?|auto|mps)$", str(model.device)):
            raise SuiteError(f"{where}.device: {_show(model.device)} is not cpu, cuda, cuda:N or auto")
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
                raise SuiteError(f"{where}.{key}: must be true or false, got {_show(value)}")
        sizes = {key: spec.pop(key, None) for key in ("window", "stride")}
        if len(spec) != 1:
            raise SuiteError(f"{where}: give exactly one of 'path' (conversations), 'references' (p_ids/g_ids) "
                             f"or 'text' (plain text)")
        kind, rel = next(iter(spec.items()))
        for key, value in sizes.items():
            if value is not None and kind != "text":
                raise SuiteError(f"{where}.{key}: only a 'text' dataset is split into windows")
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise SuiteError(f"{where}.{key}: must be a positive integer, got {_show(value)}")
        if None not in sizes.values() and sizes["stride"] >= sizes["window"]:
            raise SuiteError(f"{where}.stride: must be below the window ({sizes['window']}), so that every window "
                             f"after the first has context; got {sizes['stride']}")
        if not isinstance(rel, str):
            raise SuiteError(f"{where}.{kind}: must be a file path, got {_show(rel)}")
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
                             f"got {type(spec).__name__} {_show(spec)}")
        spec = dict(spec or {})
        if "stack" in spec:  # several methods applied together (fidbench.methods.stack)
            if "method" in spec:
                raise SuiteError(f"{where}: give either stack (its members) or method, not both")
            spec["method"], spec["members"] = "stack", spec.pop("stack")
        method = spec.pop("method", name)
        if not isinstance(method, str) or method not in REGISTRY:
            raise SuiteError(f"{where}.method: unknown method {_show(method)} "
                             f"(registered: {', '.join(sorted(REGISTRY))})")
        if "floors" in spec:
            default_floors[name] = _floors(f"{where}.floors", spec.pop("floors"))
        tags = spec.pop("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and t.isidentifier() for t in tags):
            raise SuiteError(f"{where}.tags: must be a list of marker names (letters, digits, _), got {_show(tags)}")
        reserved = sorted(RESERVED_TAGS.intersection(tags))
        if reserved:
            raise SuiteError(f"{where}.tags: {reserved[0]!r} is a marker pytest or a plugin acts on (it would change "
                             f"the case's outcome or how it runs, e.g. xfail turns a failed floor into a pass); tags "
                             f"only select cases (pytest -m), so choose another name")
        names = spec.pop("datasets", None)
        scored = [d.name for d in suite.datasets if d.scored]
        if names is not None and (not isinstance(names, list) or not names or not all(n in scored for n in names)):
            raise SuiteError(f"{where}.datasets: must be a non-empty list of scored datasets of this suite "
                             f"({', '.join(scored)}), got {_show(names)}")
        only = spec.pop("models", None)
        known = [m.name for m in suite.models]
        if only is not None and (not isinstance(only, list) or not only or not all(m in known for m in only)):
            raise SuiteError(f"{where}.models: must be a non-empty list of models of this suite ({', '.join(known)}), "
                             f"got {_show(only)}")
        free_run = spec.pop("free_run", False)
        if not isinstance(free_run, bool):
            raise SuiteError(f"{where}.free_run: must be true or false, got {_show(free_run)}")
        if free_run and REGISTRY[method].kind == "own_loop":
            raise SuiteError(f"{where}.free_run: method {method!r} scores samples in its own loop (kind 'own_loop'), "
                             f"so fidbench cannot let it generate on its own")
        spec = REGISTRY[method].resolve_paths(spec, path.parent)
        try:
            built = build(method, spec, where)
        except ValueError as e:
            raise SuiteError(str(e)) from None
        variant = Variant(name, method, spec, tags, names, only, free_run)
        if not suite.scored_by(variant) and any(d.scored for d in suite.datasets):  # none scored: refused below
            raise SuiteError(f"{where}: scores no dataset (every scored dataset has default: false); give datasets")
        text = suite.text_scored_by(variant)
        if free_run and text:
            raise SuiteError(f"{where}.free_run: free running compares the method's own continuation with the base "
                             f"model's, and the windows of text dataset {text[0]!r} have none (their reference is the "
                             f"text itself); give this variant datasets without text ones, or no free_run")
        if isinstance(built, Calibrated):
            _calibration(where, built, suite, suite.scored_by(variant))
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
