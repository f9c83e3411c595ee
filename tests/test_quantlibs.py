"""Peers as methods: transformers' quantized KV cache (``quantized-cache``), on-the-fly quantization through
transformers' quantization configs (``hf-quant``), and checkpoints written by real quantization libraries
(``checkpoint``). Tests that need an optional library are skipped without it; CI runs them in a venv with
``fidbench[quant]`` installed."""

import importlib.metadata
import json

import pytest
import torch
import transformers.cache_utils
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


FP8_CACHE = hasattr(transformers.cache_utils, "Fp8QuantizedLayer")
needs_fp8_cache = pytest.mark.skipif(not FP8_CACHE, reason=f"transformers {transformers.__version__} has no fp8 cache")
CACHE_BACKENDS = [
    pytest.param({"backend": "fp8"}, id="fp8", marks=needs_fp8_cache),
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


# (backend, config, package, whether transformers can save the quantized model for `checkpoint` to load back)
ON_THE_FLY = [
    pytest.param("torchao", {"quant_type": "IntxWeightOnlyConfig", "weight_dtype": "int4", "granularity": 16,
                             "mapping_type": "ASYMMETRIC"}, "torchao", True, id="torchao-int4-g16",
                 marks=needs("torchao")),
    pytest.param("torchao", {"quant_type": "Int8WeightOnlyConfig"}, "torchao", True, id="torchao-int8",
                 marks=needs("torchao")),
    pytest.param("bitsandbytes", {"load_in_8bit": True}, "bitsandbytes", True, id="bnb-int8",
                 marks=needs("bitsandbytes")),
    pytest.param("bitsandbytes", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                  "bnb_4bit_compute_dtype": "float32"}, "bitsandbytes", False, id="bnb-nf4",
                 marks=needs("bitsandbytes")),  # saved and reloaded it computes other logits (docs/methods.md)
    pytest.param("quanto", {"weights": "int4"}, "optimum-quanto", False, id="quanto-int4",
                 marks=needs("optimum-quanto")),  # transformers refuses to save a quanto model
]


@pytest.mark.parametrize("backend, config, package, saved", ON_THE_FLY)
def test_hf_quant_scores_the_library_quantized_model(tmp_path, cache, backend, config, package, saved):
    """hf-quant scores the model the library quantized while loading; where transformers saves it, `checkpoint`
    on the directory it writes scores the same (to float rounding: NLL within 0.1 %, KL within 5 % or 1e-8)."""
    base = save_words(tmp_path / "base", "llama")
    methods = {"origin": {}, "otf": {"method": "hf-quant", "backend": backend, "config": config}}
    if saved:
        from transformers import AutoModelForCausalLM

        method = build("hf-quant", {"backend": backend, "config": config})
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=method.quantization_config())
        model.save_pretrained(tmp_path / "quantized")
        methods["saved"] = {"method": "checkpoint", "path": str(tmp_path / "quantized"), "tokenizer": str(base)}
    runs = run_suite(tmp_path, base, methods)
    origin, otf = runs["origin"], runs["otf"]
    assert otf["kept"]["library"] == f"{package} {importlib.metadata.version(package)}"
    # the quantized model, not the base again (which would score exactly as origin does)
    assert otf["scores"]["kl_mean"] > origin["scores"]["kl_mean"] and otf["scores"]["nll"] != origin["scores"]["nll"]
    if saved:
        assert runs["saved"]["kept"]["quantization"] == backend
        saved = runs["saved"]["scores"]
        for key in ("acc1", "acc5", "first_divergence", "exact_match", "n_tokens"):
            assert saved[key] == otf["scores"][key], key
        # The reloaded layers' kernels may sum in another order. Where the quantized model's KL is itself ~1e-5
        # (torchao int4 g16 on this tiny model), rounding-level logit differences move it by percents: measured on
        # one CPU, kl_mean 9.81e-6 vs 9.80e-6, kl_max 2.22e-5 vs 2.17e-5 (2.2 %). NLL, far from 0, stays within 0.1 %.
        assert saved["nll"] == pytest.approx(otf["scores"]["nll"], rel=1e-3), "nll"
        for key in ("kl_mean", "kl_max"):
            assert saved[key] == pytest.approx(otf["scores"][key], rel=0.05, abs=1e-8), key


