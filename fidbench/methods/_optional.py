"""Optional libraries that peer methods run (quantization backends): a missing one fails the variant with the
command that installs it, never a fallback."""

from __future__ import annotations

import importlib.util


def require(who: str, module: str | None, package: str | None) -> None:
    """Fail with the install command when ``module`` (of the PyPI ``package``; None: nothing) cannot be imported."""
    try:
        found = module is None or importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent of a dotted name (optimum of optimum.quanto) is missing
        found = False
    if not found:
        raise RuntimeError(f"{who} needs the package {package}: pip install {package} "
                           "(or pip install 'fidbench[quant]')")
