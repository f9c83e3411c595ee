"""fp8-attention and sage-attention: rounding on the right grid, explicit math equal to dense attention
when quantization is taken out, and small but real changes to a model's logits."""

import pytest
import torch
from helpers import FAMILIES, decode_calls, force, tiny_model
from helpers import reference as base_reference

from fidbench import attention, engine
from fidbench.methods import build
from fidbench.methods import fp8_attention as fp8
from fidbench.methods import sage_attention as sage
from fidbench.methods.fp8_attention import E4M3_MAX, fp8_e4m3, fp8_round


def e4m3_grid() -> torch.Tensor:
    """Every finite float8 e4m3fn value, built from the bit patterns."""
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return values[values.isfinite()].unique()


def reference(n: int = 24, seed: int = 2) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def logits(model, method, p_ids, g_ids):
    with method.apply(model) as m:
        return engine.teacher_force(m, method, p_ids, g_ids, engine.resolve_mode(method, "auto")).logits


def test_fp8_rounds_to_nearest_e4m3_value_with_absmax_per_head():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 8, generator=g) * torch.logspace(-3, 2, 3)[None, :, None, None]
    codes, scale = fp8_e4m3(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (2, 3, 1, 1)
    # Each head's largest magnitude maps to e4m3's largest value.
    assert torch.equal(codes.float().abs().amax(dim=(-2, -1)), torch.full((2, 3), E4M3_MAX))
    grid = e4m3_grid()
    target = (x / scale).reshape(-1, 1)
    nearest = (target - grid).abs().min(dim=1).values
    assert torch.all((target[:, 0] - codes.float().reshape(-1)).abs() <= nearest + 1e-6)
    assert torch.equal(fp8_round(x), (codes.float() * scale).to(x.dtype))
    assert not torch.equal(fp8_round(x), x)


def test_fp8_attention_feeds_dense_attention_values_on_the_e4m3_grid(tiny, prompt, monkeypatch):
    seen = []
    dense = attention.AttentionCall.dense

    def spy(call, mask=None, query=None, key=None, value=None):
        seen.append((query, key, value))
        return dense(call, mask, query, key, value)

    monkeypatch.setattr(attention.AttentionCall, "dense", spy)
    method = build("fp8-attention", {"p_fp8": False})  # the dense path
    with method.apply(tiny) as m:
        engine.teacher_force(m, method, prompt, reference(4), "stepwise")
    assert len(seen) == 2 * 4  # two layers, one prefill and three decode steps
    for query, key, value in seen:
        groups = query.shape[1] // key.shape[1]
        for t, g in ((query, groups), (key, 1), (value, 1)):
            # One scale per (batch, KV head), as FA3's descales: Q's is shared by the query heads of a group.
            scale = t.abs().unflatten(1, (-1, g)).amax(dim=(-3, -2, -1), keepdim=True) / E4M3_MAX
            scaled = t.unflatten(1, (-1, g)) / scale
            assert torch.allclose(scaled.to(torch.float8_e4m3fn).float(), scaled, rtol=1e-6, atol=0)
            assert torch.allclose(scaled.abs().amax(dim=(-3, -2, -1)), torch.tensor(E4M3_MAX))


def test_fp8_query_scale_is_shared_by_a_kv_heads_group():
    x = torch.randn(1, 4, 10, 8, generator=torch.Generator().manual_seed(0))
    x = x * torch.tensor([1.0, 3.0, 0.5, 0.2])[None, :, None, None]
    codes, scale = fp8_e4m3(x, groups=2)
    assert scale.shape == (1, 4, 1, 1)
    assert scale[0, 0] == scale[0, 1] == x[0, :2].abs().max() / E4M3_MAX
    assert scale[0, 2] == scale[0, 3] == x[0, 2:].abs().max() / E4M3_MAX
    assert codes[0, 0].float().abs().max() < E4M3_MAX  # head 0 does not use the whole range: head 1 sets it


def _fa3_reference(q, k, v, scaling, tile):
    """FA3's fp8 softmax, one query row and one head at a time, written as its loop over key tiles
    (last tile first, running max, rescaled accumulator and row sum; P x 2^8 rounded to e4m3)."""
    out = torch.zeros_like(q)
    log2e = torch.log2(torch.tensor(torch.e)).item()
    for h in range(q.shape[0]):
        for i in range(q.shape[1]):
            s = (k[h] @ q[h, i]) * scaling * log2e  # (kv,)
            m, total, acc = -float("inf"), 0.0, torch.zeros(q.shape[-1])
            for start in reversed(range(0, len(s), tile)):
                block = s[start : start + tile]
                new = max(m, block.max().item())
                total, acc = total * 2 ** (m - new), acc * 2 ** (m - new)
                p = torch.exp2(block - (new - 8))
                total += p.sum().item()
                acc += p.to(torch.float8_e4m3fn).float() @ v[h, start : start + tile]
                m = new
            out[h, i] = acc / total
    return out


def test_p_fp8_follows_fa3s_tiled_loop():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 3, 8, generator=g) * 3
    k, v = torch.randn(1, 2, 50, 8, generator=g), torch.randn(1, 2, 50, 8, generator=g)
    visible = torch.ones(1, 1, 3, 50, dtype=torch.bool)
    out = fp8.attention_p_fp8(q, k, v, visible, 0.35, tile=16)  # 4 tiles, the last one partial
    torch.testing.assert_close(out[0], _fa3_reference(q[0], k[0], v[0], 0.35, 16), rtol=1e-5, atol=1e-6)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.35)
    assert not torch.allclose(out, dense, atol=1e-4)  # e4m3 P moves the output
    torch.testing.assert_close(out, dense, rtol=0, atol=0.1)