@pytest.mark.parametrize("backend, config, package, saved", ON_THE_FLY)
def test_hf_quant_batched_scores_equal_one_prompt_at_a_time(tmp_path, monkeypatch, backend, config, package, saved):
    """The library's quantized linears take 3 padded prompts per forward (--fidbench-batch-size) and score as they
    do one at a time, to fp32 summation order (these references have no near-tie)."""
    base = save_words(tmp_path / "base", "llama")
    suite = load(words_suite(tmp_path, base, {"otf": {"method": "hf-quant", "backend": backend, "config": config}}))
    runs = {}
    for size in (1, 3):
        monkeypatch.setenv("FIDBENCH_CACHE", str(tmp_path / f"cache{size}"))
        runs[size] = Bench(suite, progress=False, batch_size=size, free_run=True).run(suite.cases()[0])
    assert runs[3]["timing"]["batch_size"] == 3
    for key in ("acc1", "acc5", "first_divergence", "n_tokens", "rouge_l"):
        assert runs[3]["scores"][key] == runs[1]["scores"][key], key
    for key in ("kl_mean", "nll"):
        assert runs[3]["scores"][key] == pytest.approx(runs[1]["scores"][key], rel=1e-3, abs=1e-7), key


def test_hf_quant_refusals(tmp_path, cache):
    with pytest.raises(ValueError, match="hf-quant: backend must be one of hqq, quanto, bitsandbytes, torchao"):
        build("hf-quant", {"backend": "gguf"})
    with pytest.raises(ValueError, match=r"hf-quant \(torchao\): config needs quant_type"):
        build("hf-quant", {"backend": "torchao", "config": {}})
    base = save_words(tmp_path / "base", "llama")
    int4 = {"method": "hf-quant", "backend": "torchao", "config": {"quant_type": "Int4WeightOnlyConfig"}}
    with pytest.raises(ValueError, match="torchao Int4WeightOnlyConfig needs a CUDA GPU, the base model is on cpu"):
        run_suite(tmp_path, base, {"int4": int4})
    for backend, package in [("hqq", "hqq"), ("quanto", "optimum-quanto"), ("torchao", "torchao")]:
        if not installed(package):
            params = {"method": "hf-quant", "backend": backend, "config": {"quant_type": "X"}}
            with pytest.raises(RuntimeError, match=f"needs the package {package}: pip install {package}"):
                run_suite(tmp_path, base, {backend: params})


@needs("hqq")
def test_hf_quant_hqq_is_refused_while_transformers_cannot_quantize_with_it(tmp_path, cache):
    import transformers

    base = save_words(tmp_path / "base", "llama")
    hqq = {"method": "hf-quant", "backend": "hqq", "config": {"nbits": 4, "group_size": 16}}
    with pytest.raises(ValueError, match=f"transformers {transformers.__version__} cannot quantize with hqq"):
        run_suite(tmp_path, base, {"hqq": hqq})


# Where fidbench's rtn and a library claim the same algorithm on the same grid: round to nearest on an asymmetric
# min-max grid of 2**bits levels per group of input columns, with a float offset (the group's min, not rounded to
# an integer zero point). Both must give the same quantized weights.
@needs("optimum-quanto")
@pytest.mark.parametrize("hidden, group", [(64, 0), (256, 128)])  # quanto groups by 128 when the width allows
def test_quanto_int4_through_transformers_equals_rtn(tmp_path, cache, hidden, group):
    """optimum-quanto's int4 weights (MaxOptimizer: scale (max - min) / 15, shift -min), loaded by transformers'
    QuantoConfig, are rtn's bits 4, asymmetric, with quanto's group: per row up to 128 inputs, else 128."""
    from transformers import AutoModelForCausalLM

    from fidbench.methods import _weights as weights

    base = save_words(tmp_path / "base", "llama", hidden_size=hidden, intermediate_size=2 * hidden)
    quantized = AutoModelForCausalLM.from_pretrained(base, quantization_config=build(
        "hf-quant", {"backend": "quanto", "config": {"weights": "int4"}}).quantization_config())
    model = AutoModelForCausalLM.from_pretrained(base)
    rtn = build("rtn", {"bits": 4, "group": group, "zero_point": "float"})  # quanto's zero point is a float
    with rtn.apply(model):
        ours = [lin.weight.detach().clone() for lin in weights.decoder_linears(model)]
    theirs = [m.qweight.dequantize().float() for m in weights.decoder_layers(quantized).modules()
              if hasattr(m, "qweight")]
    assert len(theirs) == len(ours) == 14
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    quanto = {"method": "hf-quant", "backend": "quanto", "config": {"weights": "int4"}}
    runs = run_suite(tmp_path, base, {"rtn": {"method": "rtn", "bits": 4, "group": group, "zero_point": "float"},
                                      "quanto": quanto})
    assert runs["quanto"]["scores"]["kl_mean"] > 1e-6  # quantized, and both score the same
    for key in ("acc1", "acc5", "first_divergence"):
        assert runs["quanto"]["scores"][key] == runs["rtn"]["scores"][key]
    assert runs["quanto"]["scores"]["kl_mean"] == pytest.approx(runs["rtn"]["scores"]["kl_mean"], rel=1e-4)


