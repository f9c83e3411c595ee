"""``origin``: the base model itself, run through the engine; its scores are the engine's noise floor."""

from .base import Method, register


@register
class Origin(Method):
    name = "origin"
    description = "the base model, unchanged: measures the engine's own noise floor"
    defaults_from = "no parameters: the base model as the suite loads it"
    kind = "none"
    base_prefill = True
    test_params = {"degenerate": {}, "real": None, "why": "origin is the base model"}
