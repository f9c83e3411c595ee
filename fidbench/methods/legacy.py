"""``legacy``: run a ``Modifier`` subclass written for the original fidbench scripts, unchanged.

The class is built as the original scripts built it, ``cls(model, save_ckp=None, load_ckp=...,
config=...)`` with ``config`` the path of its JSON config file (an inline mapping is written to a
temporary file first) or None, and ``load_ckp`` the checkpoint of its ``ft_params`` or None (read by
``fidbench.legacy.Modifier.load_checkpoint`` with ``torch.load(weights_only=True)``), and each sample
is scored by its own ``compute_accuracy(p_ids, g_ids) -> (acc1, acc5)`` on (1, n) token tensors. That loop is the
original one: it scores reference tokens 1..N-1 (the first, predicted by the prefill, is skipped),
so acc@1 / acc@5 are over N-1 positions per sample, and KL, NLL and first divergence are not
measured (reported as None). Modifiers patch forwards and replace modules in place, so by default
the Modifier gets a deep copy of the model (``copy: false`` saves the memory, at the price of
reloading the model for the next case: the Modifier's changes stay on the loaded one). In a suite, a
``module`` file, a ``config`` file and ``load_ckp`` are relative to the suite file.
"""

from __future__ import annotations

import contextlib
import copy as copying
import json
import tempfile
from pathlib import Path

import torch

from ..legacy import is_file, load_class
from .base import Method, beside, register


@register
class Legacy(Method):
    name = "legacy"
    description = "an original-scripts Modifier class run unchanged: its own compute_accuracy gives acc@1/acc@5 only"
    defaults_from = "no reference setting: the original scripts' Modifier and config, run unchanged"
    kind = "own_loop"
    test_params = {"covered_by": "tests/test_legacy.py::test_legacy_modifier_scores_what_the_seed_style_loop_scores"}
    parallel_exact = False  # the Modifier's loop feeds the reference token by token
    module: str = ""
    cls: str = ""
    config: str | dict | None = None
    load_ckp: str | None = None
    copy: bool = True

    @property
    def leaves_model_changed(self) -> bool:  # the Modifier patched the loaded model itself: the next case reloads it
        return not self.copy

    @classmethod
    def resolve_paths(cls, params: dict, root):
        """Files relative to the suite file: a module given as a file (a dotted module imports as Python does),
        a config given as a file, the checkpoint."""
        files = {k: v for k, v in params.items()
                 if k in ("config", "load_ckp") or (k == "module" and isinstance(v, str) and is_file(v))}
        return {**params, **{k: beside(root, v) for k, v in files.items()}}

    def validate(self):
        if not self.module or not self.cls:
            raise ValueError("legacy: module (a .py file or dotted module) and cls (the Modifier class name) "
                             "are required")
        if self.config is not None and not isinstance(self.config, (str, dict)):
            raise ValueError(f"legacy: config must be a JSON file path or a mapping, got {self.config!r}")
        if isinstance(self.config, str):
            path = Path(self.config)
            if not path.is_file():
                raise ValueError(f"legacy: config file {self.config!r} does not exist")
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"legacy: config file {self.config!r} is not valid JSON: {e}") from None
        if self.load_ckp is not None and not Path(self.load_ckp).is_file():
            raise ValueError(f"legacy: load_ckp {self.load_ckp!r} is not a file")

    @contextlib.contextmanager
    def apply(self, model, context=None):
        cls = load_class(self.module, self.cls)
        with tempfile.TemporaryDirectory() as tmp:
            config = self.config
            if isinstance(config, dict):
                config = str(Path(tmp) / "config.json")
                Path(config).write_text(json.dumps(self.config))
            elif config is not None:
                config = str(Path(config).resolve())
            target = copying.deepcopy(model) if self.copy else model
            load_ckp = None if self.load_ckp is None else str(Path(self.load_ckp).resolve())
            self._modifier = cls(target, save_ckp=None, load_ckp=load_ckp, config=config)
            try:
                yield target
            finally:
                del self._modifier

    def score_sample(self, model, ref) -> dict:
        turns = len(ref.g_ids) - 1
        if turns < 1:  # the original loop divides by N-1: a one-token reference has nothing it scores
            return {"n_tokens": 0}
        acc1, acc5 = self._modifier.compute_accuracy(torch.tensor([ref.p_ids]), torch.tensor([ref.g_ids]))
        return {"acc1": float(acc1), "acc5": float(acc5), "n_tokens": turns}

    def kept(self) -> dict:
        return {"modifier": f"{self.module}:{self.cls}", "scored_positions": "1..N-1 (the original loop)"}