def test_p_fp8_without_rounding_is_dense_attention():
    """With P's e4m3 conversion taken out, the tiled running-max softmax is plain attention, masks included."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 7, 8, generator=g)
    k, v = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    visible = (torch.arange(40)[None, :] <= torch.arange(33, 40)[:, None])[None, None]
    visible = visible & (torch.rand(1, 4, 7, 40, generator=g) < 0.8)
    visible[..., 0] = True
    out = fp8.attention_p_fp8(q, k, v, visible, 0.3, tile=16, p_dtype=torch.float32)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=visible, scale=0.3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_p_fp8_changes_logits_more_than_qkv_rounding_alone(tiny, prompt):
    g_ids = reference()
    base = logits(tiny, build("origin", {}), prompt, g_ids)
    qkv = logits(tiny, build("fp8-attention", {"p_fp8": False}), prompt, g_ids)
    p = logits(tiny, build("fp8-attention", {}), prompt, g_ids)  # p_fp8 by default, as FA3's fp8 kernel
    assert (p - base).norm() > (qkv - base).norm() > 0
    assert ((p - base).norm() / base.norm()).item() < 0.1
    assert build("fp8-attention", {"p_fp8": True}).kept()["p_format"].startswith("float8_e4m3fn")


@pytest.mark.parametrize("name", ["fp8-attention", "sage-attention"])
def test_low_bit_attention_changes_logits_but_stays_close(tiny, prompt, name):
    method = build(name, {})
    assert engine.resolve_mode(method, "auto") == "parallel"
    g_ids = reference()
    base = logits(tiny, build("origin", {}), prompt, g_ids)
    out = logits(tiny, method, prompt, g_ids)
    assert not torch.equal(out, base)
    assert ((out - base).norm() / base.norm()).item() < 0.05
    assert (out.argmax(-1) == base.argmax(-1)).double().mean().item() >= 0.9


def _causal_rows(q_len, kv_len):
    def rows(start, stop):
        pos = torch.arange(start, stop)[:, None] + (kv_len - q_len)
        return (torch.arange(kv_len)[None] <= pos)[None, None]
    return rows


@pytest.mark.parametrize("q_len,kv_len", [(37, 37), (5, 41), (1, 30)])
@pytest.mark.parametrize("smooth_k", [True, False])
def test_sage_math_without_quantization_equals_dense_attention(q_len, kv_len, smooth_k):
    g = torch.Generator().manual_seed(q_len + kv_len)
    q = torch.randn(1, 4, q_len, 16, generator=g)
    k = torch.randn(1, 2, kv_len, 16, generator=g) + 3.0  # an offset that smoothing removes
    v = torch.randn(1, 2, kv_len, 16, generator=g)
    rows = _causal_rows(q_len, kv_len)
    mask = rows(0, q_len)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.3)
    for block_q in (4, 128):  # chunking the queries changes nothing without quantization
        out = sage.sage_attention(q, k, v, rows, 0.3, block_q=block_q, bits=None, smooth_k=smooth_k,
                                  pv_dtype=torch.float32)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_sage_math_honours_a_per_head_mask():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(shape, generator=g) for shape in ((1, 4, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8)))
    mask = torch.rand(1, 4, 9, 9, generator=g) < 0.5
    mask[..., 0] = True  # every query sees at least one key
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    out = sage.sage_attention(q, k, v, lambda a, b: mask[..., a:b, :], 8 ** -0.5, block_q=4, bits=None,
                              pv_dtype=torch.float32, causal=False)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_len,kv_len,block_q", [(300, 300, 128), (37, 37, 16), (5, 41, 4), (1, 30, 128)])
def test_sage_skipping_keys_no_row_sees_is_bitwise_the_full_computation(q_len, kv_len, block_q, monkeypatch):
    """Each query chunk scores only the keys up to the last one it may see (causal: the upper triangle is
    skipped); the output must be bitwise what scoring every key gives, with a causal and a per-head mask."""
    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(1, 9, q_len, 64, generator=g)
    k, v = torch.randn(1, 3, kv_len, 64, generator=g), torch.randn(1, 3, kv_len, 64, generator=g)
    per_head = _causal_rows(q_len, kv_len)(0, q_len) & (torch.rand(1, 9, q_len, kv_len, generator=g) < 0.7)
    per_head[..., 0] = True
    for rows in (_causal_rows(q_len, kv_len), lambda a, b: per_head[..., a:b, :]):
        skipped = sage.sage_attention(q, k, v, rows, 0.125, block_q=block_q)
        with monkeypatch.context() as m:
            m.setattr(sage, "needed_keys", lambda q_len, kv_len, stop: kv_len)  # every key, as before the skip
            full = sage.sage_attention(q, k, v, rows, 0.125, block_q=block_q)
        assert torch.equal(skipped, full)
    # The shape rule is the last key the chunk's rows see under the causal mask.
    first = _causal_rows(q_len, kv_len)(0, min(block_q, q_len))
    assert sage.needed_keys(q_len, kv_len, min(block_q, q_len)) == int(first.flatten(0, -2).any(0).nonzero().max()) + 1


def test_sage_int8_blocks():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 150, 16, generator=g)
    x[:, :, 70] *= 50  # an outlier token in the second block of 64
    ints, scale = sage.quantize_blocks(x, 64, 8)
    assert ints.shape == x.shape and scale.shape == (1, 2, 150, 1)
    assert torch.equal(ints, ints.round()) and ints.abs().max() == 127
    for start in (0, 64, 128):
        block = slice(start, start + 64)
        assert torch.all(scale[:, :, block] == x[:, :, block].abs().amax(dim=(-2, -1), keepdim=True) / 127)
        assert ints[:, :, block].abs().amax() == 127
    assert torch.all((ints * scale - x).abs() <= scale / 2 + 1e-6)
    assert scale[0, 0, 0] < scale[0, 0, 64] / 10  # the outlier only coarsens its own block


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_sage_without_quantization_equals_origin_through_the_model(family, prompt, monkeypatch):
    """The method's wiring (layout, scaling, GQA, the model's own sliding-window mask) is dense attention
    once quantization is the identity; only fp16 P·V remains. Larger weights make attention peaked, so
    quantization error (and a mask ignored: logits off by ~3) stands out from fp16 rounding."""
    window = {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0} if family == "qwen2" else {}
    model = tiny_model(family, initializer_range=0.1, **window)
    g_ids = reference()
    base = logits(model, build("origin", {}), prompt, g_ids)
    quantized = logits(model, build("sage-attention", {"block_q": 16, "block_k": 16}), prompt, g_ids)
    monkeypatch.setattr(sage, "quantize_blocks", lambda x, block, bits: (x, torch.ones_like(x[..., :1])))
    monkeypatch.setattr(sage, "quantize_seen_blocks", lambda x, seen, block, bits: (x, torch.ones_like(x[..., :1])))
    plain = logits(model, build("sage-attention", {"block_q": 16, "block_k": 16}), prompt, g_ids)
    torch.testing.assert_close(plain, base, rtol=0, atol=5e-3)
    assert (quantized - base).abs().max() > 5 * (plain - base).abs().max()
    monkeypatch.undo()
    monkeypatch.setattr(sage, "needed_keys", lambda q_len, kv_len, stop: kv_len)  # score every key: bitwise the same
    assert torch.equal(logits(model, build("sage-attention", {"block_q": 16, "block_k": 16}), prompt, g_ids), quantized)


def test_sage_parameters_are_checked():
    for params in ({"block_q": 0}, {"block_k": 0}, {"bits": 1}, {"bits": 9}):
        with pytest.raises(ValueError, match="sage-attention: " + next(iter(params))):
            build("sage-attention", params)


LOW_BIT = [("fp8-attention", {"p_fp8": False}), ("fp8-attention", {}), ("sage-attention", {}),
           ("sage-attention", {"pv": "fp8", "block_k": 8}),
           ("sage-attention", {"bits": 3, "block_k": 8}), ("sage-attention", {"smooth_k": False}),
           ("sparge-attention", {"block_q": 8, "block_k": 8, "simthreshd1": -1.0, "cdfthreshd": 0.5}),
           ("sparge-attention", {"block_q": 8, "block_k": 8, "simthreshd1": -1.0, "cdfthreshd": 0.5, "pv": "fp16"})]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name,params", LOW_BIT, ids=[f"{n}-{p}" for n, p in LOW_BIT])
def test_one_forward_equals_token_by_token_decode(family, name, params, monkeypatch):
    """Each decode row of one teacher-forced forward is what its own decode step computes: every layer's
    call, row by row, equals a one-query call over the keys that row sees (the step's cache; on sliding
    layers its window), given the same inputs. Through the whole model the two modes then agree in
    argmax; their logits differ by more than fp32 round-off only where the model's own linear layers,
    which sum in another order over 24 tokens than over one, move an input across one of the method's
    rounding steps (int8 Q, e4m3, the fp16 P·V): measured up to 4e-4 on these models."""
    model = tiny_model(family)
    prompt = torch.randint(0, 283, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = base_reference(model, prompt)  # 24 tokens after 40: past the tiny sliding window
    method = build(name, params)
    assert method.parallel_exact and engine.resolve_mode(method, "auto") == "parallel"
    parallel, calls, _ = decode_calls(monkeypatch, method,
                                      lambda: force(model, method, ref.p_ids, ref.g_ids, "parallel"))
    assert len(calls) == model.config.num_hidden_layers
    for call, out in calls:
        visible = call.visible()
        for row in range(call.query.shape[2]):
            keys = visible[0, 0, row].nonzero().flatten()
            first, last = int(keys[0]), int(keys[-1]) + 1
            assert torch.equal(keys, torch.arange(first, last))  # each row sees a contiguous run of keys
            step = attention.AttentionCall(call.module, call.query[:, :, row : row + 1], call.key[:, :, first:last],
                                           call.value[:, :, first:last], None, call.phase, call.kwargs)
            torch.testing.assert_close(out[:, row : row + 1], method.attend(step), atol=1e-6, rtol=0)
    stepwise = force(model, build(name, params), ref.p_ids, ref.g_ids, "stepwise")
    assert torch.equal(parallel.argmax(-1), stepwise.argmax(-1))
    torch.testing.assert_close(parallel, stepwise, atol=1e-3, rtol=0)


def test_decode_rows_use_the_scales_of_the_keys_they_see():
    """fp8: a row's K scale is the absmax of the keys it sees, so a large later key does not coarsen it."""
    key = torch.ones(1, 1, 4, 2)
    key[0, 0, 3] = 100.0
    seen = torch.tensor([[True, True, True, False], [True, True, True, True]])[None, None]
    rounded = fp8.fp8_round_seen(key, seen)
    assert rounded.shape == (1, 1, 2, 4, 2)
    assert torch.equal(rounded[0, 0, 0, :3], key[0, 0, :3])  # 1 is the row's absmax: exact on e4m3's grid
    expected = fp8_round(key)  # the whole call's scale: the second row sees every key
    assert torch.equal(rounded[0, 0, 1], expected[0, 0])


