"""awq: the reference's scale candidates and clipping search, groups found from the forward, o_proj left
unscaled under grouped-query attention, and the paper's claim that scaling salient channels beats
round-to-nearest on a tiny model with an activation outlier."""

import pytest
import torch
from helpers import assert_needs_calibration, calibration, tiny_model

from fidbench.methods import _weights as weights
from fidbench.methods import build
from fidbench.methods.awq import AWQ, clip_search, scale_candidates


def test_scale_candidates_are_the_references():
    x_mean = torch.rand(32) * 5 + 0.01
    candidates = list(scale_candidates(x_mean))
    assert len(candidates) == 20
    assert torch.allclose(candidates[0], torch.ones(32))  # alpha = 0: round-to-nearest
    for i, s in enumerate(candidates):
        raw = x_mean.pow(i / 20).clamp(min=1e-4)
        torch.testing.assert_close(s, raw / (raw.max() * raw.min()).sqrt())
        torch.testing.assert_close(s.max() * s.min(), torch.tensor(1.0))


def test_clip_search_picks_the_best_of_ten_ranges_per_row_and_group():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g)
    w[0, 3] = 12.0  # an outlier that clipping should cut
    x = torch.randn(300, 64, generator=g)
    bounds = clip_search(w, x, bits=3, group=32)
    assert bounds.shape == (6, 2)
    for r in range(6):
        for gi in range(2):
            wg, xg = w[r, 32 * gi : 32 * gi + 32], x[:, 32 * gi : 32 * gi + 32]
            top = wg.abs().max()
            errors = []
            for i in range(10):
                b = top * (1 - i / 20)
                q = weights.fake_quant(wg.clamp(-b, b)[None], 3, 0, False, integer_zero=True)[0]  # AWQ's integer zero
                errors.append(((xg @ (q - wg)) ** 2).mean())
            best = min(range(10), key=lambda i: errors[i])
            torch.testing.assert_close(bounds[r, gi], top * (1 - best / 20))
    assert bounds[0, 0] < w[0, :32].abs().max()


def attention_outputs(model, n=6):
    """Layer 0's attention module outputs on the calibration prompts."""
    attn = weights.decoder_layers(model)[0].self_attn
    outs = []
    hook = attn.register_forward_hook(lambda m, a, o: outs.append(o[0]))
    with torch.no_grad():
        for ids in calibration().calibration("chat", n):
            model(input_ids=torch.tensor([ids]))
    hook.remove()
    return outs


def outlier_model():
    """A tiny llama whose first input channel of every layer's linears is a large activation, as in LLMs."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in weights.decoder_layers(model):
            layer.input_layernorm.weight[0] = 30.0
            layer.post_attention_layernorm.weight[0] = 30.0
    return model


@pytest.mark.parametrize("clip", [False, True])
def test_salient_channels_scaled_and_error_below_rtn(clip):
    """The paper's claim on the attention output: scaling up the salient input channel before rounding
    reconstructs better than round-to-nearest on the same grid."""
    model = outlier_model()
    reference = attention_outputs(model)
    errors = {}
    for name, params in (("rtn", {}), ("awq", {"clip": clip})):
        method = build(name, {"bits": 3, "group": 32, **params})
        with method.apply(model, calibration()):
            out = attention_outputs(model)
            errors[name] = sum((a - b).square().sum().item() for a, b in zip(out, reference))
        if name == "awq":
            assert method.kept()["scaled_layers"] > 0
    assert errors["awq"] < errors["rtn"], errors


def test_search_chooses_scales_with_the_salient_channel_largest():
    model = outlier_model()
    method = build("awq", {"bits": 3, "group": 32, "clip": False})
    plan = method.search(model, calibration().calibration("chat", 6))
    q_proj = weights.linears(weights.decoder_layers(model)[0])[0]
    s = plan[q_proj][0]
    assert s[0] == s.max() and s[0] > 1


@pytest.mark.parametrize("kv_heads, o_scaled", [(2, False), (4, True)])
def test_o_proj_scaled_only_without_grouped_query_attention(kv_heads, o_scaled):
    model = tiny_model("llama", num_key_value_heads=kv_heads)
    plan = build("awq", {"bits": 3, "group": 32}).search(model, calibration().calibration("chat", 4))
    attn = weights.decoder_layers(model)[1].self_attn
    assert bool((plan[attn.o_proj][0] != 1).any()) == o_scaled
    assert plan[attn.o_proj][1] is not None  # clipped either way
    assert plan[attn.q_proj][1] is None and plan[attn.k_proj][1] is None  # the reference never clips q, k
    assert plan[attn.v_proj][1] is not None


def test_groups_follow_the_inputs_each_linear_reads():
    for family, expected in (("llama", [3, 1, 2, 1]), ("phi3", [1, 1, 1, 1])):
        model = tiny_model(family)
        layer = weights.decoder_layers(model)[0]
        inputs = {}
        hooks = [lin.register_forward_hook(lambda m, a, o, inputs=inputs: inputs.setdefault(m, []).append(a[0]))
                 for lin in weights.linears(layer)]
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3, 4, 5]]))
        for h in hooks:
            h.remove()
        groups = AWQ.groups(layer, weights.linears(layer), inputs)
        assert [len(g) for g, _, _ in groups] == expected
        assert [opens for _, _, opens in groups] == [True, False, True, False]


def test_weights_restored_and_16_bits_unchanged(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with build("awq", {"bits": 4, "group": 32}).apply(tiny, calibration()):
        assert any(not torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    with build("awq", {"bits": 16}).apply(tiny, calibration()):
        assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


@pytest.mark.parametrize("params, message", [({"bits": 5}, "bits"), ({"group": -1}, "group"),
                                             ({"samples": 0}, "samples")])
def test_bad_params_are_clear_errors(params, message):
    with pytest.raises(ValueError, match=message):
        build("awq", params)


@pytest.mark.parametrize("name, params", [("awq", {}), ("sparsegpt", {"sparsity": 0.5})])
def test_calibration_dataset_must_exist(name, params):
    assert_needs_calibration(name, params)
