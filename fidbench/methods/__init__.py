"""Registered methods: every module in this package registers one method on import.

Modules whose name starts with ``_`` are shared helpers and register nothing.
"""

import importlib
import pkgutil

from .base import REGISTRY, Method, build, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base" and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["REGISTRY", "Method", "build", "register"]
