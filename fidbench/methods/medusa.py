"""``medusa``: Medusa draft heads (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with
Multiple Decoding Heads"; reference code FasterDecoding/Medusa), scored against the base model's references.

Head k (1-based here; Medusa's ``medusa_head[k-1]``) maps the base's last hidden state at position t to logits
for the token at t+1+k: ``train_legacy.py``'s loss compares head i's logits at t with label t+2+i (0-based i),
and the base's own lm_head predicts t+1. A head is ``medusa_num_layers`` ResBlocks (x + SiLU(W x + b)), then
- v1 (``medusa/model/medusa_model.py``, ``medusa_lm_head.pt``): its own Linear(hidden, vocab, no bias); keys
  ``{i}.{j}.linear.weight`` [H, H], ``{i}.{j}.linear.bias`` [H] for j < L, ``{i}.{L}.weight`` [V, H];
- v2 (``medusa_model_legacy.py`` / ``train_legacy.py``, ``medusa_lm_head.safetensors``, what the original
  fidbench ran): the base model's lm_head, shared; keys ``{i}.{j}.linear.weight`` / ``.bias`` only.
``path`` (in a suite, relative to the suite file) is such a file, a directory holding one (with Medusa's
``config.json``: ``medusa_num_heads``, ``medusa_num_layers``, ``version``, checked against the keys), or
``auto``: heads trained for the loaded model by ``fidbench train-medusa``'s defaults on first use, cached under
``$FIDBENCH_CACHE/medusa`` by the model's fingerprint and the training settings. ``.pt`` files are read with
``torch.load(weights_only=True)``; a key, a count or a shape that does not fit is an error naming the file (Medusa
loads with strict=False).

Scoring is the original fidbench's ``Medusa.compute_accuracy`` (wenhaoli-xmu/fidbench
``fidbench/modifiers/medusa.py``): teacher forced over prompt + reference, at every reference position i in
0 .. N-heads-2 (the hidden state of reference token g[i]) the base predicts g[i+1] and head k g[i+1+k]; a
head scores acc@1 / acc@5 over those N-heads-1 positions (``heads`` in the case record). The headline
acc@1 / acc@5 are the heads' own, their mean over heads (every head scores the same positions), as Medusa
reports each head's top-k accuracy on its own. ``count_base: true`` pools the base's own prediction (its
reference, so about 1.0) with the heads' instead, the original fidbench's figure; ``kept()["acc"]`` says
which the case's acc@1 is. KL and NLL are not measured (None). A position where the base's or a head's logits
hold NaN or inf counts as ``non_finite`` and fails the case (the original scored the argmax of NaN). Differences
from the original:
- one forward over prompt + reference instead of Medusa's static KV cache fed token by token: the same
  hidden states up to fp32 summation order;
- heads run in the model's dtype on the lm_head's device (Medusa casts them to the base's dtype too).
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from .. import models
from ._medusa_heads import FILES, Heads, decoder
from .base import Method, beside, register


def read_state(path: Path) -> dict:
    """The tensors of a Medusa head file: safetensors, or a .pt state dict read without unpickling code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = models.load_tensors(path, "medusa")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"medusa: {path} does not hold a state dict of tensors")
    return state


