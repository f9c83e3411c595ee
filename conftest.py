"""Shared fixtures; the helpers they use live in tests/helpers.py (tiny models and tokenizers built
in-process, no download)."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "tests"))  # `import helpers` from every test, whatever the rootdir

from helpers import FULL, tiny_model, tiny_tokenizer  # noqa: E402

pytest_plugins = ["pytester"]
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # xdist runs a worker per core: more threads per worker only spin against each other
__all__ = ["tiny_tokenizer"]  # re-exported for scripts that import it from conftest


@pytest.fixture(params=FULL)
def tiny(request):
    """One tiny model per full-attention family."""
    return tiny_model(request.param)


@pytest.fixture
def prompt():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 283, (40,), generator=g).tolist()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private fidbench cache directory (references made by a test stay out of the user's cache)."""
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"
