"""Weight quantization (rtn, gptq), pruning (magnitude, wanda) and KV quantization (kivi) on tiny models."""

import pytest
import torch
from helpers import FAMILIES, TINY, assert_needs_calibration, calibration, layer0_inputs, tiny_model

from fidbench import engine
from fidbench.attention import AttentionCall, Phase
from fidbench.methods import _weights as weights
from fidbench.methods import build
from fidbench.methods.gptq import gptq


def reference():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in (40, 30)]


def logits(model, method, mode="parallel"):
    p_ids, g_ids = reference()
    with method.apply(model, calibration()) as m:
        return engine.teacher_force(m, method, p_ids, g_ids, mode).logits


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, params", [
    ("rtn", {"bits": 16}), ("kivi", {"bits": 16}), ("gptq", {"bits": 16}),
    ("magnitude", {"sparsity": 0.0}), ("magnitude", {"pattern": "4:4"}), ("wanda", {"pattern": "4:4"}),
])
def test_degenerate_params_equal_origin(tiny, name, params):
    assert torch.equal(logits(tiny, build(name, params)), logits(tiny, build("origin", {})))


@pytest.mark.parametrize("name, params", [
    ("rtn", {"bits": 3}), ("gptq", {"bits": 4, "group": 32}), ("magnitude", {"sparsity": 0.5}),
    ("wanda", {"pattern": "2:4"}), ("kivi", {"bits": 2, "group": 4, "residual": 8}),
])
def test_methods_change_the_model(tiny, name, params):
    base = logits(tiny, build("origin", {}))
    assert (logits(tiny, build(name, params)) - base).abs().max() > 1e-3


