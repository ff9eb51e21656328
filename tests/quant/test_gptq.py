"""GPTQ: Hessian accumulation, agreement with a naive float64 OBQ-style reference, identities, held-out error."""

import pytest
import torch

from rcp_lib.quant import (
    HessianAccumulator,
    WeightQuantConfig,
    WeightQuantizer,
    fake_quant_uniform,
    gptq_quantize,
)


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100)
    mix = torch.randn(d, d, generator=g) / d**0.5 + 0.3 * torch.eye(d)
    scale = torch.rand(d, generator=g) * 2 + 0.2
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix) * scale


def out_err(W, Q, X):
    return ((X.double() @ (W.double() - Q.double()).T) ** 2).sum().item()


def ref_gptq(W, H, gs, bits=None, levels=None, percdamp=0.01, order=None):
    """Naive sequential OBQ-style GPTQ in float64 with the explicit inverse Hessian (no Cholesky, no blocks):
    quantize column j, spread (w_j - q_j) / Hinv_jj * Hinv_j,rest over the remaining columns, then remove j from
    Hinv. A uniform group's range is the min-max of its current (updated) columns when its first column comes up."""
    W = W.double().clone()
    H = H.double().clone()
    d = W.shape[1]
    H += percdamp * torch.diag(H).mean() * torch.eye(d, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    order = list(range(d)) if order is None else [int(i) for i in order]
    Q = torch.zeros_like(W)
    params = {}
    for n, j in enumerate(order):
        g = j // gs
        w = W[:, j]
        if bits is not None:
            L = 2**bits
            if g not in params:
                cols = W[:, g * gs:(g + 1) * gs]
                lo, hi = cols.min(1).values, cols.max(1).values
                params[g] = (lo, (hi - lo) / (L - 1))
            lo, s = params[g]
            q = lo + s * torch.clamp(torch.round((w - lo) / s), 0, L - 1)
        else:
            lv = levels[:, g].double()
            q = lv.gather(1, (w[:, None] - lv).abs().argmin(1, keepdim=True)).squeeze(1)
        rest = order[n + 1:]
        err = (w - q) / Hinv[j, j]
        W[:, rest] -= err[:, None] * Hinv[j, rest][None, :]
        Q[:, j] = q
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / Hinv[j, j]
    return Q


def test_hessian_accumulator_matches_float64_reference():
    x = torch.randn(3, 50, 24)
    acc = HessianAccumulator(24)
    for b in x:
        acc.add_batch(b)
    acc.add_batch(torch.randn(0, 24))
    X = x.reshape(-1, 24).double()
    torch.testing.assert_close(acc.H, 2 / X.shape[0] * X.T @ X)
    assert acc.nsamples == 150
    with pytest.raises(ValueError):
        acc.add_batch(torch.randn(2, 23))
    with pytest.raises(ValueError):
        HessianAccumulator(5).H


@pytest.mark.parametrize("block_size", [5, 16, 128])
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_naive_reference_uniform(block_size, act_order):
    W = torch.randn(12, 32, dtype=torch.float64)
    X = correlated_inputs(400, 32, seed=1).double()
    H = 2 / 400 * X.T @ X
    res = gptq_quantize(W, H, bits=3, group_size=8, block_size=block_size, act_order=act_order, dtype=torch.float64)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else None
    ref = ref_gptq(W, H, 8, bits=3, order=order)
    torch.testing.assert_close(res.weight, ref, atol=1e-9, rtol=0)
    if act_order:
        assert torch.equal(res.perm, order)


@pytest.mark.parametrize("act_order", [False, True])
def test_matches_naive_reference_fixed_levels(act_order):
    W = torch.randn(10, 24, dtype=torch.float64)
    X = correlated_inputs(300, 24, seed=2).double()
    H = 2 / 300 * X.T @ X
    levels = torch.sort(torch.randn(10, 3, 4, dtype=torch.float64) * 1.5, dim=-1).values
    res = gptq_quantize(W, H, levels=levels, group_size=8, block_size=7, act_order=act_order, dtype=torch.float64)
    order = torch.argsort(torch.diag(H), descending=True) if act_order else None
    torch.testing.assert_close(res.weight, ref_gptq(W, H, 8, levels=levels, order=order), atol=1e-9, rtol=0)
    assert torch.equal(levels.float().gather(-1, res.codes.view(10, 3, 8).long()).view(10, 24), res.weight.float())


def test_diagonal_hessian_is_rtn():
    W = torch.randn(16, 64)
    for H in (torch.eye(64), torch.diag(torch.rand(64) + 0.1)):
        res = gptq_quantize(W, H, bits=2, group_size=16)
        assert torch.equal(res.weight, fake_quant_uniform(W, 2, 16))


def test_argument_validation():
    W, H = torch.randn(4, 16), torch.eye(16)
    with pytest.raises(ValueError, match="exactly one"):
        gptq_quantize(W, H, group_size=8)
    with pytest.raises(ValueError, match="divide"):
        gptq_quantize(W, H, bits=2, group_size=6)
    with pytest.raises(ValueError, match="sorted"):
        gptq_quantize(W, H, levels=torch.tensor([3.0, 2.0, 1.0, 0.0]).expand(4, 2, 4), group_size=8)
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(Wn, H, bits=2, group_size=8)


def test_dead_inputs_zeroed():
    """An input that never fires (H_jj = 0) gets a zero weight column before quantization, and no error update."""
    W = torch.randn(4, 16) + 3
    X = torch.randn(100, 16)
    X[:, 3] = 0
    lv = torch.tensor([-1.0, -0.4, 0.2, 0.8])
    res = gptq_quantize(W, 2 / 100 * X.T @ X, levels=lv.expand(4, 2, 4), group_size=8)
    assert torch.all(res.weight[:, 3] == lv[2])  # nearest level to 0


def test_synthetic_heldout_error_below_rtn_both_grids():
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    Xc, Xt = correlated_inputs(2048, 256, seed=3), correlated_inputs(1024, 256, seed=4)
    acc = HessianAccumulator(256)
    acc.add_batch(Xc)
    # uniform grid (3 bits), with and without act-order
    rtn = out_err(W, fake_quant_uniform(W, 3, 64), Xt)
    for ao in (False, True):
        res = gptq_quantize(W, acc.H, bits=3, group_size=64, act_order=ao)
        assert out_err(W, res.weight, Xt) < 0.8 * rtn
        assert torch.equal(res.levels.gather(-1, res.codes.view(64, 4, 64).long()).view(64, 256), res.weight)
    # fixed non-uniform per-group table (pinned-end Lloyd-Max / LDP levels), 2 bits
    q = WeightQuantizer(W.shape, WeightQuantConfig(bits=2, group_size=64, method="ldp", lwc=False, ldp_init="lloyd")).init_from(W)
    levels = q.levels(W)
    base = out_err(W, q(W), Xt)
    for ao in (False, True):
        res = gptq_quantize(W, acc.H, levels=levels, group_size=64, act_order=ao)
        assert out_err(W, res.weight, Xt) < 0.8 * base
        assert torch.equal(levels.gather(-1, res.codes.view(64, 4, 64).long()).view(64, 256), res.weight)


class _Stop(Exception):
    pass


def _capture_inputs(model, module, ids):
    """Inputs of ``module`` for a forward of ``ids`` (the forward is stopped right after the module)."""
    got = []

    def hook(m, inp, out):
        got.append(inp[0].detach().reshape(-1, inp[0].shape[-1]))
        raise _Stop

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


def test_real_layer_gptq_beats_rtn(embedded, excerpt_test_ids):
    """Real SmolLM2 layer 3 up_proj, real text: calibration from train windows, error on test-split windows."""
    from rcp_lib.data import calibration_windows, load_corpus, tokenize

    model, tok = embedded
    train_ids = tokenize(tok, load_corpus("wiki-excerpt", "train")[:300_000])
    lin = model.model.layers[3].mlp.up_proj
    Xc = _capture_inputs(model, lin, calibration_windows(train_ids, 32, 128, seed=0))  # 4096 tokens
    Xt = _capture_inputs(model, lin, calibration_windows(excerpt_test_ids, 8, 128, seed=1))  # 1024 held-out tokens
    W = lin.weight.detach()
    acc = HessianAccumulator(W.shape[1])
    acc.add_batch(Xc)
    for bits in (2, 3):
        rtn = out_err(W, fake_quant_uniform(W, bits, 64), Xt)
        for ao in (False, True):
            g = out_err(W, gptq_quantize(W, acc.H, bits=bits, group_size=64, act_order=ao).weight, Xt)
            assert g < rtn, (bits, ao, g, rtn)
