"""gear: the reconstruction against a direct, step-by-step implementation of the paper's D + S + L, what
each decode query reads under both schedules, the error reduction the paper promises, and parallel ==
stepwise on tiny models."""

import pytest
import torch
from helpers import TINY, force, random_ids, tiny_model

from fidbench.attention import AttentionCall, Phase
from fidbench.methods import _weights as weights
from fidbench.methods import build
from fidbench.methods.gear import gear_compress


def direct_quantized(vec: list[float], bits: int, group: int) -> list[float]:
    """Uniform min-max quantization of consecutive groups, one value at a time."""
    out = []
    for g0 in range(0, len(vec), group):
        part = vec[g0 : g0 + group]
        lo, hi = min(part), max(part)
        step = (hi - lo) / (2**bits - 1)
        out += [lo + round((v - lo) / step) * step if step > 0 else lo for v in part]
    return out


def direct_outliers_and_quantized(vec: list[float], k: int, bits: int, group: int) -> list[float]:
    """S + D of one vector: its k largest and k smallest values exact, the rest quantized after the
    outliers took the vector's mean."""
    order = sorted(range(len(vec)), key=lambda i: vec[i])
    outliers = set(order[:k]) | set(order[len(vec) - k :]) if k else set()
    mean = sum(vec) / len(vec)
    quantized = direct_quantized([mean if i in outliers else v for i, v in enumerate(vec)], bits, group)
    return [vec[i] if i in outliers else quantized[i] for i in range(len(vec))]


def direct_gear(x: torch.Tensor, kind: str, bits: int, group: int, left: float, rank: int, loop: int, seed: int):
    b, h, n, d = x.shape
    x = x.double()
    k = int(h * d * left / 2)
    ds = torch.zeros_like(x)
    if kind == "key":  # every channel of every head, over the tokens
        for bi in range(b):
            for hi in range(h):
                for c in range(d):
                    vec = x[bi, hi, :, c].tolist()
                    ds[bi, hi, :, c] = torch.tensor(direct_outliers_and_quantized(vec, k, bits, group))
    else:  # every token, over the channels of all heads
        for bi in range(b):
            for t in range(n):
                vec = x[bi, :, t, :].reshape(-1).tolist()
                ds[bi, :, t, :] = torch.tensor(direct_outliers_and_quantized(vec, k, bits, group)).reshape(h, d)
    # L: for each (batch, head), power iterations on R = X - D - S from the documented start: uniform
    # (head dim × rank) matrices from a generator seeded with `seed`, one per (batch, head).
    start = torch.rand(b, h, d, rank, generator=torch.Generator().manual_seed(seed)).double()
    out = ds.clone()
    for bi in range(b):
        for hi in range(h):
            r, p = x[bi, hi] - ds[bi, hi], start[bi, hi]
            for i in range(loop):
                if i == loop - 1:
                    p = torch.linalg.qr(p).Q
                q = r @ p
                if i == loop - 1:
                    q = torch.linalg.qr(q).Q
                p = r.T @ q
            out[bi, hi] += q @ p.T
    return out


def heavy_tailed(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x + (torch.rand(*shape, generator=g) < 0.02) * torch.randn(*shape, generator=g) * 8  # sparse outliers


@pytest.mark.parametrize("kind", ["key", "value"])
@pytest.mark.parametrize("bits, group, left, rank",
                         [(2, 64, 0.02, 2), (2, 8, 0.1, 4), (4, 16, 0.05, 1), (3, 5, 0.0, 0)])
def test_reconstruction_equals_direct_implementation(kind, bits, group, left, rank):
    x = heavy_tailed((2, 3, 70, 64), seed=bits + group)
    got = gear_compress(x, kind, bits, group, left, rank, loop=3, seed=5)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.double(), direct_gear(x, kind, bits, group, left, rank, 3, 5), atol=2e-5, rtol=0)