@pytest.mark.parametrize("name, params", [
    ("rtn", {"bits": 4, "embeddings": True}), ("gptq", {"bits": 3, "act_order": True}),
    ("magnitude", {"pattern": "2:4"}), ("wanda", {"sparsity": 0.5}),
])
def test_weights_restored_exactly(tiny, name, params):
    before = state(tiny)
    with build(name, params).apply(tiny, calibration()):
        assert any(not torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


@pytest.mark.parametrize("embeddings", [False, True])
def test_rtn_touches_embeddings_only_when_asked(tiny, embeddings):
    head = tiny.get_output_embeddings().weight.clone()
    embed = tiny.get_input_embeddings().weight.clone()
    method = build("rtn", {"bits": 4, "embeddings": embeddings})
    with method.apply(tiny):
        assert torch.equal(tiny.get_output_embeddings().weight, head) != embeddings
        assert torch.equal(tiny.get_input_embeddings().weight, embed) != embeddings
    # Every decoder linear (7 per layer; 4 where projections are fused, phi3), plus the embedding and
    # head matrices when asked (one matrix when they are tied).
    matrices = {id(tiny.get_input_embeddings().weight), id(tiny.get_output_embeddings().weight)}
    assert method.kept()["layers"] == len(weights.decoder_linears(tiny)) + len(matrices) * embeddings


@pytest.mark.parametrize("bits, group, symmetric", [(3, 24, False), (4, 0, True), (8, 128, False), (2, 16, True)])
def test_rtn_within_half_a_step_on_a_grid(tiny, bits, group, symmetric):
    originals = [lin.weight.clone() for lin in weights.decoder_linears(tiny)]
    with build("rtn", {"bits": bits, "group": group, "symmetric": symmetric}).apply(tiny):
        for w, lin in zip(originals, weights.decoder_linears(tiny)):
            q = lin.weight
            for start in range(0, w.shape[1], group or w.shape[1]):  # the last group may be shorter
                cols = slice(start, start + (group or w.shape[1]))
                wg, qg = w[:, cols], q[:, cols]
                if symmetric:
                    step = wg.abs().amax(1, keepdim=True) / (2 ** (bits - 1) - 1)
                else:  # the integer zero point's range holds 0 (GPTQ's quant.py)
                    hi, lo = wg.amax(1, keepdim=True).clamp(min=0), wg.amin(1, keepdim=True).clamp(max=0)
                    step = (hi - lo) / (2**bits - 1)
                assert ((qg - wg).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
                levels = max(len(torch.unique(row)) for row in qg)
                assert 2 <= levels <= 2**bits - symmetric


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
def test_2_4_keeps_two_of_every_four_inputs(tiny, name):
    method = build(name, {"pattern": "2:4"})
    with method.apply(tiny, calibration()):
        for lin in weights.decoder_linears(tiny):
            blocks = lin.weight.reshape(lin.weight.shape[0], -1, 4)
            assert ((blocks != 0).sum(-1) == 2).all()
    assert method.kept()["sparsity"] == 0.5


@pytest.mark.parametrize("name", ["magnitude", "wanda"])
@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_measured_sparsity_equals_parameter(tiny, name, sparsity):
    method = build(name, {"sparsity": sparsity})
    with method.apply(tiny, calibration()):
        for lin in weights.decoder_linears(tiny):
            zeros = lin.weight == 0
            assert zeros.float().mean().item() == sparsity
            if name == "wanda":  # the paper's comparison group: each output row
                assert (zeros.sum(1) == round(sparsity * lin.weight.shape[1])).all()
    assert method.kept()["sparsity"] == sparsity
    assert method.kept()["layers"] == len(weights.decoder_linears(tiny))


def test_wanda_uses_activations():
    """Scaling one input feature's activations changes which weights Wanda keeps, not magnitude's."""
    model = tiny_model("llama")
    lin = weights.decoder_linears(model)[0]  # the first linear reads the normed embeddings
    masks = {}
    for scale in (1.0, 50.0):
        with torch.no_grad():
            weights.decoder_layers(model)[0].input_layernorm.weight[0] = scale
        with build("wanda", {"sparsity": 0.5}).apply(model, calibration()):
            masks[scale] = lin.weight[:, 0] != 0
    assert masks[50.0].all() and not masks[1.0].all()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_sequential_equals_rerunning_the_model_up_to_each_layer(family):
    """The layer-input cache sees exactly what running the (partly transformed) model up to layer i sees."""
    prompts = [list(range(3, 3 + n)) for n in (21, 9)]  # 21 tokens exceed the tiny gemma3's sliding window

    def calibrate(model, run):
        seen = []

        def observe(lin, x):
            seen.append(x.clone())

        def transform(lins):
            for k, lin in enumerate(lins):  # a change that depends on what was observed
                lin.weight.mul_(1 - 0.1 * (k + 1) * seen[-1].abs().mean().clamp(max=1))

        run(model, prompts, observe, transform)
        return seen, [p.clone() for p in model.parameters()]

    def rerun(model, prompts, observe, transform):  # the plain way: the model up to layer i, for every i
        for layer in weights.decoder_layers(model):
            lins = weights.linears(layer)
            hooks = [lin.register_forward_hook(lambda m, a, out: observe(m, a[0].reshape(-1, a[0].shape[-1])))
                     for lin in lins]
            hooks.append(layer.register_forward_hook(weights._stop))
            for ids in prompts:
                try:
                    model(input_ids=torch.tensor([ids]), use_cache=False)
                except weights._Stop:
                    pass
            for h in hooks:
                h.remove()
            transform(lins)

    extra = {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    overrides = extra if "layer_types" in FAMILIES[family] else {"num_hidden_layers": 3}
    with torch.no_grad():
        seen, params = calibrate(tiny_model(family, **overrides), weights.sequential)
        seen_ref, params_ref = calibrate(tiny_model(family, **overrides), rerun)
    assert len(seen) == len(seen_ref) > 0
    assert all(torch.equal(a, b) for a, b in zip(seen, seen_ref))
    assert all(torch.equal(a, b) for a, b in zip(params, params_ref))


@pytest.mark.parametrize("symmetric, act_order", [(False, False), (True, True)])
def test_gptq_reconstructs_layers_better_than_rtn(tiny, symmetric, act_order):
    inputs = layer0_inputs(tiny)
    params = {"bits": 3, "group": 32, "symmetric": symmetric}
    originals = {lin: lin.weight.clone() for lin in inputs}
    errors = {}
    for name, extra in (("rtn", {}), ("gptq", {"act_order": act_order})):
        with build(name, {**params, **extra}).apply(tiny, calibration()):
            errors[name] = [torch.linalg.norm(x @ (originals[lin] - lin.weight).T).item() for lin, x in inputs.items()]
    assert all(g < r for g, r in zip(errors["gptq"], errors["rtn"])), errors


def test_gptq_function_matches_rtn_grid_without_error_feedback():
    """With an identity Hessian no error can be spread, so GPTQ is round-to-nearest on the same grid."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = gptq(w, torch.eye(64), bits=4, group=16, symmetric=False, damp=0.0, act_order=False)
    assert torch.allclose(q, weights.fake_quant(w, 4, 16, False, integer_zero=True), atol=1e-6)
    q = gptq(w, torch.eye(64), bits=4, group=16, symmetric=False, damp=0.0, act_order=False, integer_zero=False)
    assert torch.allclose(q, weights.fake_quant(w, 4, 16, False), atol=1e-6)


def gptq_reference_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """IST-DASLab/gptq quant.py, asymmetric, one group per row: Quantizer.find_params, then quantize()."""
    maxq = 2**bits - 1
    xmin, xmax = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
    scale = ((xmax - xmin) / maxq)[:, None]
    zero = torch.round(-xmin[:, None] / scale)
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)


def test_integer_zero_point_is_gptqs_quantizer_on_an_outlier_group():
    """A group of small weights and one outlier at 3 bits: the default grid is GPTQ's (and AWQ's: the group holds
    both signs), whose zero point is an integer level; ``zero_point: float`` keeps the group's minimum."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 128, generator=g) * 0.02
    w[:, 7] = 0.3  # one outlier per row stretches the range
    w[:, 9] = 0.0
    got = weights.fake_quant(w, 3, 128, False, integer_zero=True)
    torch.testing.assert_close(got, gptq_reference_quantize(w, 3), rtol=0, atol=1e-7)
    assert (got[:, 9] == 0).all()  # 0 is a level of the grid
    old = weights.fake_quant(w, 3, 128, False)
    assert not torch.equal(got, old) and (old[:, 9] != 0).all()


@pytest.mark.parametrize("zero_point", ["integer", "float"])
def test_rtn_zero_point_parameter(tiny, zero_point):
    lin = weights.decoder_linears(tiny)[0]
    w = lin.weight.clone()
    params = {"bits": 3, "group": 16} | ({} if zero_point == "integer" else {"zero_point": "float"})
    with build("rtn", params).apply(tiny):
        assert torch.equal(lin.weight, weights.fake_quant(w, 3, 16, False, zero_point == "integer"))


class Recorded(AttentionCall):
    """An attention call that keeps the keys, values and mask the method hands to dense."""

    def dense(self, mask=None, query=None, key=None, value=None):
        self.seen = (mask, key, value)
        return super().dense(mask=mask, query=query, key=key, value=value)


@pytest.mark.parametrize("n_q", [1, 37])
def test_kivi_residual_window_is_bit_exact(tiny, n_q):
    r, n_k = 8, 60
    attn = weights.decoder_layers(tiny)[0].self_attn
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, TINY["num_attention_heads"], n_q, 16, generator=g)
    k, v = (torch.randn(1, TINY["num_key_value_heads"], n_k, 16, generator=g) for _ in range(2))
    call = Recorded(attn, q, k, v, None, Phase("decode", n_k - n_q), {"scaling": 0.25})
    method = build("kivi", {"bits": 2, "group": 4, "residual": r})
    method.attend(call)
    mask, keys, values = call.seen
    assert mask.shape[-1] == 3 * n_k
    for row, t in enumerate(range(n_k - n_q, n_k)):
        for j in range(n_k):
            copies = mask[0, 0, row].reshape(3, n_k)[:, j].nonzero().flatten().tolist()
            if j > t:
                assert copies == []
                continue
            assert len(copies) == 1
            key, value = keys[0, :, copies[0] * n_k + j], values[0, :, copies[0] * n_k + j]
            assert torch.equal(key, k[0, :, j]) == (j >= r * (t // r)), (t, j)
            assert torch.equal(value, v[0, :, j]) == (j >= t - r), (t, j)  # r + 1 values, as KIVI appends first
    kept = method.kept()
    assert 0 < kept["values_quantized"] < kept["keys_quantized"] < 1


def test_kivi_prefill_and_short_caches_stay_dense(tiny):
    method = build("kivi", {"bits": 2, "group": 4, "residual": 8})
    attn = weights.decoder_layers(tiny)[0].self_attn
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 20, 16)
    assert method.attend(AttentionCall(attn, q, k, k, None, Phase("prefill", 20))) is None
    assert method.attend(AttentionCall(attn, q[:, :, :1], k[:, :, :8], k[:, :, :8], None, Phase("decode", 7))) is None


def test_kivi_parallel_equals_stepwise(tiny):
    method = build("kivi", {"bits": 2, "group": 4, "residual": 8})
    assert method.parallel_exact
    parallel, stepwise = logits(tiny, method, "parallel"), logits(tiny, method, "stepwise")
    assert torch.allclose(parallel, stepwise, atol=1e-5, rtol=0)
    assert (parallel - logits(tiny, build("origin", {}))).abs().max() > 1e-3


@pytest.mark.parametrize("name, params, message", [
    ("rtn", {"bits": 5}, "bits"),
    ("gptq", {"bits": 5}, "bits"),
    ("kivi", {"bits": 3}, "bits"),
    ("kivi", {"residual": 20}, "residual"),
    ("rtn", {"group": -1}, "group"),
    ("magnitude", {"sparsity": 1.5}, "sparsity"),
    ("wanda", {"sparsity": -0.1}, "sparsity"),
    ("magnitude", {"pattern": "3:2"}, "pattern"),
    ("wanda", {"pattern": "2-4"}, "pattern"),
    ("magnitude", {}, "sparsity"),
    ("wanda", {"sparsity": 0.5, "pattern": "2:4"}, "exactly one"),
    ("gptq", {"samples": 0}, "samples"),
])
def test_bad_params_are_clear_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        build(name, params)


@pytest.mark.parametrize("name, params", [("gptq", {}), ("wanda", {"sparsity": 0.5})])
def test_calibration_dataset_must_exist(name, params):
    assert_needs_calibration(name, params)


def test_calibration_is_recorded(tiny):
    method = build("gptq", {"dataset": "chat", "samples": 4})
    with method.apply(tiny, calibration(n=6, length=24)):
        pass
    assert method.params()["dataset"] == "chat" and method.params()["samples"] == 4
    assert method.kept()["calibration_prompts"] == 4 and method.kept()["calibration_tokens"] == 96


def test_pattern_needs_divisible_inputs():
    model = tiny_model("llama")  # 64 and 128 inputs
    with pytest.raises(ValueError, match="not a multiple of 24"):
        with build("magnitude", {"pattern": "2:24"}).apply(model):
            pass
