"""The original scripts' ``Modifier`` base class (wenhaoli-xmu/fidbench ``fidbench/modifier.py``), so that a
Modifier file written for them runs under the ``legacy`` method with only its import line changed:
``from fidbench.legacy import Modifier``.

The interface is the original's: ``Modifier(model, save_ckp, load_ckp)`` keeps the three, loads ``load_ckp``
at once when it is given; ``get_conf(path)`` sets ``conf`` to the JSON file's content (None without a path);
``forward`` and ``generate`` delegate to ``model``; ``freeze_model`` / ``unfreeze_model`` switch gradients
off for the model and on for ``ft_params()``; ``save_checkpoint`` / ``load_checkpoint`` write and read the
list of ``ft_params()`` tensors with ``torch.save`` / ``torch.load``. ``ft_params`` and ``reset`` are the
subclass's to define. Differences from the original:
- checkpoints are read with ``torch.load(weights_only=True)``: a file holding anything but tensors (code
  to unpickle) is refused, never run;
- a checkpoint whose tensor count or shapes differ from ``ft_params()`` raises a ValueError naming the
  file (the original asserted the count and let a shape mismatch through ``param.data = ...``);
- ``get_conf`` does not print the config (fidbench records a variant's parameters in its report);
- no DeepSpeed ZeRO-3 gathering when saving (fidbench does not train with DeepSpeed).
"""

from __future__ import annotations

import json

import torch

from ..models import load_tensors


class Modifier(torch.nn.Module):
    def __init__(self, model, save_ckp, load_ckp):
        super().__init__()
        self.model = model
        self.load_ckp = load_ckp
        self.save_ckp = save_ckp
        if self.load_ckp is not None:
            self.load_checkpoint()

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def get_conf(self, config):
        """``self.conf``: the JSON content of the file ``config``, or None. Called by subclasses, often before
        ``super().__init__`` (a plain attribute may be set on a Module that is not initialised yet)."""
        if config is None:
            self.conf = None
            return
        with open(config) as f:
            self.conf = json.load(f)

    def freeze_model(self):
        for param in self.model.parameters():
            param.requires_grad_(False)

    def unfreeze_model(self):
        for param in self.ft_params():
            param.requires_grad_(True)

    def ft_params(self):
        """The parameters the method trains (saved and loaded by the checkpoint methods)."""
        raise NotImplementedError

    def reset(self):
        raise NotImplementedError

    def save_checkpoint(self, ckp: str | None = None):
        ckp = ckp if ckp is not None else self.save_ckp
        if ckp is None:
            raise ValueError(f"{type(self).__name__}.save_checkpoint: no path given and save_ckp is None")
        torch.save([param.detach().cpu().clone() for param in self.ft_params()], ckp)

    def load_checkpoint(self, ckp: str | None = None):
        ckp = ckp if ckp is not None else self.load_ckp
        saved = load_tensors(ckp, f"{type(self).__name__}.load_checkpoint")
        params = list(self.ft_params())
        if not isinstance(saved, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in saved):
            raise ValueError(f"{type(self).__name__}.load_checkpoint: {ckp} does not hold a list of tensors")
        if len(saved) != len(params):
            raise ValueError(f"{type(self).__name__}.load_checkpoint: {ckp} holds {len(saved)} tensors, "
                             f"ft_params() has {len(params)}")
        for i, (param, tensor) in enumerate(zip(params, saved)):
            if param.shape != tensor.shape:
                raise ValueError(f"{type(self).__name__}.load_checkpoint: {ckp} tensor {i} has shape "
                                 f"{tuple(tensor.shape)}, ft_params()[{i}] has {tuple(param.shape)}")
            param.data = tensor.to(device=param.device, dtype=param.dtype)
