"""Registered methods: every module in this package registers one method on import."""

import importlib
import pkgutil

from .base import REGISTRY, Method, build, register

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module != "base":
        importlib.import_module(f"{__name__}.{_module}")

__all__ = ["REGISTRY", "Method", "build", "register"]
