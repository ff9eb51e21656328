"""Weight quantizers: uniform RTN, LWC, LDP - against float64 references, identities, gradcheck and invariants."""

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call

from rcp_lib.quant import (
    WeightQuantConfig,
    WeightQuantizer,
    fake_quant_uniform,
    ldp_levels,
    lloyd_fractions,
    quantize_to_levels,
    quantize_uniform,
)


def ref_uniform_np(w: np.ndarray, bits: int, gs: int, ratio: float = 1.0) -> np.ndarray:
    """Plain numpy float64 reference of the asymmetric min-max grid (float zero point)."""
    out = np.empty_like(w, dtype=np.float64)
    L = 2**bits
    for r in range(w.shape[0]):
        for g0 in range(0, w.shape[1], gs):
            x = w[r, g0:g0 + gs].astype(np.float64)
            lo, hi = ratio * x.min(), ratio * x.max()
            s = max((hi - lo) / (L - 1), 1e-10)
            out[r, g0:g0 + gs] = lo + s * np.clip(np.round((x - lo) / s), 0, L - 1)
    return out


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 9, 16, -1, 2.0])
def test_bits_validated(bits):
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits"):
        fake_quant_uniform(w, bits, 8)
    with pytest.raises(ValueError, match="bits"):
        WeightQuantConfig(bits=bits)


def test_group_size_not_dividing_names_layer():
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.*576"):
        WeightQuantizer((1536, 576), WeightQuantConfig(group_size=128), name="model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="does not divide"):
        fake_quant_uniform(torch.randn(4, 10), 2, 4)
    WeightQuantizer((1536, 576), WeightQuantConfig(group_size=64))  # fine
    WeightQuantizer((1536, 576), WeightQuantConfig(group_size=-1))  # per row


def test_nonfinite_weights_raise():
    w = torch.randn(4, 8)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        fake_quant_uniform(w, 2, 8)
    q = WeightQuantizer((4, 8), WeightQuantConfig(group_size=8))
    w[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        q(w)


def test_config_roundtrip_and_validation():
    cfg = WeightQuantConfig(bits=3, group_size=64, method="ldp", lwc=False, ldp_granularity="row", ldp_init="lloyd")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert WeightQuantConfig.from_dict(d) == cfg
    assert WeightQuantConfig.from_json(cfg.to_json()) == cfg
    for bad in ({"method": "nf4"}, {"ldp_granularity": "col"}, {"ldp_init": "kmeans"}, {"clip_ratio": 0.0},
                {"clip_ratio": 1.2}, {"group_size": 0}):
        with pytest.raises(ValueError):
            WeightQuantConfig(**bad)
    with pytest.raises(ValueError, match="unknown"):
        WeightQuantConfig.from_dict({"bits": 2, "foo": 1})
    assert WeightQuantConfig(method="lwc", lwc=False).learn_clip


# ------------------------------------------------------------------------------------------------
# uniform RTN
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,gs,ratio", [(2, 16, 1.0), (3, 32, 0.9), (4, -1, 1.0), (8, 16, 0.75), (1, 8, 1.0)])
def test_uniform_matches_numpy_reference(bits, gs, ratio):
    w = torch.randn(6, 64) * torch.rand(6, 1) * 3
    got = fake_quant_uniform(w, bits, gs, clip_ratio=ratio).double().numpy()
    ref = ref_uniform_np(w.numpy(), bits, 64 if gs == -1 else gs, ratio)
    np.testing.assert_allclose(got, ref, atol=1e-6 * np.abs(ref).max())
    g = 64 if gs == -1 else gs
    for r in range(6):  # at most L distinct values per group
        for g0 in range(0, 64, g):
            assert len(np.unique(got[r, g0:g0 + g])) <= 2**bits


def test_uniform_error_bound_and_ste_gradient():
    w = torch.randn(8, 32, requires_grad=True)
    out = fake_quant_uniform(w, 3, 16, clip_ratio=0.8)
    wg = w.detach().view(8, 2, 16)
    lo, hi = 0.8 * wg.amin(-1, keepdim=True), 0.8 * wg.amax(-1, keepdim=True)
    s = (hi - lo) / 7
    inside = (wg >= lo) & (wg <= hi)
    err = (out.detach().view(8, 2, 16) - wg).abs()
    assert bool((err[inside] <= (s / 2).expand_as(err)[inside] * (1 + 1e-5)).all())
    out.sum().backward()
    assert torch.equal(w.grad.view(8, 2, 16), inside.float())


def test_uniform_lwc_gradients_match_analytic():
    """LSQ/OmniQuant-style gradients of the uniform grid w.r.t. lo and hi (straight-through rounding), float64."""
    torch.manual_seed(1)
    L = 4
    wg = torch.randn(3, 2, 20, dtype=torch.float64)
    lo = (0.8 * wg.amin(-1)).requires_grad_()
    hi = (0.7 * wg.amax(-1)).requires_grad_()
    out, codes = quantize_uniform(wg, lo, hi, 2)
    out.sum().backward()
    s = ((hi - lo) / (L - 1)).detach().unsqueeze(-1)
    u = (wg - lo.detach().unsqueeze(-1)) / s
    r = codes.double()
    inside = (u >= 0) & (u <= L - 1)
    dhi = torch.where(inside, (r - u) / (L - 1), r / (L - 1)).sum(-1)
    dlo = torch.where(inside, (u - r) / (L - 1), 1 - r / (L - 1)).sum(-1)
    torch.testing.assert_close(hi.grad, dhi)
    torch.testing.assert_close(lo.grad, dlo)


# ------------------------------------------------------------------------------------------------
# LWC
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rtn", "ldp"])
def test_lwc_large_logits_recover_minmax(method):
    w = torch.randn(16, 64)
    q = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=16, method=method, lwc=True, lwc_init=40.0))
    ref = fake_quant_uniform(w, 2, 16)
    torch.testing.assert_close(q(w), ref, atol=1e-6, rtol=0)


