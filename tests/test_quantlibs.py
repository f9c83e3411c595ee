"""Peers as methods: transformers' quantized KV cache (``quantized-cache``), on-the-fly quantization through
transformers' quantization configs (``hf-quant``), and checkpoints written by real quantization libraries
(``checkpoint``). Tests that need an optional library are skipped without it; CI runs them in a venv with
``fidbench[quant]`` installed."""

import importlib.metadata
import json

import pytest
import torch
from helpers import FULL, force, random_ids, save_words, tiny_model, words_suite

from fidbench import engine
from fidbench.harness import Bench
from fidbench.methods import build
from fidbench.suite import load


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / "cache"))


def installed(package: str) -> bool:
    try:
        importlib.metadata.version(package)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def needs(package: str):
    return pytest.mark.skipif(not installed(package), reason=f"needs {package} (pip install 'fidbench[quant]')")


CACHE_BACKENDS = [
    pytest.param({"backend": "fp8"}, id="fp8"),
    pytest.param({"backend": "quanto", "nbits": 2, "residual_length": 8, "q_group_size": 16}, id="quanto-2",
                 marks=needs("optimum-quanto")),
    pytest.param({"backend": "quanto", "nbits": 4, "residual_length": 5, "q_group_size": 16},
                 id="quanto-4", marks=needs("optimum-quanto")),
    pytest.param({"backend": "hqq", "nbits": 2, "residual_length": 8, "q_group_size": 16}, id="hqq-2",
                 marks=needs("hqq")),
    pytest.param({"backend": "hqq", "nbits": 4, "residual_length": 5, "q_group_size": 16, "axis_value": 1},
                 id="hqq-4-axis", marks=needs("hqq")),
]


@pytest.mark.parametrize("params", CACHE_BACKENDS)
@pytest.mark.parametrize("family", FULL)
def test_quantized_cache_scores_what_generate_computes(family, params):
    """Teacher forcing over what ``generate(cache_implementation="quantized")`` wrote gives, step for step, the
    logits ``generate`` computed with that cache: the method decodes exactly as transformers does."""
    model = tiny_model(family)
    p_ids = random_ids(40)
    prompt = torch.tensor([p_ids])
    out = model.generate(prompt, max_new_tokens=24, do_sample=False, cache_implementation="quantized",
                         cache_config=dict(params), output_logits=True, return_dict_in_generate=True,
                         pad_token_id=0, eos_token_id=None)
    g_ids = out.sequences[0, len(p_ids):].tolist()
    assert len(g_ids) == 24
    method = build("quantized-cache", params)
    assert engine.resolve_mode(method, "auto") == "stepwise"
    logits = force(model, method, p_ids, g_ids)
    torch.testing.assert_close(logits, torch.cat(out.logits).float(), rtol=0, atol=1e-5)
    # and it is not the full-precision cache: the base model's logits over the same tokens differ
    base = force(model, build("origin", {}), p_ids, g_ids)
    assert (logits - base).abs().max() > 1e-4
    if params["backend"] != "fp8":  # the residual re-quantizes: one forward of the reference is not the same
        with pytest.raises(ValueError, match="not exact under parallel"):
            engine.resolve_mode(method, "parallel")


def test_quantized_cache_parameters_are_checked():
    for params, message in [
        ({"backend": "int"}, "backend must be one of quanto, hqq, fp8"),
        ({"backend": "quanto", "nbits": 3}, r"quantized-cache \(quanto\): nbits must be one of \(2, 4\)"),
        ({"backend": "hqq", "axis_key": -1}, r"axis_key must be one of \(0, 1\)"),
        ({"backend": "fp8", "nbits": 4}, "quantizes per tensor and takes none of nbits"),
        ({"backend": "hqq", "residual_length": 0}, "residual_length must be >= 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            build("quantized-cache", params)


@pytest.mark.parametrize("backend, package", [("quanto", "optimum-quanto"), ("hqq", "hqq")])
def test_quantized_cache_without_its_backend_names_the_package(backend, package):
    if installed(package):
        pytest.skip(f"{package} is installed")
    method = build("quantized-cache", {"backend": backend})
    with pytest.raises(RuntimeError, match=f"needs the package {package}: pip install {package}"):
        force(tiny_model("llama"), method, random_ids(8), random_ids(3))


def run_suite(tmp_path, base, methods):
    suite = load(words_suite(tmp_path, base, methods))
    bench = Bench(suite, progress=False)
    return {case.variant.name: bench.run(case) for case in suite.cases()}


@pytest.mark.parametrize("quant_method, package", [("hqq", "hqq"), ("compressed-tensors", "compressed-tensors"),
                                                    ("quanto", "optimum-quanto")])
def test_checkpoint_needing_a_missing_backend_names_the_package(tmp_path, cache, quant_method, package):
    if installed(package):
        pytest.skip(f"{package} is installed")
    base = save_words(tmp_path / "base", "llama")
    quantized = save_words(tmp_path / "quantized", "llama")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": quant_method}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match=f"quantized with {quant_method}; loading it needs the package {package}: "
                                           f"pip install {package}"):
        run_suite(tmp_path, base, {"q": {"method": "checkpoint", "path": str(quantized)}})