def test_outliers_exact_and_every_component_reduces_the_error():
    """The paper's claim on a heavy-tailed K and V: quantization alone < + outliers < + low rank."""
    for kind in ("key", "value"):
        x = heavy_tailed((1, 2, 128, 64), seed=11)
        quant = gear_compress(x, kind, 2, 64, 0.0, 0, 3, 0)
        sparse = gear_compress(x, kind, 2, 64, 0.04, 0, 3, 0)
        full = gear_compress(x, kind, 2, 64, 0.04, 4, 3, 0)
        errors = [(x - y).norm().item() for y in (quant, sparse, full)]
        assert errors[0] > errors[1] > errors[2], (kind, errors)
        exact = sparse == x  # the k largest and smallest of each vector, k = int(2·64·0.04/2) = 2
        per_vector = exact.sum(-2) if kind == "key" else exact.transpose(1, 2).flatten(2).sum(-1)
        assert (per_vector >= 4).all()


class Recorded(AttentionCall):
    """An attention call that keeps the keys, values and mask the method hands to dense."""

    def dense(self, mask=None, query=None, key=None, value=None):
        self.seen = (mask, key, value)
        return super().dense(mask=mask, query=query, key=key, value=value)


def call(n_q, n_k, prompt, seed=3):
    attn = weights.decoder_layers(tiny_model("llama"))[0].self_attn
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, TINY["num_attention_heads"], n_q, 16, generator=g)
    k, v = (torch.randn(1, TINY["num_key_value_heads"], n_k, 16, generator=g) for _ in range(2))
    return Recorded(attn, q, k, v, None, Phase("decode", prompt, n_k - n_q), {"scaling": 0.25}), k, v


PARAMS = {"group_size": 4, "left": 0.25, "prefillrank": 3, "prefillrankv": 2, "rank": 1, "rankv": 2, "streaming_gap": 8}


def copies_read(seen, n_k, row):
    """For one query row: position -> (copy index, key, value) it reads; each position at most once."""
    mask, keys, values = seen
    copies = mask.shape[-1] // n_k
    read = {}
    for c in range(copies):
        for j in mask[0, 0, row, c * n_k : (c + 1) * n_k].nonzero().flatten().tolist():
            assert j not in read
            read[j] = (c, keys[0, :, c * n_k + j], values[0, :, c * n_k + j])
    return read


@pytest.mark.parametrize("n_q", [1, 30])
def test_paper_schedule_reads_compressed_prompt_and_full_blocks(n_q):
    p, n_k, gap = 21, 60, 8
    c, k, v = call(n_q, n_k, p)
    method = build("gear", {**PARAMS, "schedule": "paper"})
    method.attend(c)
    assert method.kept()["blocks_compressed"] == 4  # blocks from 21, 29, 37, 45 end before the last query, 59
    args = (2, 4, 0.25)
    prompt = (gear_compress(k[:, :, :p], "key", *args, 3, 3, 0), gear_compress(v[:, :, :p], "value", *args, 2, 3, 0))
    for row, t in enumerate(range(n_k - n_q, n_k)):
        read = copies_read(c.seen, n_k, row)
        assert sorted(read) == list(range(t + 1))
        for j, (_, key, value) in read.items():
            if j < p:
                expected = prompt[0][0, :, j], prompt[1][0, :, j]
            elif j < p + (t - p) // gap * gap:  # a full block of generated tokens before the query
                s = p + (j - p) // gap * gap
                expected = (gear_compress(k[:, :, s : s + gap], "key", *args, 1, 3, 0)[0, :, j - s],
                            gear_compress(v[:, :, s : s + gap], "value", *args, 2, 3, 0)[0, :, j - s])
            else:  # the buffer, the query's own token included
                expected = k[0, :, j], v[0, :, j]
            assert torch.equal(key, expected[0]) and torch.equal(value, expected[1]), (t, j)