def test_lwc_default_init_and_param_groups():
    q = WeightQuantizer((8, 32), WeightQuantConfig(bits=2, group_size=16, method="ldp", lwc=True))
    assert q.gamma.shape == (8, 2) and q.beta.shape == (8, 2) and q.theta.shape == (8, 2, 3)
    assert torch.all(q.gamma == 4.0) and torch.all(q.beta == 4.0)
    assert {id(p) for p in q.quant_parameters()} == {id(q.theta), id(q.gamma), id(q.beta)}
    assert len(list(WeightQuantizer((8, 32), WeightQuantConfig(group_size=16, method="rtn", lwc=False)).quant_parameters())) == 0


# ------------------------------------------------------------------------------------------------
# LDP
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("gran,gs", [("group", 16), ("row", 16), ("group", -1)])
def test_ldp_theta_zero_is_uniform(bits, gran, gs):
    w = torch.randn(12, 64) * 2
    q = WeightQuantizer(w.shape, WeightQuantConfig(bits=bits, group_size=gs, method="ldp", lwc=False, ldp_granularity=gran))
    # identical grid up to float32 rounding of the softmax cumsum (relative 1e-6 of the weight scale)
    torch.testing.assert_close(q(w), fake_quant_uniform(w, bits, gs), atol=1e-6 * w.abs().max().item(), rtol=0)


def test_ldp_levels_formula_float64():
    theta = torch.randn(2, 3, 3, dtype=torch.float64)
    lo, hi = -torch.rand(2, 3, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
    lv = ldp_levels(theta, lo, hi)
    p = np.exp(theta.numpy()) / np.exp(theta.numpy()).sum(-1, keepdims=True)
    for i in range(2):
        for j in range(3):
            ref = [lo[i, j].item()] + [lo[i, j].item() + (hi[i, j] - lo[i, j]).item() * p[i, j, :k].sum() for k in range(1, 4)]
            np.testing.assert_allclose(lv[i, j].numpy(), ref, rtol=0, atol=1e-14)
    assert torch.equal(lv[..., -1], hi)


def test_ldp_nearest_level_assignment():
    theta = torch.randn(4, 2, 3)
    wg = torch.randn(4, 2, 50)
    lo, hi = wg.amin(-1), wg.amax(-1)
    lv = ldp_levels(theta, lo, hi)
    wq, codes = quantize_to_levels(wg, lv, lo, hi)
    dist = (wg.unsqueeze(-1) - lv.unsqueeze(-2)).abs()  # brute force nearest level
    best = dist.min(-1).values
    torch.testing.assert_close((wq - wg).abs(), best, atol=1e-6, rtol=0)
    assert torch.equal(wq, torch.gather(lv, -1, codes))


def test_ldp_gradcheck_levels_float64():
    """Gradient w.r.t. (theta, lo, hi) for fixed assignments: well-separated weights, exact derivative."""
    torch.manual_seed(3)
    # weights near the uniform level positions of [-1, 1] so small perturbations never cross a threshold
    base = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0], dtype=torch.float64)
    idx = torch.randint(0, 4, (2, 2, 10))
    wg = base[idx] * 0.9 + 0.02 * torch.randn(2, 2, 10, dtype=torch.float64)
    wg[..., 0], wg[..., 1] = -1.0, 1.0
    theta = (0.05 * torch.randn(2, 2, 3, dtype=torch.float64)).requires_grad_()
    lo = torch.full((2, 2), -1.0, dtype=torch.float64, requires_grad=True)
    hi = torch.full((2, 2), 1.0, dtype=torch.float64, requires_grad=True)
    wsel = torch.randn(2, 2, 10, dtype=torch.float64)

    def f(t, a, b):
        lv = ldp_levels(t, a, b)
        return (quantize_to_levels(wg, lv, a, b)[0] * wsel).sum(-1)

    assert torch.autograd.gradcheck(f, (theta, lo, hi), eps=1e-6, atol=1e-8)


