"""sparge-attention: the block map against a direct implementation of SpargeAttn's prediction, the kept
blocks computed by sage-attention's own math, an element-wise causal mask, and sage-attention itself
when no block counts as self-similar."""

import math

import pytest
import torch
from helpers import force, random_ids, tiny_model

from fidbench.attention import AttentionCall, Phase
from fidbench.methods import _weights as weights
from fidbench.methods import build
from fidbench.methods import sparge_attention as sparge
from fidbench.methods.sage_attention import sage_attention


def mean_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity over all ordered pairs of rows of x (n, d), each row with itself included."""
    n = x.shape[0]
    cos = torch.nn.functional.cosine_similarity
    return sum(cos(x[a], x[b], dim=0).item() for a in range(n) for b in range(n)) / n**2


def direct_block_map(q, k, block_q, block_k, sim, cdf, scaling):
    """Kept (query head, query block, key block) of a causal prefill, one block pair at a time, as the paper
    describes: smoothed keys, mean-pooled blocks, self-similarity, softmax over the visible self-similar
    key blocks, the top ones within the cumulative threshold; then the block of its own position for
    a query that would see no key."""
    h, n, _ = q.shape
    groups = h // k.shape[0]
    k = k - k.mean(dim=1, keepdim=True)
    nq, nk = math.ceil(n / block_q), math.ceil(n / block_k)
    keep = torch.zeros(h, nq, nk, dtype=torch.bool)
    allowed = torch.zeros(nq, nk, dtype=torch.bool)
    for head in range(h):
        kh = k[head // groups]
        for i in range(nq):
            rows = range(i * block_q, min((i + 1) * block_q, n))
            qb = q[head, rows.start : rows.stop]
            q_sim = mean_cosine(qb) > sim
            shares = {}
            for j in range(nk):
                kb = kh[j * block_k : (j + 1) * block_k]
                allowed[i, j] = j * block_k <= rows[-1]
                k_sim = mean_cosine(kb) > sim
                if not k_sim or not q_sim:
                    keep[head, i, j] = bool(allowed[i, j])
                elif allowed[i, j]:
                    shares[j] = (qb.mean(0) @ kb.mean(0)).item() * scaling
            if shares:
                total = sum(math.exp(s - max(shares.values())) for s in shares.values())
                cumulative = 0.0
                for rank, j in enumerate(sorted(shares, key=shares.get, reverse=True)):
                    cumulative += math.exp(shares[j] - max(shares.values())) / total
                    if rank == 0 or cumulative <= cdf:
                        keep[head, i, j] = True
            for r in rows:  # a query seeing none of the kept keys: add its own key's block
                if not any(keep[head, i, c // block_k] for c in range(r + 1)):
                    keep[head, i, r // block_k] = True
    return keep, allowed


def random_call(n=44, seed=0):
    g = torch.Generator().manual_seed(seed)
    attn = weights.decoder_layers(tiny_model("llama"))[0].self_attn
    q = torch.randn(1, 4, n, 16, generator=g)
    k = torch.randn(1, 2, n, 16, generator=g) + torch.randn(1, 2, 1, 16, generator=g)
    v = torch.randn(1, 2, n, 16, generator=g)
    q[..., : n // 2, :] += 2 * torch.randn(1, 4, 1, 16, generator=g)  # some self-similar blocks
    k[..., 8:24, :] += 3 * torch.randn(1, 2, 1, 16, generator=g)
    return AttentionCall(attn, q, k, v, None, Phase("prefill", n, 0), {"scaling": 0.25})


@pytest.mark.parametrize("block_q, block_k, sim, cdf",
                         [(8, 4, 0.3, 0.6), (16, 8, 0.1, 0.9), (8, 8, -1.0, 0.0), (4, 16, 0.5, 0.98)])
def test_block_map_and_output_equal_direct_implementation(block_q, block_k, sim, cdf):
    call = random_call()
    n = call.query.shape[2]
    method = build("sparge-attention", {"block_q": block_q, "block_k": block_k, "simthreshd1": sim, "cdfthreshd": cdf})
    got = method.attend(call)
    keep, allowed = direct_block_map(call.query[0], call.key[0], block_q, block_k, sim, cdf, 0.25)
    rows = torch.arange(n)[:, None]
    causal = rows >= torch.arange(n)[None, :]
    mask = keep[:, rows // block_q, torch.arange(n)[None, :] // block_k] & causal  # (h, n, n)
    expected = sage_attention(call.query, call.key, call.value, lambda a, b: mask[None, :, a:b], 0.25, block_q, block_k,
                              v_fp8_max=2.25)
    assert torch.equal(got, expected.transpose(1, 2))
    skipped = 1 - keep.sum().item() / (allowed.sum().item() * call.query.shape[1])
    assert method.kept()["blocks_skipped"] == pytest.approx(skipped)
    if sim < 0 and cdf == 0:
        assert skipped > 0.3  # the map really skips


def test_every_query_attends_some_key_and_none_later(monkeypatch):
    masks = []

    def spy(query, key, value, visible_rows, *args, **kwargs):
        masks.extend(visible_rows(s, min(s + args[1], query.shape[2])) for s in range(0, query.shape[2], args[1]))
        return sage_attention(query, key, value, visible_rows, *args, **kwargs)

    monkeypatch.setattr(sparge, "sage_attention", spy)
    call = random_call(n=50, seed=3)
    build("sparge-attention", {"block_q": 16, "block_k": 4, "simthreshd1": -1.0, "cdfthreshd": 0.0}).attend(call)
    mask = torch.cat(masks, dim=2)[0]  # (heads, queries, keys)
    assert mask.any(-1).all()
    assert not mask.triu(1).any()


def test_no_self_similar_block_is_sage_attention():
    model = tiny_model("qwen2")
    p_ids, g_ids = random_ids(60), random_ids(12, seed=4)
    blocks = {"block_q": 16, "block_k": 8}
    sage = force(model, build("sage-attention", blocks), p_ids, g_ids, "stepwise")  # as sparse decode runs
    method = build("sparge-attention", {**blocks, "simthreshd1": 2.0, "decode": "sparse", "pv": "fp16"})
    assert torch.equal(force(model, method, p_ids, g_ids), sage)
    assert method.kept()["blocks_skipped"] == 0


def test_decode_dense_by_default_and_sparse_on_request():
    call = random_call(n=40)
    decode = AttentionCall(call.module, call.query[:, :, -1:], call.key, call.value, None, Phase("decode", 39, 39),
                           call.kwargs)
    sage = build("sage-attention", {"block_q": 8, "block_k": 8}).attend(decode)
    params = {"block_q": 8, "block_k": 8, "simthreshd1": -1.0, "cdfthreshd": 0.0, "pv": "fp16"}
    dense = build("sparge-attention", params)
    assert torch.equal(dense.attend(decode), sage) and dense.kept()["blocks_skipped"] is None
    sparse = build("sparge-attention", {**params, "decode": "sparse"})
    assert not torch.equal(sparse.attend(decode), sage)
    assert sparse.kept()["blocks_skipped"] == pytest.approx(4 / 5)  # one of the five key blocks kept


def test_defaults_are_the_original_call():
    method = build("sparge-attention", {})
    assert (method.block_q, method.block_k, method.simthreshd1, method.cdfthreshd) == (128, 64, 0.6, 0.98)
    assert method.decode == "dense" and method.parallel_exact  # dense decode is sage-attention's, row by row
    assert not build("sparge-attention", {"decode": "sparse"}).parallel_exact
    assert method.pv == "fp8" and method.fp8_max == 2.25  # core.py's sm89/sm90 path: scale_fuse_quant_cuda(.., 2.25)
    assert build("sage-attention", {}).fp8_max is None  # SageAttention (1): fp16 P·V


def _sage2_pv_reference(s, v, tile, v_max):
    """SageAttention2's P·V for one head, as its kernel loops: log2-domain scores s (q, kv) (-inf: not seen), V (kv, d)
    quantized to e4m3 per channel (absmax / v_max), key tiles in order, P = 2^(s - m + 8.807) against the running
    max m rounded to e4m3, the accumulator and the unrounded row sum rescaled when m grows."""
    v_scale = v.abs().amax(0) / v_max
    v8 = (v / v_scale).to(torch.float8_e4m3fn).float() * v_scale
    out = torch.zeros(s.shape[0], v.shape[1])
    for i in range(s.shape[0]):
        m, total, acc = -math.inf, 0.0, torch.zeros(v.shape[1])
        for start in range(0, s.shape[1], tile):
            block = s[i, start : start + tile]
            new = max(m, block.max().item())
            if new == -math.inf:
                continue
            total, acc = total * 2 ** (m - new), acc * 2 ** (m - new)
            p = torch.exp2(block - (new - 8.807))
            total += p.sum().item()
            acc += p.to(torch.float8_e4m3fn).float() @ v8[start : start + tile]
            m = new
        out[i] = acc / total
    return out


def test_fp8_pv_follows_sageattention2s_loop():
    call = random_call(n=40, seed=5)
    q, k, v = call.query, call.key, call.value
    mask = torch.ones(40, 40, dtype=torch.bool).tril()[None, None]
    got = sage_attention(q, k, v, lambda a, b: mask[..., a:b, :], 0.25, 16, 8, bits=None, smooth_k=False,
                         v_fp8_max=2.25)
    s = (q[0] @ k[0].repeat_interleave(2, 0).transpose(-1, -2)) * 0.25 * math.log2(math.e)
    s = s.masked_fill(~mask[0], -math.inf)
    for head in range(4):
        expected = _sage2_pv_reference(s[head], v[0, head // 2], 8, 2.25)
        torch.testing.assert_close(got[0, head].float(), expected, rtol=2e-3, atol=2e-3)  # fp16 output
    fp16 = sage_attention(q, k, v, lambda a, b: mask[..., a:b, :], 0.25, 16, 8, bits=None, smooth_k=False)
    assert not torch.equal(got, fp16)
    torch.testing.assert_close(got, fp16, rtol=0, atol=0.15)


@pytest.mark.parametrize("params, message", [({"cdfthreshd": 1.5}, "cdfthreshd"), ({"block_k": 0}, "block_k"),
                                             ({"decode": "never"}, "decode"), ({"bits": 9}, "bits")])
def test_bad_params_are_clear_errors(params, message):
    with pytest.raises(ValueError, match=message):
        build("sparge-attention", params)
