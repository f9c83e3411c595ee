"""Converting the original scripts' run configs (``runs/{model}-{method}.json``) into a suite file.

A run config names a model (``model_name``, ``model_dtype``, ``device_map``, ``max_length``,
``tokenizer_name``), a method (``model_method``) and the method's JSON ``config`` file, either at
the top level or under ``"model"`` as the original scripts wrote them. Each distinct model becomes a
suite model and each distinct method configuration a variant; the suite then runs every model ×
variant (a superset of the original runs), except variants made for one model, which run on it alone
(``models``): Medusa heads, and the pre-made checkpoints that the original awq, gptq, sparsegpt and
wanda runs without a config load as their model (``CHECKPOINT_METHODS``: a ``checkpoint`` variant scored against the
base model of the same name, which another run, e.g. the origin run, defines). Original method names
and parameters are mapped to registry names (``CONVERSIONS``); a method with no mapping is an error
naming it. ``generation_kwargs`` are not carried over: fidbench's references are always greedy.

The original scripts read every ``data/*.jsonl`` of their working directory; the suite gets the
datasets of fidbench's default suite (``fidbench.yaml`` of this checkout), or the files given.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import yaml

from ..methods import REGISTRY
from ..models import DTYPES
from ..suite import DatasetSpec, SuiteError, load

MAX_NEW_TOKENS = 64


class RunsError(ValueError):
    pass


def _no_config(method: str):
    def convert(conf, where):
        if conf:
            raise RunsError(f"{where}: the original {method} takes no config, this run gives {sorted(conf)}")
        return {}
    return convert


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _topk(conf, where):
    """``mask_out`` is the fraction of keys dropped, ``keep`` the fraction kept; ``min_remain`` is ``min_keep``."""
    if not conf:
        raise RunsError(f"{where}: the original topk needs a config with mask_out and min_remain")
    if conf.get("enable_lora"):
        raise RunsError(f"{where}: enable_lora (a trained LoRA adapter) has no fidbench equivalent")
    draft = conf.get("draft_kwargs", conf)  # config/topk.json nests the parameters under draft_kwargs
    if not isinstance(draft, dict):
        raise RunsError(f"{where}: draft_kwargs must be an object, got {json.dumps(draft)}")
    if draft.get("fix_layers"):
        raise RunsError(f"{where}: fix_layers {draft['fix_layers']} (layers left dense) has no equivalent in "
                        "fidbench's topk")
    missing = [k for k in ("mask_out", "min_remain") if k not in draft]
    if missing:
        raise RunsError(f"{where}: the topk config has no {missing[0]}")
    if not _is_number(draft["mask_out"]) or not 0 <= draft["mask_out"] < 1:
        raise RunsError(f"{where}: mask_out must be a number in [0, 1), got {json.dumps(draft['mask_out'])}")
    if not isinstance(draft["min_remain"], int) or isinstance(draft["min_remain"], bool) or draft["min_remain"] < 1:
        raise RunsError(f"{where}: min_remain must be a positive integer, got {json.dumps(draft['min_remain'])}")
    return {"keep": round(1 - draft["mask_out"], 10), "min_keep": draft["min_remain"]}


def _medusa(conf, where):
    """The original Medusa config names the heads' directory (``checkpoint``, Medusa's training output)."""
    if not isinstance(conf, dict) or not isinstance(conf.get("checkpoint"), str) or set(conf) != {"checkpoint"}:
        raise RunsError(f"{where}: the original medusa config must be exactly {{\"checkpoint\": <heads directory>}}, "
                        f"got {json.dumps(conf)}")
    return {"path": conf["checkpoint"]}


# original method name -> (registry name, config -> params); names the registry already uses with
# parameters under their own names convert as they are (see _convert).
CONVERSIONS = {
    "origin": ("origin", _no_config("origin")),
    "topk": ("topk", _topk),
    "topk-llama": ("topk", _topk),
    "topk-qwen": ("topk", _topk),
    "flash-attention-fp8": ("fp8-attention", _no_config("flash-attention-fp8")),
    "sage-attention": ("sage-attention", _no_config("sage-attention")),
    "medusa": ("medusa", _medusa),
}
# Original methods whose run, without a config, loads a pre-made checkpoint as its model (``model_name`` is the
# quantized or pruned directory, as the original awq.py, gptq.py, sparsegpt.py and wanda.py load it); a run of
# one of them with a config (quantize the base model itself) converts like any other method.
CHECKPOINT_METHODS = ("awq", "gptq", "sparsegpt", "wanda")
# Variants made for one model: they run on the model of their run only.
MODEL_SPECIFIC = ("medusa",)


def _convert(method: str, conf, where: str) -> tuple[str, dict]:
    if method in CONVERSIONS:
        name, convert = CONVERSIONS[method]
        return name, convert(conf, where)
    if method in REGISTRY:
        fields = {f.name for f in dataclasses.fields(REGISTRY[method]) if f.init}
        unknown = sorted(set(conf or {}) - fields)
        if unknown:
            raise RunsError(f"{where}: config keys {unknown} of method {method!r} are not its fidbench parameters "
                            f"({sorted(fields)})")
        return method, dict(conf or {})
    known = sorted(set(CONVERSIONS) | set(REGISTRY))
    raise RunsError(
        f"{where}: unknown method {method!r}: no fidbench equivalent (convertible: {', '.join(known)}); "
        f"to run its Modifier class unchanged, add a variant with method: legacy"
    )


def _json(path: Path, run: Path | None = None):
    """A JSON file's content; an error naming the file (and the ``run`` config naming it) when it is not
    UTF-8 or not JSON."""
    where = f"{run}: config {path}" if run else str(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RunsError(f"{where}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RunsError(f"{where}: not valid JSON: {e}") from None


def _config(value, run: Path, root: Path, where: str):
    """The run's method config: null, an inline mapping, or a JSON file (an object) relative to the scripts' root."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise RunsError(f"{where}: config must be null, an object or a JSON file path, got {json.dumps(value)}")
    path = Path(value)
    for candidate in ([path] if path.is_absolute() else [root / path, run.parent / path, Path.cwd() / path]):
        if candidate.is_file():
            conf = _json(candidate, run)
            if not isinstance(conf, dict):
                raise RunsError(f"{where}: config {candidate} must hold a JSON object, got {type(conf).__name__}")
            return conf
    raise RunsError(f"{where}: config file {value!r} not found (looked in {root} and {run.parent})")


