"""fidbench: how faithfully a compressed or accelerated LLM reproduces its base model, as a pytest suite.

The public API for writing a method: ``Method`` and ``register`` (``fidbench.methods``) and the
per-layer ``AttentionCall`` a method's ``attend`` hook receives (``fidbench.attention``).
"""

from importlib.metadata import PackageNotFoundError, version

from .attention import AttentionCall
from .methods import Method, register

try:
    __version__ = version("fidbench")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = ["AttentionCall", "Method", "register", "__version__"]
