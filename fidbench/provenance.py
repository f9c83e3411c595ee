"""Saved reports: what makes two of them incomparable (the base model's weights, the run
settings, the code that ran). ``fidbench compare`` and ``fidbench merge`` refuse on these unless told."""

from __future__ import annotations

import json

from .report import ReportError, read  # noqa: F401  (the one reader of saved reports)

# Settings that may differ between reports of one run: the suite's path (another checkout or machine) and a
# shard's index (each shard has its own; a merged report lists the shards it holds).
LOCAL_SETTINGS = ("suite", "shard", "shards")


def fingerprints(doc: dict) -> dict[str, set]:
    """Model name -> the fingerprints its cases were measured on (a stub record, of a case that gave no scores,
    has none)."""
    out: dict[str, set] = {}
    for record in doc["cases"]:
        if record.get("model") is not None and record.get("fingerprint") is not None:
            out.setdefault(record["model"], set()).add(record.get("fingerprint"))
    return out


def _differing(label: str, values: dict[str, object]) -> list[str]:
    """``label: a.json X, b.json Y`` when the reports' values differ."""
    if len({json.dumps(v, sort_keys=True) for v in values.values()}) < 2:
        return []
    return [f"{label}: " + ", ".join(f"{name} {v if v is not None else 'none'}" for name, v in values.items())]


def differences(docs: dict[str, dict], versions: bool = True) -> list[str]:
    """What differs between reports (name -> document): a model's fingerprint, a run setting (other than
    ``LOCAL_SETTINGS``), and with ``versions`` the library versions and the commit. Empty when comparable."""
    out = []
    models = sorted({m for doc in docs.values() for m in fingerprints(doc)})
    for model in models:
        prints = {name: sorted(fingerprints(doc)[model]) for name, doc in docs.items() if model in fingerprints(doc)}
        for name, seen in prints.items():
            if len(seen) > 1:
                out.append(f"model {model}: {name} holds cases of {len(seen)} different fingerprints")
        out += _differing(f"model {model} fingerprint", {n: p[0] for n, p in prints.items() if len(p) == 1})
    keys = sorted({k for doc in docs.values() for k in doc.get("settings", {})} - set(LOCAL_SETTINGS))
    for key in keys:
        out += _differing(f"settings.{key}", {name: doc.get("settings", {}).get(key) for name, doc in docs.items()})
    if versions:
        env = {name: doc.get("environment") or {} for name, doc in docs.items()}
        packages = sorted({p for e in env.values() for p in e.get("versions", {})})
        for package in packages:
            out += _differing(f"version of {package}", {n: e.get("versions", {}).get(package) for n, e in env.items()})
        out += _differing("commit", {n: e.get("commit") for n, e in env.items()})
    return out
