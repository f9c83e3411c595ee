"""The README's map and guides point at what exists: every file or folder it names, every ``fidbench.x.y`` name."""

import importlib
import re

from helpers import ROOT

README = (ROOT / "README.md").read_text()


def test_every_path_the_readme_names_exists():
    paths = set(re.findall(r"`((?:fidbench|tests|benchmarks|suites|data|docs|scripts)/[\w./-]*)`", README))
    paths |= set(re.findall(r"\]\(((?:fidbench|tests|benchmarks|suites|data|docs|scripts)/[\w./-]*)", README))
    assert len(paths) > 20  # the map, the guides and the documentation list
    missing = sorted(p for p in paths if not (ROOT / p.split("#")[0]).exists())
    assert not missing, f"README.md names paths that do not exist: {missing}"


def test_every_fidbench_name_the_readme_gives_resolves():
    names = {n for n in re.findall(r"`(fidbench(?:\.\w+)+)`", README) if not (ROOT / n).is_file()}  # not fidbench.yaml
    assert names
    for name in sorted(names):
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"README.md names {name}, but {'.'.join(parts[:cut])} has no {attr}"
                obj = getattr(obj, attr)
            break