def test_ldp_module_gradcheck_theta_gamma_beta_float64():
    torch.manual_seed(4)
    cfg = WeightQuantConfig(bits=2, group_size=8, method="ldp", lwc=True, lwc_init=3.0)
    q = WeightQuantizer((3, 16), cfg).double()
    w = torch.randn(3, 16, dtype=torch.float64)
    # keep the assignment fixed: nudge weights away from the thresholds of the initial levels
    with torch.no_grad():
        lv = q.levels(w)
        wg = w.view(3, 2, 8)
        codes = quantize_to_levels(wg, lv)[1]
        inner = torch.gather(lv, -1, codes)
        wg.copy_(torch.where((wg > lv[..., :1]) & (wg < lv[..., -1:]), inner + 0.05 * (wg - inner), wg))
    wsel = torch.randn(3, 16, dtype=torch.float64)
    theta0 = (0.01 * torch.randn_like(q.theta)).requires_grad_()
    g0 = q.gamma.detach().clone().requires_grad_()
    b0 = q.beta.detach().clone().requires_grad_()

    def f(t, g, b):
        return (functional_call(q, {"theta": t, "gamma": g, "beta": b}, (w,)) * wsel).sum()

    assert torch.autograd.gradcheck(f, (theta0, g0, b0), eps=1e-6, atol=1e-7)


def test_ldp_weight_gradient_straight_through_inside_only():
    w = torch.randn(4, 32, requires_grad=True)
    q = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=16, method="ldp", lwc=True, lwc_init=0.0))  # ratio 0.5
    q(w).sum().backward()
    wg = w.detach().view(4, 2, 16)
    inside = (wg >= 0.5 * wg.amin(-1, keepdim=True)) & (wg <= 0.5 * wg.amax(-1, keepdim=True))
    assert 0 < inside.float().mean() < 1
    assert torch.equal(w.grad.view(4, 2, 16), inside.float())
    assert q.theta.grad.abs().sum() > 0 and q.gamma.grad.abs().sum() > 0 and q.beta.grad.abs().sum() > 0


def test_ldp_levels_stay_ordered_under_big_lr():
    torch.manual_seed(5)
    w = torch.randn(8, 64)
    q = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=16, method="ldp", lwc=True))
    opt = torch.optim.Adam(q.quant_parameters(), lr=5.0)
    target = torch.randn(8, 64) * 3
    for _ in range(30):
        opt.zero_grad()
        ((q(w) - target) ** 2).sum().backward()
        opt.step()
    lv = q.levels(w)
    assert torch.isfinite(lv).all() and torch.isfinite(q.theta).all()
    assert bool((lv[..., 1:] >= lv[..., :-1]).all())
    lo, hi = q.clip_range(w)
    torch.testing.assert_close(lv[..., 0], lo.detach())
    torch.testing.assert_close(lv[..., -1], hi.detach())


# ------------------------------------------------------------------------------------------------
# Lloyd init
# ------------------------------------------------------------------------------------------------


def test_lloyd_fixed_point_and_beats_uniform():
    torch.manual_seed(6)
    u = torch.rand(5, 200, dtype=torch.float64) ** 2  # skewed data in [0, 1]
    c = lloyd_fractions(u, 4, iters=200)
    assert torch.equal(c[:, 0], torch.zeros(5, dtype=torch.float64)) and torch.equal(c[:, -1], torch.ones(5, dtype=torch.float64))
    for s in range(5):  # interior levels are the means of their nearest-level cells (Lloyd fixed point)
        x = u[s].numpy()
        lv = c[s].numpy()
        cell = np.abs(x[:, None] - lv[None]).argmin(1)
        for k in (1, 2):
            if (cell == k).any():
                assert abs(x[cell == k].mean() - lv[k]) < 1e-9
        mse = (np.abs(x[:, None] - lv[None]).min(1) ** 2).mean()
        uni = np.linspace(0, 1, 4)
        assert mse <= (np.abs(x[:, None] - uni[None]).min(1) ** 2).mean() + 1e-15


