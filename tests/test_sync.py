"""No method's per-layer hook waits for the device: the host reads no tensor value inside ``attend``.

On a GPU each read (``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, a Python branch on a tensor,
``torch.equal``, ``.tolist()``, an output whose size depends on values such as ``nonzero``, boolean-mask
indexing, ``unique`` or ``repeat_interleave`` by a tensor) stalls the host until the device catches up,
once per layer and step. On a CPU they cost nothing, so this counts them instead: a ``TorchDispatchMode``
sees every aten op of one teacher-forced sample on tiny models of 2 and 6 layers, and the number of
synchronizing ops must not grow with the number of layers. Under inference mode on torch 2.13, ``.item()``,
``int()`` and ``float()`` of a tensor dispatch to ``aten.item``, ``bool()`` to ``aten.is_nonzero``;
``.tolist()`` and ``.numpy()`` read memory without an aten op, so they are counted by patching them
(checked below). Every registered method with an attention hook is covered, with its test parameters and
with each convention that takes its own path through the hook.
"""

import collections

import pytest
import torch
from helpers import calibration, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from fidbench import engine
from fidbench.methods import REGISTRY, build

# Ops that wait for the device whatever their arguments: they return a host value or a value-dependent size.
SYNCHRONIZING = {"item", "_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
                 "_unique2", "unique_dim", "unique_consecutive", "bincount"}
ATTENTION = sorted(name for name, cls in REGISTRY.items() if cls.kind == "attention")
# Conventions whose hook takes a path the test parameters do not (method, extra parameters).
PATHS = {
    "snapkv-kv_head": ("snapkv", {"granularity": "kv_head", "pooling": "avg"}),
    "streamingllm-windowed": ("streamingllm", {"prefill": "windowed"}),
    "h2o-query_head": ("h2o", {"granularity": "query_head"}),
    "adakv-knorm": ("adakv", {"scorer": "knorm", "scorer_params": {}}),
    "fp8-attention-p_fp8": ("fp8-attention", {"p_fp8": True}),
}


def synchronizes(func, args, kwargs) -> bool:
    """Whether an aten op waits for the device: the ops above, ``where(cond)``, indexing by a boolean mask
    (its size depends on the mask) and ``repeat_interleave`` by a tensor of counts without ``output_size``."""
    name = func.overloadpacket.__name__
    if name in SYNCHRONIZING:
        return True
    if name == "where":
        return len(args) == 1
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name == "repeat_interleave":
        counts = args[0] if func._overloadname == "Tensor" else args[1]  # .Tensor(repeats), .self_*(self, repeats)
        return isinstance(counts, torch.Tensor) and kwargs.get("output_size") is None
    return False


class Syncs(TorchDispatchMode):
    """Counts the synchronizing aten ops dispatched inside the block, and ``tolist`` / ``numpy`` calls."""

    READS = ("tolist", "numpy")

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __enter__(self):
        self.originals = {read: getattr(torch.Tensor, read) for read in self.READS}
        for read, method in self.originals.items():
            setattr(torch.Tensor, read, self.counted(read, method))
        return super().__enter__()

    def __exit__(self, *exc):
        for read, method in self.originals.items():
            setattr(torch.Tensor, read, method)
        return super().__exit__(*exc)

    def counted(self, read, method):
        def counting(tensor, *args, **kwargs):
            self.ops[read] += 1
            return method(tensor, *args, **kwargs)
        return counting

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if synchronizes(func, args, kwargs or {}):
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_host_reads():
    t, mask, counts = torch.tensor([1.0, 0.0]), torch.tensor([True, False]), torch.tensor([1, 2])
    with torch.inference_mode(), Syncs() as syncs:
        t[0].item(), int(t[0]), float(t[0]), bool(t[0]), torch.equal(t, t), t.nonzero(), torch.where(mask)
        t[mask], t.clone().__setitem__(mask, 0.0), t.repeat_interleave(counts), t.unique(), t.tolist(), t.numpy()
    assert syncs.ops == {"item": 3, "is_nonzero": 1, "equal": 1, "nonzero": 1, "where": 1, "index": 1,
                         "index_put_": 1, "repeat_interleave": 1, "_unique2": 1, "tolist": 1, "numpy": 1}


def test_the_counter_lets_shape_only_ops_pass():
    t, mask = torch.tensor([1.0, 0.0]), torch.tensor([True, False])
    with torch.inference_mode(), Syncs() as syncs:
        torch.where(mask, t, 0.0), t.masked_fill(mask, 0.0), t[torch.tensor([1])], t.repeat_interleave(2)
        t.repeat_interleave(torch.tensor([1, 2]), output_size=3), t.topk(1), t[:1]
    assert not syncs.ops


def syncs_of(method: str, params: dict, layers: int, batched: bool = False) -> collections.Counter:
    """The synchronizing ops of teacher forcing one sample, or (``batched``) a left-padded batch of three whose rows
    the hook sees one by one (fidbench.attention.by_row)."""
    model = tiny_model("llama", num_hidden_layers=layers)
    g = torch.Generator().manual_seed(1)
    samples = [(torch.randint(0, 283, (n,), generator=g).tolist(), torch.randint(0, 283, (8,), generator=g).tolist())
               for n in ((40, 27, 33) if batched else (40,))]
    m = build(method, params)
    mode = engine.resolve_mode(m, "auto")
    with m.apply(model, calibration()) as applied, Syncs() as syncs:
        if batched:
            engine.teacher_force_batch(applied, m, samples, mode)
        else:
            engine.teacher_force(applied, m, *samples[0], mode)
    assert m.kept()  # the hook ran
    return syncs.ops


CASES = {name: (name, {}) for name in ATTENTION} | PATHS


@pytest.mark.parametrize("batched", [False, True], ids=["one", "batched"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hooks_never_wait_for_the_device(case, batched):
    method, extra = CASES[case]
    params = {**REGISTRY[method].test_params["real"], **extra}
    two, six = syncs_of(method, params, 2, batched), syncs_of(method, params, 6, batched)
    assert sum(six.values()) == sum(two.values()), f"{case}: {dict(two)} with 2 layers, {dict(six)} with 6"
