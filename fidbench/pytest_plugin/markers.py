"""A case's markers: ``fidbench``, its model's families, its method (a stack's members too) and its
variant's tags, each registered so ``pytest --markers`` lists it and ``-m`` selects by it."""

from __future__ import annotations

import re

import pytest

from ..suite import Case


def families(model_type: str) -> list[str]:
    """Marker names of a model type: itself, and the family a user would guess (``gemma3_text`` -> ``gemma3``)."""
    family = re.sub(r"_(text|vl)$", "", model_type)
    return [model_type] if family == model_type else [model_type, family]


def marks(config, case: Case, model_type: str | None) -> list:
    """A case's markers (each registered, so ``pytest --markers`` lists it): fidbench, the model's families,
    the method (a stack's members too) and the variant's tags."""
    names = [(f, "fidbench model family") for f in (families(model_type) if model_type else [])]
    names += [(case.variant.method, "fidbench method"), *((t, "fidbench variant tag") for t in case.variant.tags)]
    if case.variant.method == "stack":  # `-m snapkv` selects the stacks holding it too
        names += [(m["method"], "fidbench method") for m in case.variant.params["members"]
                  if (m["method"], "fidbench method") not in names]
    known = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, what in names:
        if name not in known:
            config.addinivalue_line("markers", f"{name}: {what}")
            known.add(name)
    return [pytest.mark.fidbench, *(getattr(pytest.mark, name) for name, _ in names)]
