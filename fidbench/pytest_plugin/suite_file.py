"""The session's one suite: a suite file named as a test path (collected as the items of ``fidbench.cases``),
else ``--fidbench-config``, else ``fidbench.yaml``; read once."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .. import cases
from ..suite import SuiteError, load

_suite_key = pytest.StashKey()
PATH = pytest.StashKey()  # the suite file's path, set when the session is configured (``session_path``)


def _looks_like_suite(path: Path) -> bool:
    """A YAML file whose top level names models, methods or datasets (or that does not parse: its error is
    then reported as the suite's)."""
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        return False
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        return True
    return isinstance(data, dict) and bool({"models", "methods", "datasets"} & set(data))


def named_suites(config) -> list[Path]:
    """Suite files named as test paths on the command line (``pytest my-suite.yaml``)."""
    found = []
    for arg in config.args:
        path = Path(arg.split("::")[0])
        path = (path if path.is_absolute() else Path(config.invocation_params.dir) / path).resolve()
        if path not in found and _looks_like_suite(path):
            found.append(path)
    return found


def session_path(config) -> Path:
    """The session's one suite: a suite file named as a test path, else --fidbench-config, else fidbench.yaml."""
    named, option = named_suites(config), config.getoption("fidbench_config")
    if len(named) > 1:
        raise pytest.UsageError(f"fidbench runs one suite per session; the command line names {len(named)}: "
                                + ", ".join(map(str, named)))
    if named and option and Path(option).resolve() != named[0]:
        raise pytest.UsageError(f"--fidbench-config {option} and the suite file {named[0]} named as a test path "
                                "differ; give one of them")
    return named[0] if named else Path(option) if option else Path(config.rootpath) / "fidbench.yaml"


def get(config):
    """The suite, read once (``SuiteError`` when it is not valid)."""
    if _suite_key not in config.stash:
        config.stash[_suite_key] = load(config.stash[PATH])
    return config.stash[_suite_key]


def get_or_fail(config):
    """The suite, or a collection error that says what is wrong with it (no traceback)."""
    try:
        return get(config)
    except SuiteError as e:
        error = str(e)
    pytest.fail(f"fidbench: {error}", pytrace=False)


class SuiteFile(pytest.Module):
    """A suite file named as a test path, collected as ``fidbench.cases``: its items are the suite's cases."""

    def _getobj(self):
        return cases

    def istestfunction(self, obj, name: str) -> bool:
        return name == "test_fidelity"  # whatever the project's python_functions

    def istestclass(self, obj, name: str) -> bool:
        return False


def pytest_collect_file(file_path: Path, parent):
    if parent.session.isinitpath(file_path) and file_path.resolve() == parent.config.stash[PATH].resolve():
        return SuiteFile.from_parent(parent, path=file_path)
    return None