@needs("hqq")
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [16, 32, 64])
def test_hqq_round_to_nearest_equals_rtn(bits, group):
    """HQQ's quantizer without its optimisation (``optimize=False``) and without rounding the zero point
    (``round_zero=False``), grouped along the inputs (``axis=1``), is rtn's asymmetric grid: inverse scale
    15 / (max - min), zero -min * scale. Same codes for every weight of a tiny model, so the dequantized weights
    agree to float32 rounding (one code apart would differ by a whole step, ~1e-3 here)."""
    from hqq.core.quantize import Quantizer

    from fidbench.methods import _weights as weights

    model = tiny_model("llama")
    rtn = build("rtn", {"bits": bits, "group": group, "zero_point": "float"})  # round_zero=False below
    originals = [lin.weight.detach().clone() for lin in weights.decoder_linears(model)]
    with rtn.apply(model):
        ours = [lin.weight.detach().clone() for lin in weights.decoder_linears(model)]
    for w, mine in zip(originals, ours):
        codes, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group, optimize=False,
                                         round_zero=False, axis=1, bitpack=False, compute_dtype=torch.float32,
                                         device="cpu")
        theirs = Quantizer.dequantize(codes, meta).reshape(w.shape)
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-7)
        assert not torch.equal(mine, w)


@needs("compressed-tensors")
def test_checkpoint_scores_a_compressed_tensors_w4a16_checkpoint(tmp_path, cache):
    """A W4A16 checkpoint (int4 symmetric weights in groups of 16, pack-quantized) written by compressed-tensors as
    llm-compressor writes one after its round-to-nearest QuantizationModifier: scales and zero points from
    compressed-tensors' calculate_qparams on each group's min and max (llm-compressor's min-max observer), packed by
    its ModelCompressor. `checkpoint` loads it through transformers and scores exactly the weights it holds."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    from fidbench.methods import _weights as weights

    base = save_words(tmp_path / "base", "llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    expected = []
    for lin in weights.decoder_linears(model):
        w = lin.weight.detach()
        groups = w.reshape(w.shape[0], -1, 16)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        lin.weight_scale.data.copy_(scale)
        lin.weight_zero_point.data.copy_(zero)
        expected.append(fake_quantize(w, scale, zero, args))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(tmp_path / "w4a16")
    compressor.update_config(tmp_path / "w4a16")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "w4a16")
    with torch.no_grad():
        loaded(input_ids=torch.tensor([[1, 2, 3]]))  # compressed-tensors unpacks the weights on the first forward
    for lin, want in zip(weights.decoder_linears(loaded), expected, strict=True):
        torch.testing.assert_close(lin.weight, want, rtol=0, atol=0)
    runs = run_suite(tmp_path, base, {"origin": {},
                                      "w4a16": {"method": "checkpoint", "path": str(tmp_path / "w4a16"),
                                                "tokenizer": str(base)}})
    kept = runs["w4a16"]["kept"]
    assert kept["quantization"] == "compressed-tensors"
    assert kept["library"] == f"compressed-tensors {importlib.metadata.version('compressed-tensors')}"
    assert runs["w4a16"]["scores"]["kl_mean"] > 10 * runs["origin"]["scores"]["kl_mean"]


@pytest.mark.skipif(FP8_CACHE, reason="this transformers has the fp8 cache")
def test_the_fp8_cache_on_a_transformers_without_it_is_refused_naming_the_version():
    with pytest.raises(ValueError, match=f"transformers .{transformers.__version__}. has no fp8 quantized cache"):
        build("quantized-cache", {"backend": "fp8"})
