"""No method's per-layer hook waits for the device: the host reads no tensor value inside ``attend``.

On a GPU each read (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, a Python branch on a tensor,
``torch.equal``, an output whose size depends on values such as ``nonzero``) stalls the host until the
device catches up, once per layer and step. On a CPU they cost nothing, so this counts them instead: a
``TorchDispatchMode`` sees every aten op of one teacher-forced sample on tiny models of 2 and 6 layers,
and the number of synchronizing ops must not grow with the number of layers. Under inference mode on
torch 2.13, ``.item()``, ``int()`` and ``float()`` of a tensor dispatch to ``aten.item``, ``bool()`` to
``aten.is_nonzero`` (checked below). Every registered method with an attention hook is covered.
"""

import collections

import pytest
import torch
from helpers import calibration, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from fidbench import engine
from fidbench.methods import REGISTRY, build

SYNCHRONIZING = {"item", "_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select"}
ATTENTION = sorted(name for name, cls in REGISTRY.items() if cls.kind == "attention")


class Syncs(TorchDispatchMode):
    """Counts the synchronizing aten ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCHRONIZING:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_host_reads():
    t = torch.tensor([1.0, 0.0])
    with torch.inference_mode(), Syncs() as syncs:
        t[0].item(), int(t[0]), float(t[0]), bool(t[0]), torch.equal(t, t), t.nonzero()
    assert syncs.ops == {"item": 3, "is_nonzero": 1, "equal": 1, "nonzero": 1}


def syncs_of(method: str, layers: int) -> collections.Counter:
    model = tiny_model("llama", num_hidden_layers=layers)
    g = torch.Generator().manual_seed(1)
    p_ids, g_ids = torch.randint(0, 283, (40,), generator=g).tolist(), torch.randint(0, 283, (8,), generator=g).tolist()
    m = build(method, REGISTRY[method].test_params["real"])
    with m.apply(model, calibration()) as applied, Syncs() as syncs:
        engine.teacher_force(applied, m, p_ids, g_ids, engine.resolve_mode(m, "auto"))
    assert m.kept()  # the hook ran
    return syncs.ops


@pytest.mark.parametrize("method", ATTENTION)
def test_hooks_never_wait_for_the_device(method):
    two, six = syncs_of(method, 2), syncs_of(method, 6)
    assert sum(six.values()) == sum(two.values()), f"{method}: {dict(two)} with 2 layers, {dict(six)} with 6"
