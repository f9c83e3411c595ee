"""The method API: every subclass is a dataclass, parameters are checked against their resolved
annotations, kinds are declared."""

from typing import Literal

import pytest

from fidbench import Method, register
from fidbench.methods import REGISTRY, build


@pytest.fixture
def scratch_registry():
    """Methods registered by a test stay out of the real registry."""
    saved = dict(REGISTRY)
    yield REGISTRY
    REGISTRY.clear()
    REGISTRY.update(saved)


def test_helper_base_class_keeps_its_fields(scratch_registry):
    class Sized(Method):  # a helper base, never registered
        size: int = 4

    @register
    class Shrink(Sized):
        name = "shrink-test"
        kind = "none"
        factor: float = 0.5

    method = build("shrink-test", {"size": 8, "factor": 1})
    assert (method.size, method.factor) == (8, 1)
    assert method.params() == {"size": 8, "factor": 1}


@pytest.mark.parametrize("method, params, message", [
    ("rtn", {"symmetric": "false"}, "parameter 'symmetric' of method 'rtn' must be bool, got 'false' (str)"),
    ("topk", {"keep": True}, "parameter 'keep' of method 'topk' must be float, got True (bool)"),
    ("topk", {"keep": "0.1"}, "parameter 'keep' of method 'topk' must be float, got '0.1' (str)"),
    ("tova", {"min_budget": 8.5}, "parameter 'min_budget' of method 'tova' must be int, got 8.5 (float)"),
    ("snapkv", {"budget": 1.5}, "parameter 'budget' of method 'snapkv' must be int or None, got 1.5 (float)"),
    ("legacy", {"module": "m.py", "cls": "C", "config": 3}, "must be str or dict or None, got 3 (int)"),
])
def test_parameter_types_are_checked_with_variant_parameter_type_and_value(method, params, message):
    with pytest.raises(ValueError) as e:
        build(method, params, "suite.yaml: methods.my-variant")
    assert str(e.value).startswith("suite.yaml: methods.my-variant: ") and message in str(e.value)


def test_ints_are_floats_and_none_fills_optionals():
    assert build("topk", {"keep": 1}).keep == 1
    assert build("snapkv", {"ratio": None, "budget": 64}).budget == 64


def test_literal_parameters_take_only_their_values(scratch_registry):
    @register
    class Choosy(Method):
        name = "choosy-test"
        kind = "none"
        mode: Literal["a", "b"] = "a"

    assert build("choosy-test", {"mode": "b"}).mode == "b"
    with pytest.raises(ValueError, match="must be 'a' or 'b', got 'c'"):
        build("choosy-test", {"mode": "c"})


def test_kinds_are_declared_and_attention_methods_have_a_hook(scratch_registry):
    with pytest.raises(ValueError, match="kind 'attention' but defines no attend"):
        @register
        class NoHook(Method):
            name = "nohook-test"

    with pytest.raises(ValueError, match="kind must be one of"):
        @register
        class Odd(Method):
            name = "odd-test"
            kind = "magic"

    assert {cls.kind for cls in REGISTRY.values()} <= {"none", "attention", "weights", "model", "cache", "own_loop"}
