"""``stack``: several methods applied together, as a deployment applies them.

``members`` lists the methods as suite entries (``{method: awq, bits: 4}``). Weight methods (and a
``model`` method such as ``checkpoint``) come first, in the order given: each changes the model the next
one sees (a calibrated method calibrates on the weights the previous ones left). Then at most one
attention method of each role (``Method.role``), applied in the order of the roles whatever the order
given: ``select`` decides which keys a query sees and hands its mask on, ``cache`` turns the keys and
values the selection left into what the cache stores and hands those on, ``kernel`` computes attention
over them. Each member's ``call.dense(...)`` is the next member's input (``AttentionCall.then``); a
member that returns None (a degenerate setting, a layer it leaves alone) hands the call on unchanged,
so a member whose role is missing or degenerate changes nothing.

The stack is parallel-exact when every member is, its prefill is the base model's when every member's
is (and no member changes weights), and it is full-attention only when any member is. ``kept()`` records
each member's method, full parameters and ``kept``; the selection's ``kv_fraction`` is the stack's.

Refused, with the member named: an unknown method or parameter, two members of one role (two eviction
methods), a method that does not compose (no role: ``origin``, own-loop methods, a stack), and
``sparge-attention`` with ``decode: sparse`` after a cache member (its key blocks would span the copies
of the cache the member hands on).

Differences from a deployment: eviction is masking (``fidbench.methods._kv``), so a cache member
quantizes every position in its own position-aligned groups and a group's scale can span evicted
entries, where a physically pruned cache would group the kept entries only; what a query reads is the
kept entries, quantized. A selection's scores are computed on the full-precision cache. A kernel member
after a cache member attends over the copies the cache member hands on (``kivi``: quantized keys and values,
quantized keys with full values, both full, each position visible in one of them). A decode query's kernel
statistics (``fp8-attention``'s absmax scales, ``sage-attention``'s key mean and blocks) cover the keys it sees:
the kept entries, in the copies it reads, as a physically pruned cache would hold them; sage's key blocks
still count positions, evicted ones included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

from ..attention import AttentionCall
from .base import REGISTRY, ROLES, Method, build, register

WEIGHT_KINDS = ("weights", "model")


def parse_members(members) -> list[Method]:
    """The built members of a stack, each error naming the member; weight members first, then by role."""
    if not isinstance(members, list) or len(members) < 2:
        raise ValueError(f"stack: members must be a list of at least two methods, got {members!r}")
    built, roles = [], {}
    for i, spec in enumerate(members):
        who = f"stack member {i + 1}"
        if not isinstance(spec, dict) or not isinstance(spec.get("method"), str):
            raise ValueError(f"{who}: expected a mapping with a method name and its parameters, got {spec!r}")
        params = {k: v for k, v in spec.items() if k != "method"}
        method = build(spec["method"], params, f"{who} ({spec['method']})")
        if method.kind not in WEIGHT_KINDS and method.role is None:
            raise ValueError(f"{who}: method {method.name!r} (kind {method.kind!r}) does not compose: a stack "
                             f"takes weight methods and attention methods with a role ({', '.join(ROLES)})")
        if method.role is not None and method.role in roles:
            raise ValueError(f"{who}: {method.name!r} and {roles[method.role]!r} both play the role "
                             f"{method.role!r}; a stack takes at most one method per role")
        if method.role is not None:
            roles[method.role] = method.name
        built.append(method)
    attending = sorted((m for m in built if m.role is not None), key=lambda m: ROLES.index(m.role))
    kernel = next((m for m in attending if m.role == "kernel"), None)
    if "cache" in roles and getattr(kernel, "decode", None) == "sparse":
        raise ValueError(f"stack: {kernel.name!r} with decode: sparse does not compose with the cache member "
                         f"{roles['cache']!r}: its key blocks would span the copies of the cache it hands on")
    return [m for m in built if m.role is None] + attending


@register
class Stack(Method):
    name = "stack"
    description = "several methods applied together: weight methods in order, then select, cache and kernel roles"
    defaults_from = "each member's own (a stack adds no setting)"
    not_physically_checked = ("a stack hands each member's output on: its KV members are each checked here, "
                              "their composition in tests/test_stack.py")
    test_params = {
        "degenerate": {"members": [{"method": "rtn", "bits": 16}, {"method": "snapkv", "ratio": 1.0},
                                   {"method": "kivi", "bits": 16}]},
        "real": {"members": [{"method": "snapkv", "budget": 12, "window": 4, "kernel": 3},
                             {"method": "kivi", "bits": 2, "group": 4, "residual": 8}]},
    }
    members: list = dataclasses.field(default_factory=list)
    per_sample = ()  # a stack's per-sample state is its members' (parts)

    def validate(self):
        self._members = parse_members(self.members)
        self._weights = [m for m in self._members if m.role is None]
        self._attending = [m for m in self._members if m.role is not None]

    @property
    def parallel_exact(self) -> bool:
        """parallel where every member is"""
        return all(m.parallel_exact for m in self._members)

    @property
    def base_prefill(self) -> bool:
        """base prefill where every member's is"""
        return not self._weights and all(m.base_prefill for m in self._attending)

    @property
    def full_attention_only(self) -> bool:
        """full-attention layers only where a member is"""
        return any(m.full_attention_only for m in self._members)

    @contextlib.contextmanager
    def apply(self, model, context=None):
        with contextlib.ExitStack() as applied:
            for member in self._weights:
                model = applied.enter_context(member.apply(model, context))
            if self._attending:
                model = applied.enter_context(super().apply(model, context))  # installs the hook below
            yield model

    def begin(self, prompt_len: int) -> None:
        for member in self._members:
            member.begin(prompt_len)

    def parts(self) -> list:
        return self._members

    def attend(self, call: AttentionCall):
        return self._from(call, 0)

    def _from(self, call: AttentionCall, first: int):
        """What attention members ``first``.. make of ``call``: an output, or None for the model's own attention."""
        for i in range(first, len(self._attending)):
            call.then = functools.partial(self._then, i + 1) if i + 1 < len(self._attending) else None
            out = self._attending[i].attend(call)
            if out is not None:
                return out
        return None

    def _then(self, first: int, call: AttentionCall):
        out = self._from(call, first)
        return call.sdpa() if out is None else out

    def kept(self) -> dict:
        members = [{"method": m.name, "params": m.params(), "kept": m.kept()} for m in self._members]
        kept = {"stack": [m.name for m in self._members], "members": members}
        select = next((m for m in members if REGISTRY[m["method"]].role == "select"), None)
        if select is not None and "kv_fraction" in select["kept"]:
            kept["kv_fraction"] = select["kept"]["kv_fraction"]
        return kept
