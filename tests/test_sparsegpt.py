"""sparsegpt: the column loop against a direct implementation of the paper's OBS updates, exact sparsity and
N:M patterns, lower layer error than magnitude and Wanda at equal sparsity; and the Hessian machinery it
shares with gptq."""

import pytest
import torch
from helpers import calibration, layer0_inputs, tiny_model

from fidbench.methods import _weights as weights
from fidbench.methods import build
from fidbench.methods.gptq import gptq
from fidbench.methods.sparsegpt import sparsegpt


def random_problem(rows=12, cols=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, cols, generator=g) * torch.linspace(0.2, 3, cols)  # inputs of unequal scale
    return torch.randn(rows, cols, generator=g), 2 * x.T @ x / x.shape[0]


def direct_sparsegpt(w, h, damp, sparsity, nm, blocksize):
    """The paper's algorithm with explicit inverses: at column i, H_F⁻¹ is the inverse Hessian of the columns
    not yet visited (F = i..n); a pruned weight w_i moves the later weights of its row by
    -w_i / [H_F⁻¹]_ii · [H_F⁻¹]_i,F; the mask scores w² / [H_F⁻¹]_ii (per block, or per M columns for N:M)."""
    w, h = w.double().clone(), h.double()
    n = w.shape[1]
    h = h + damp * h.diagonal().mean() * torch.eye(n, dtype=h.dtype)
    inverse = [torch.linalg.inv(h[i:, i:]) for i in range(n)]  # inverse[i] = H_F⁻¹ for F = i..n-1
    diag = torch.tensor([inv[0, 0] for inv in inverse], dtype=w.dtype)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i in range(n):
        if i % blocksize == 0 and nm is None:  # adaptive mask selection: once per block, from current weights
            b = slice(i, min(i + blocksize, n))
            score = w[:, b].square() / diag[b]
            block = torch.ones(score.numel(), dtype=torch.bool)
            block[score.flatten().argsort()[: round(sparsity * score.numel())]] = False
            keep[:, b] = block.reshape(score.shape)
        if nm is not None and i % nm[1] == 0:
            score = w[:, i : i + nm[1]].square() / diag[i : i + nm[1]]
            drop = score.argsort(dim=1)[:, : nm[1] - nm[0]]
            keep[:, i : i + nm[1]] = True
            keep[:, i : i + nm[1]].scatter_(1, drop, False)
        err = torch.where(keep[:, i], 0.0, w[:, i])  # what pruning removes from column i
        w[:, i:] -= err[:, None] * inverse[i][0][None, :] / inverse[i][0, 0]
        w[:, i] = torch.where(keep[:, i], w[:, i], 0.0)
    return w


@pytest.mark.parametrize("sparsity, nm, blocksize", [(0.5, None, 32), (0.5, None, 8), (0.3, None, 16),
                                                    (None, (2, 4), 8), (None, (1, 4), 32)])
def test_column_loop_equals_direct_obs_updates(sparsity, nm, blocksize):
    w, h = random_problem()
    hd = h.clone()
    weights.zero_dead_inputs(w.clone(), hd)
    u = weights.inverse_cholesky(hd, 0.01, "test")
    got = sparsegpt(w, u, sparsity, nm, blocksize)
    expected = direct_sparsegpt(w, h, 0.01, sparsity, nm, blocksize)
    assert torch.equal(got == 0, expected == 0)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def test_inverse_cholesky_is_the_papers_factor():
    _, h = random_problem()
    u = weights.inverse_cholesky(h, 0.01, "test")
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(h.shape[0])
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(damped), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("params", [{"sparsity": 0.0}, {"pattern": "4:4"}])
def test_nothing_pruned_is_origin_bit_for_bit(tiny, params):
    before = [lin.weight.clone() for lin in weights.decoder_linears(tiny)]
    with build("sparsegpt", params).apply(tiny, calibration()):
        assert all(torch.equal(a, lin.weight) for a, lin in zip(before, weights.decoder_linears(tiny)))


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_every_block_prunes_exactly_its_share(tiny, sparsity):
    method = build("sparsegpt", {"sparsity": sparsity, "blocksize": 32})
    with method.apply(tiny, calibration()):
        for lin in weights.decoder_linears(tiny):
            for b0 in range(0, lin.weight.shape[1], 32):
                block = lin.weight[:, b0 : b0 + 32]
                assert (block == 0).sum().item() == round(sparsity * block.numel())
    assert method.kept()["sparsity"] == pytest.approx(sparsity, abs=1e-3)


def test_2_4_keeps_two_of_every_four_inputs(tiny):
    method = build("sparsegpt", {"pattern": "2:4"})
    with method.apply(tiny, calibration()):
        for lin in weights.decoder_linears(tiny):
            assert ((lin.weight.reshape(lin.weight.shape[0], -1, 4) != 0).sum(-1) == 2).all()
    assert method.kept()["sparsity"] == 0.5


@pytest.mark.parametrize("params", [{"sparsity": 0.5}, {"pattern": "2:4"}])
def test_layer_error_below_magnitude_and_wanda(tiny, params):
    """The paper's claim where it is made, on the layer outputs: the weight updates reconstruct better
    than pruning by |W| or |W|·||X|| alone, at the same sparsity."""
    inputs = layer0_inputs(tiny)
    originals = {lin: lin.weight.clone() for lin in inputs}
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        with build(name, params).apply(tiny, calibration()):
            errors[name] = [torch.linalg.norm(x @ (originals[lin] - lin.weight).T).item() for lin, x in inputs.items()]
    for baseline in ("magnitude", "wanda"):
        assert all(s < b for s, b in zip(errors["sparsegpt"], errors[baseline])), (baseline, errors)


def test_gptq_uses_the_shared_hessian():
    """gptq's weights equal its column loop run on 2 XᵀX / n of each linear's own calibration inputs, computed here."""
    model = tiny_model("llama")
    inputs = layer0_inputs(model)
    expected = {lin: gptq(lin.weight, 2 * x.T @ x / x.shape[0], 4, 32, False, 0.01, False) for lin, x in inputs.items()}
    with build("gptq", {"bits": 4, "group": 32, "dataset": "chat", "samples": 6}).apply(model, calibration()):
        for lin, q in expected.items():
            torch.testing.assert_close(lin.weight, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("params, message", [
    ({"sparsity": 1.0}, "sparsity"), ({"pattern": "2-4"}, "pattern"), ({}, "exactly one"),
    ({"sparsity": 0.5, "samples": 0}, "samples"), ({"sparsity": 0.5, "damp": -1.0}, "damp"),
    ({"pattern": "2:4", "blocksize": 6}, "blocksize"),
])
def test_bad_params_are_clear_errors(params, message):
    with pytest.raises(ValueError, match=message):
        build("sparsegpt", params)