@pytest.mark.parametrize("v_fp8_max", [None, 448.0, 2.25])
def test_sage_decode_row_is_a_one_query_call_over_the_keys_it_sees(v_fp8_max):
    """sage: a decode row equals sage_attention called with that one query over exactly its visible keys
    (a window in the middle of the call: blocks start at its first key, the mean is over it)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g) + 2,
               torch.randn(1, 2, 30, 16, generator=g))
    windows = [(5, 20), (6, 21), (0, 30)]
    visible = torch.zeros(1, 1, 3, 30, dtype=torch.bool)
    for row, (a, b) in enumerate(windows):
        visible[0, 0, row, a:b] = True
    rows = sage.sage_decode(q, k, v, visible, 0.25, block_k=8, v_fp8_max=v_fp8_max)
    for row, (a, b) in enumerate(windows):
        alone = sage.sage_decode(q[:, :, row : row + 1], k[:, :, a:b], v[:, :, a:b],
                                 torch.ones(1, 1, 1, b - a, dtype=torch.bool), 0.25, block_k=8, v_fp8_max=v_fp8_max)
        call = sage.sage_attention(q[:, :, row : row + 1], k[:, :, a:b], v[:, :, a:b],
                                   lambda s, t, a=a, b=b: torch.ones(1, 1, t - s, b - a, dtype=torch.bool), 0.25,
                                   block_k=8, v_fp8_max=v_fp8_max)
        torch.testing.assert_close(rows[:, :, row : row + 1], alone, atol=1e-6, rtol=0)
        torch.testing.assert_close(alone, call, atol=2e-3, rtol=0)  # float64 vs float32 K mean only