def head_file(path: Path) -> Path:
    """The head file of ``path`` (a file, or a directory holding exactly one of FILES)."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise ValueError(f"medusa: path {str(path)!r} is neither a head file nor a directory")
    found = [path / f for f in FILES if (path / f).is_file()]
    if len(found) != 1:
        what = "neither" if not found else "both"
        raise ValueError(f"medusa: {path} holds {what} of {' and '.join(FILES)}; give the head file's path")
    return found[0]


def load_heads(path: str | Path, hidden: int, vocab: int) -> Heads:
    """Medusa heads from ``path`` for a model of ``hidden`` size and ``vocab`` output rows, every key and shape
    checked."""
    file = head_file(Path(path))
    state = read_state(file)
    keys = {}
    for key in state:
        m = re.fullmatch(r"(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)", key)
        if m is None:
            raise ValueError(f"medusa: {file} has key {key!r}, not of Medusa's layout "
                             f"({{head}}.{{layer}}.linear.weight|bias, "
                             f"{{head}}.{{layers}}.weight)")
        keys.setdefault(int(m[1]), {})[(int(m[2]), m[3])] = state[key]
    n = len(keys)
    if n == 0 or sorted(keys) != list(range(n)):
        raise ValueError(f"medusa: {file} holds heads {sorted(keys)}; expected heads 0..n-1 (n >= 1)")
    own = [j for (j, name) in keys[0] if name == "weight"]
    layers = own[0] if own else len(keys[0]) // 2
    heads = Heads(n, layers, hidden, vocab if own else None)
    expected = heads.state_dict_medusa()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"medusa: {file} does not fit {n} head(s) of {layers} layer(s) "
                         f"({'own lm_head' if own else 'shared lm_head'}): missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for key, tensor in expected.items():
        if state[key].shape != tensor.shape:
            raise ValueError(f"medusa: {file} {key} has shape {tuple(state[key].shape)}; this model needs "
                             f"{tuple(tensor.shape)} (hidden size {hidden}, vocabulary {vocab})")
    config = file.parent / "config.json"
    if config.is_file():
        conf = json.loads(config.read_text())
        stated = {"medusa_num_heads": n, "medusa_num_layers": layers}
        for key, value in stated.items():
            if key in conf and conf[key] != value:
                raise ValueError(f"medusa: {config} says {key} = {conf[key]}, {file.name} holds {value}")
        if "version" in conf and str(conf["version"]) == "2" and own:
            raise ValueError(f"medusa: {config} says version 2 (shared lm_head), {file.name} has an lm_head per head")
    heads.load_state_dict({f"heads.{k}": v for k, v in state.items()})
    return heads


@register
class Medusa(Method):
    name = "medusa"
    description = "Medusa draft heads: per-head acc@1/acc@5 of the tokens 2, 3, ... ahead (own loop)"
    defaults_from = ("FasterDecoding/Medusa: 3 heads of 1 ResBlock (medusa_num_heads, medusa_num_layers in its "
                     "training README); headline = each head's top-k accuracy, their mean (count_base false)")
    kind = "own_loop"
    test_params = {"covered_by": "tests/test_medusa.py::test_medusa_on_every_family"}
    path: str = ""
    heads: int | None = None
    count_base: bool = False

    @classmethod
    def resolve_paths(cls, params: dict, root):
        if params.get("path", "auto") == "auto":
            return params
        return {**params, "path": beside(root, params["path"])}  # a file or directory relative to the suite

    def validate(self):
        if not self.path:
            raise ValueError("medusa: path (a Medusa head file or directory, or auto) is required")
        if self.heads is not None and self.heads < 1:
            raise ValueError(f"medusa: heads must be >= 1, got {self.heads}")

    @contextlib.contextmanager
    def apply(self, model, context=None):
        hidden = model.config.get_text_config().hidden_size
        lm_head = model.get_output_embeddings()
        if self.path == "auto":
            from ..medusa_train import cached_heads

            if context is None:
                raise ValueError("medusa: path auto needs the harness's loaded context (model, tokenizer, fingerprint)")
            path = cached_heads(context, self.heads or 3)
        else:
            path = self.path
        heads = load_heads(path, hidden, lm_head.weight.shape[0])
        if self.heads is not None and self.heads > len(heads.heads):
            raise ValueError(f"medusa: heads = {self.heads}, but {path} holds {len(heads.heads)}")
        heads.heads = heads.heads[: self.heads or len(heads.heads)]
        self._heads = heads.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype).eval()
        self._lm_head = lm_head if heads.version == "2" else None
        self._info = {"path": str(path), "format": f"v{heads.version}", "heads": len(heads.heads),
                      "layers": heads.layers}
        try:
            yield model
        finally:
            del self._heads, self._lm_head

    @torch.inference_mode()
    def score_sample(self, model, ref) -> dict:
        n_heads = len(self._heads.heads)
        turns = len(ref.g_ids) - n_heads - 1  # positions where the base and every head have a reference target
        if turns < 1:
            return {"n_tokens": 0, "heads": [{"n_tokens": 0} for _ in range(n_heads)]}
        p = len(ref.p_ids)
        ids = torch.tensor([ref.p_ids + ref.g_ids[: turns]], device=model.get_input_embeddings().weight.device)
        hidden = decoder(model)(input_ids=ids).last_hidden_state[0, p:]  # hidden states of g[0 .. turns-1]
        hidden = hidden.to(self._heads.heads[0][0].linear.weight.device)
        logits = torch.cat([model.get_output_embeddings()(hidden)[None], self._heads(hidden, self._lm_head)])
        gold = torch.tensor([ref.g_ids[1 + k : 1 + k + turns] for k in range(n_heads + 1)], device=logits.device)
        hit1 = (logits.argmax(-1) == gold).double().mean(-1).tolist()  # (heads + 1,): base, head 1, ...
        hit5 = (logits.topk(5, dim=-1).indices == gold[..., None]).any(-1).double().mean(-1).tolist()
        # NaN heads still have an argmax: positions where the base's or any head's logits are not finite fail the case
        bad = (~torch.isfinite(logits)).any(-1).any(0).nonzero()[:, 0].tolist()
        first = 0 if self.count_base else 1
        return {
            "non_finite": len(bad), "first_non_finite": bad[0] if bad else None,
            "acc1": sum(hit1[first:]) / len(hit1[first:]),
            "acc5": sum(hit5[first:]) / len(hit5[first:]),
            "n_tokens": turns * (n_heads + 1 - first),
            "heads": [{"acc1": a1, "acc5": a5, "n_tokens": turns} for a1, a5 in zip(hit1[1:], hit5[1:])],
        }

    def kept(self) -> dict:
        return dict(getattr(self, "_info", {}), count_base=self.count_base,
                    acc="pooled with the base's own prediction" if self.count_base else "mean over heads")