@pytest.mark.parametrize("gran", ["group", "row"])
def test_lloyd_init_lowers_mse(gran):
    torch.manual_seed(7)
    w = torch.randn(32, 128)
    mses = {}
    for init in ("uniform", "lloyd"):
        q = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=32, method="ldp", lwc=False, ldp_init=init, ldp_granularity=gran))
        q.init_from(w)
        mses[init] = ((q(w) - w) ** 2).mean().item()
    assert mses["lloyd"] < 0.9 * mses["uniform"]


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [
    dict(method="ldp", lwc=True, ldp_init="lloyd"),
    dict(method="ldp", lwc=False, ldp_granularity="row", ldp_init="lloyd"),
    dict(method="rtn", lwc=False),
    dict(method="rtn", lwc=False, round_zero=True),
    dict(method="lwc", lwc=False),
    dict(method="ldp", lwc=True, bits=3, group_size=-1),
])
def test_export_reproduces_forward_exactly(cfg):
    cfg = {"bits": 2, "group_size": 16, **cfg}
    w = torch.randn(8, 64)
    q = WeightQuantizer(w.shape, WeightQuantConfig(**cfg)).init_from(w)
    with torch.no_grad():
        for p in q.quant_parameters():
            p.add_(0.3 * torch.randn_like(p))
    codes, levels = q.export(w)
    gs = 64 if cfg["group_size"] == -1 else cfg["group_size"]
    L = 2 ** cfg["bits"]
    assert codes.dtype == torch.uint8 and codes.shape == (8, 64) and int(codes.max()) < L
    assert levels.dtype == torch.float32 and levels.shape == (8, 64 // gs, L)
    rebuilt = levels.gather(-1, codes.view(8, 64 // gs, gs).long()).view(8, 64)
    assert torch.equal(rebuilt, q(w))


def test_check_finite_overflowing_sum_of_finite_values_passes():
    """The one-reduction fast path must not reject finite weights whose sum overflows (float16)."""
    from rcp_lib.quant.quantizers import check_finite

    w = torch.full((4, 64), 60000.0, dtype=torch.float16)  # finite; the float32 sum is finite too
    check_finite(w)
    w32 = torch.full((4, 8), 3.0e38, dtype=torch.float32)  # finite; its float32 sum overflows to inf
    check_finite(w32)
    w32[2, 5] = float("-inf")
    with pytest.raises(ValueError, match="1 NaN/inf"):
        check_finite(w32)


@pytest.mark.parametrize("L", [2, 4, 16, 32])
def test_nearest_level_codes_match_searchsorted_including_ties(L):
    """Comparison counting (L <= 16) and searchsorted (larger L) give the reference assignment, ties to the lower level."""
    from rcp_lib.quant import nearest_level_codes

    torch.manual_seed(L)
    lv = torch.sort(torch.randn(5, 3, L, dtype=torch.float64), -1).values
    mid = (lv[..., 1:] + lv[..., :-1]) * 0.5
    wg = torch.randn(5, 3, 40, dtype=torch.float64)
    wg[..., : L - 1] = mid  # exact ties at every threshold
    codes = nearest_level_codes(wg, lv)
    assert codes.dtype == torch.int64
    ref = torch.searchsorted(mid.contiguous(), wg.contiguous())  # side="left": index of the first threshold >= w
    assert torch.equal(codes, ref)
    dist = (wg.unsqueeze(-1) - lv.unsqueeze(-2)).abs()
    # nearest level (at an exact tie both neighbours are nearest, up to the rounding of the midpoint)
    torch.testing.assert_close(torch.gather(dist, -1, codes.unsqueeze(-1)).squeeze(-1), dist.min(-1).values, rtol=0, atol=1e-12)


def test_quantize_to_levels_gradients_match_autograd_reference():
    """The fused node's gradients equal autograd through gather plus a masked straight-through term."""
    torch.manual_seed(7)
    wg = (0.8 * torch.randn(6, 4, 32, dtype=torch.float64)).requires_grad_()
    theta = torch.randn(6, 4, 3, dtype=torch.float64, requires_grad=True)
    lo = torch.full((6, 4), -1.0, dtype=torch.float64, requires_grad=True)
    hi = torch.full((6, 4), 1.2, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 4, 32, dtype=torch.float64)

    wq, codes = quantize_to_levels(wg, ldp_levels(theta, lo, hi), lo, hi)
    grads = torch.autograd.grad(wq, (wg, theta, lo, hi), g)

    lv = ldp_levels(theta, lo, hi)
    idx = torch.searchsorted(((lv[..., 1:] + lv[..., :-1]) * 0.5).detach().contiguous(), wg.detach().contiguous())
    inside = ((wg >= lo.detach().unsqueeze(-1)) & (wg <= hi.detach().unsqueeze(-1))).double()
    ref = torch.gather(lv, -1, idx) + (wg - wg.detach()) * inside
    ref_grads = torch.autograd.grad(ref, (wg, theta, lo, hi), g)
    assert torch.equal(codes, idx) and torch.equal(wq, ref.detach())
    assert 0 < int(inside.sum()) < inside.numel()  # both clipped and unclipped weights are exercised
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