# Run config fields: (JSON types allowed, what the error says). Absent optional fields are null.
FIELDS = {
    "model_name": ((str,), "a string"),
    "model_method": ((str,), "a string"),
    "tokenizer_name": ((str, type(None)), "a string or null"),
    "model_dtype": ((str, type(None)), "a string or null"),
    "device_map": ((str, dict, type(None)), "a string, an object or null"),
    "max_length": ((int, type(None)), "an integer or null"),
}


def _check_fields(conf: dict, where: str) -> None:
    for key, (types, expected) in FIELDS.items():
        value = conf.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            raise RunsError(f"{where}: {key} must be {expected}, got {json.dumps(value)}")


def _model(conf: dict, where: str) -> dict:
    spec = {"path": conf["model_name"]}
    if conf.get("tokenizer_name"):
        spec["tokenizer"] = conf["tokenizer_name"]
    dtype = conf.get("model_dtype") or "fp32"
    if dtype not in DTYPES:
        raise RunsError(f"{where}: model_dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    spec["dtype"] = dtype
    # The scripts loaded with device_map="auto" when it was null, and dispatched a given mapping.
    device = conf.get("device_map")
    spec["device"] = device if isinstance(device, str) and device != "auto" else "auto"
    if conf.get("max_length") is not None:
        spec["max_length"] = conf["max_length"]
    return spec


def _checkpoint(conf: dict, method: str, model_name: str, models: dict, where: str) -> dict:
    """A run that loads a pre-made checkpoint directory as its model: a ``checkpoint`` variant of that directory,
    on the base model of the same name (what its references come from)."""
    if model_name not in models:
        raise RunsError(f"{where}: the original {method} run loads the checkpoint {conf['model_name']!r} as its model; "
                        f"fidbench scores it against the base model {model_name!r}, which no other run defines "
                        f"(add its origin run, e.g. runs/{model_name}.json)")
    variant = {"method": "checkpoint", "path": conf["model_name"]}
    if conf.get("tokenizer_name"):
        variant["tokenizer"] = conf["tokenizer_name"]
    dtype = conf.get("model_dtype") or "fp32"
    if dtype not in DTYPES:
        raise RunsError(f"{where}: model_dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    if dtype != models[model_name]["dtype"]:
        variant["dtype"] = dtype
    return {**variant, "models": [model_name]}


def _rooted(root: Path, spec: dict) -> dict:
    """``spec`` with its model, tokenizer or heads paths made absolute where they name something under ``root``:
    the scripts read them from there, a suite from its own directory. Anything else (a hub id) as written."""
    return {k: str((root / v).resolve()) if k in ("path", "tokenizer") and isinstance(v, str) and v != "auto"
            and (root / v).exists() else v for k, v in spec.items()}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+:\[\]/-]", "-", name)


def convert(directory: Path, datasets: dict[str, dict | str]) -> dict:
    """The suite (as a mapping) equivalent to the run configs under ``directory`` (or its ``runs/``)."""
    directory = Path(directory)
    runs_dir = directory / "runs" if (directory / "runs").is_dir() else directory
    root = runs_dir.parent if runs_dir.name == "runs" else runs_dir
    files = sorted(runs_dir.rglob("*.json"))
    if not files:
        raise RunsError(f"no run configs (*.json) under {runs_dir}")
    runs = []
    for file in files:
        where = str(file)
        raw = _json(file)
        conf = raw.get("model", raw) if isinstance(raw, dict) else None
        if not isinstance(conf, dict):
            raise RunsError(f"{where}: expected a JSON object")
        for key in ("model_name", "model_method"):
            if key not in conf:
                raise RunsError(f"{where}: missing key {key!r}")
        _check_fields(conf, where)
        if conf.get("load_ckp"):
            raise RunsError(f"{where}: load_ckp (trained weights for the method) has no fidbench equivalent")
        method = conf["model_method"]
        stem = file.stem
        runs.append((file, conf, method, _safe(stem[: -len(method) - 1] if stem.endswith(f"-{method}") else stem)))
    models: dict[str, dict] = {}
    origins: dict[str, Path] = {}
    for file, conf, method, model_name in runs:  # first the models, from every run that loads the base model
        if method in CHECKPOINT_METHODS and conf.get("config") is None:
            continue
        spec = _model(conf, str(file))
        if model_name in models and models[model_name] != spec:
            raise RunsError(f"{file}: model {model_name!r} is also defined, differently, by {origins[model_name]}")
        models[model_name], origins[model_name] = spec, file
    variants: dict[str, dict] = {}
    for file, conf, method, model_name in runs:
        where = str(file)
        if method in CHECKPOINT_METHODS and conf.get("config") is None:
            variant = _checkpoint(conf, method, model_name, models, where)
        else:
            name, params = _convert(method, _config(conf.get("config"), file, root, where), where)
            variant = {"method": name, **params, **({"models": [model_name]} if name in MODEL_SPECIFIC else {})}
        if variant in variants.values():
            continue
        base, n = _safe(method), 1
        while (vname := base if n == 1 else f"{base}-{n}") in variants:
            n += 1
        variants[vname] = variant
    return {
        "generation": {"max_new_tokens": MAX_NEW_TOKENS, "decode": "auto"},
        "models": {name: _rooted(root, spec) for name, spec in models.items()},
        "datasets": datasets,
        "methods": {name: _rooted(root, spec) for name, spec in variants.items()},
    }


def default_datasets() -> list[DatasetSpec]:
    """The datasets of fidbench's default suite (in a source checkout)."""
    suite = Path(__file__).resolve().parents[2] / "fidbench.yaml"
    if not suite.is_file():
        raise RunsError(f"fidbench's default suite {suite} is not there (installed from a wheel?): give --datasets")
    return load(suite).datasets


def _entry(spec: DatasetSpec, rel: str):
    """A dataset's suite entry: its file under its kind's key, with the flags and window sizes it sets."""
    key = {"conversations": "path", "references": "references", "text": "text"}[spec.kind]
    extra = {k: v for k, v in (("score", spec.scored), ("default", spec.default)) if v is not True}
    extra.update({k: v for k, v in (("window", spec.window), ("stride", spec.stride)) if v is not None})
    return rel if key == "path" and not extra else {key: rel, **extra}


def write(directory: Path, output: Path, datasets: list[DatasetSpec] | None = None) -> dict:
    """Convert and write the suite to ``output``, checked by ``fidbench.suite.load`` before it replaces anything."""
    output = Path(output).resolve()
    entries = {}
    for spec in datasets if datasets is not None else default_datasets():
        rel = os.path.relpath(Path(spec.path).resolve(), output.parent)
        rel = str(Path(spec.path).resolve()) if rel.startswith("..") else rel  # relative only below the suite
        entries[_safe(spec.name)] = _entry(spec, rel)
    suite = convert(directory, entries)
    header = (f"# Converted by `fidbench import-runs` from the run configs in {Path(directory).resolve()}.\n"
              "# No floors: run it once, then set floors below the measured values.\n")
    tmp = output.with_name(f".{output.name}.tmp{os.getpid()}")
    tmp.write_text(header + yaml.safe_dump(suite, sort_keys=False, allow_unicode=True))
    try:
        load(tmp)
    except SuiteError as e:
        tmp.unlink()
        raise RunsError(f"the converted suite does not load: {str(e).replace(str(tmp), str(output))}") from None
    os.replace(tmp, output)
    return suite
