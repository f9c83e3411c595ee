"""Everything for code written for the original research scripts, in one place.

- ``Modifier`` classes run unchanged through the ``legacy`` method (``fidbench/methods/legacy.py``),
  which builds them as the scripts did and lets their own ``compute_accuracy`` loop score each sample
  (``kind = "own_loop"``: the harness reports the acc@1 / acc@5 they give and None for the rest).
  ``load_class`` below imports them: this is the one place fidbench runs user code by design.
- ``Modifier``, the original base class those files import (``from fidbench.legacy import Modifier``).
- Run configs ``runs/{model}-{method}.json`` (with ``config/{method}.json``) convert to a suite with
  ``fidbench import-runs`` (``fidbench.legacy.runs``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from .modifier import Modifier

__all__ = ["Modifier", "load_class"]


def is_file(module: str) -> bool:
    """Whether a Modifier's ``module`` names a python file (else it is a dotted module name)."""
    return module.endswith(".py") or "/" in module


def load_class(module: str, name: str):
    """Class ``name`` from a python file path or a dotted module name."""
    if is_file(module):
        path = Path(module).resolve()
        if not path.is_file():
            raise ValueError(f"legacy: module file {module!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"fidbench_legacy_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses and pickling look classes up by module name
        spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"legacy: cannot import module {module!r}: {e}") from None
    cls = getattr(mod, name, None)
    if not isinstance(cls, type):
        raise ValueError(f"legacy: {module!r} has no class {name!r}")
    if not callable(getattr(cls, "compute_accuracy", None)):
        raise ValueError(f"legacy: {name} has no compute_accuracy(p_ids, g_ids) method")
    return cls