@pytest.mark.parametrize("n_q", [1, 30])
def test_reference_schedule_recompresses_the_whole_cache_at_multiples_of_the_gap(n_q):
    p, n_k, gap = 21, 60, 8
    c, k, v = call(n_q, n_k, p)
    method = build("gear", {**PARAMS, "schedule": "reference"})
    method.attend(c)
    assert method.kept()["blocks_compressed"] == 5  # cache lengths 24, 32, 40, 48, 56
    args = (2, 4, 0.25)
    states, previous = {}, None  # cache length m -> what the cache holds for positions < m after step m
    for m in (24, 32, 40, 48, 56):
        keys = k[:, :, :m] if previous is None else torch.cat([states[previous][0], k[:, :, previous:m]], dim=2)
        values = v[:, :, :m] if previous is None else torch.cat([states[previous][1], v[:, :, previous:m]], dim=2)
        states[m] = (gear_compress(keys, "key", *args, 1, 3, 0), gear_compress(values, "value", *args, 2, 3, 0))
        previous = m
    for row, t in enumerate(range(n_k - n_q, n_k)):
        read = copies_read(c.seen, n_k, row)
        assert sorted(read) == list(range(t + 1))
        m = t // gap * gap
        for j, (_, key, value) in read.items():
            if m >= 24 and j < m:
                expected = states[m][0][0, :, j], states[m][1][0, :, j]
            else:  # before the first multiple of the gap after the prompt, or since the last one
                expected = k[0, :, j], v[0, :, j]
            assert torch.equal(key, expected[0]) and torch.equal(value, expected[1]), (t, j)


def test_prefill_and_16_bits_stay_dense():
    c, _, _ = call(5, 30, 25)
    method = build("gear", PARAMS)
    prefill = AttentionCall(c.module, c.query, c.key, c.value, None, Phase("prefill", 30, 0))
    assert method.attend(prefill) is None
    assert build("gear", {"quantize_bit": 16}).attend(c) is None


@pytest.mark.parametrize("schedule", ["paper", "reference"])
def test_parallel_equals_stepwise(tiny, schedule):
    method = build("gear", {**PARAMS, "schedule": schedule})
    assert method.parallel_exact
    p_ids, g_ids = random_ids(37), random_ids(30, seed=4)
    parallel = force(tiny, method, p_ids, g_ids, "parallel")
    stepwise = force(tiny, build("gear", {**PARAMS, "schedule": schedule}), p_ids, g_ids, "stepwise")
    torch.testing.assert_close(parallel, stepwise, atol=1e-5, rtol=0)
    assert (parallel - force(tiny, build("origin", {}), p_ids, g_ids)).abs().max() > 1e-3
    assert 0 < method.kept()["kv_quantized"] < 1
    # Queries at 37..65 (gap 8): paper blocks from 37, 45, 53; reference cache lengths 40, 48, 56, 64.
    assert method.kept()["blocks_compressed"] == {"paper": 3, "reference": 4}[schedule]


def test_default_config_is_the_original():
    method = build("gear", {})
    assert (method.quantize_bit, method.group_size, method.left) == (2, 64, 0.02)
    assert (method.loop, method.streaming_gap) == (3, 64)
    assert (method.prefillrank, method.prefillrankv, method.rank, method.rankv) == (4, 4, 2, 2)
    assert method.schedule == "reference"  # GEAR's run_template_*.sh: --streaming without --stream_grouping


@pytest.mark.parametrize("params, message", [
    ({"quantize_bit": 5}, "quantize_bit"), ({"group_size": 0}, "group_size"), ({"left": 1.0}, "left"),
    ({"rankv": -1}, "rankv"), ({"loop": 0}, "loop"), ({"streaming_gap": 0}, "streaming_gap"),
    ({"schedule": "grouped"}, "schedule"),
])
def test_bad_params_are_clear_errors(params, message):
    with pytest.raises(ValueError, match=message):
        build("gear", params)


def test_fake_quant_is_the_grid_used():
    """The D part of a vector without outliers is fidbench's shared grid."""
    x = torch.randn(1, 2, 16, 8)
    flat = x.transpose(1, 2).reshape(1, 16, 16)
    expected = weights.fake_quant(flat, 2, 4, False).reshape(1, 16, 2, 8).transpose(1, 2)
    assert torch.equal(gear_compress(x, "value", 2, 4, 0.0, 0, 3, 0), expected)
