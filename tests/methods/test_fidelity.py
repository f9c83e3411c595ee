"""The fidelity suite of this project's fidbench.yaml: one case per model × method variant.

The test is the installed plugin's own (fidbench/cases.py), re-exported here so node ids stay
``tests/methods/test_fidelity.py::test_fidelity[<model>-<variant>]`` for --benchmark-compare. Another
project runs the same cases from its suite file alone: ``pytest my-suite.yaml``.

Select with -k or -m by model family and method: ``pytest tests/methods -k "llama and topk"``.
"""

from fidbench.cases import test_fidelity

__all__ = ["test_fidelity"]
