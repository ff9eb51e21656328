"""Item 1 and 2 of the recipe issue: the searched clip initialisation and the static-range quantizer."""

import math

import pytest
import torch

from rcp_lib.quant.quantizers import (
    WeightQuantConfig,
    WeightQuantizer,
    ldp_levels,
    mse_clip_range,
)


def _mse(q: WeightQuantizer, w: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((q(w) - w) ** 2).mean())


@pytest.mark.parametrize("method", ["rtn", "ldp"])
def test_search_init_lowers_gaussian_group_mse_against_minmax(method):
    """On Gaussian groups of 64 at 2 bits, the searched clip (+ Lloyd levels for LDP) has a lower weight MSE than the
    min-max range (same grid), and the range it starts at is the search's ratio (capped at sigmoid(lwc_init))."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    extra = {"ldp_init": "lloyd"} if method == "ldp" else {}
    big = 50.0  # sigmoid(50) == 1 in float32: the constant init is plain min-max
    minmax = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=64, method=method, lwc=True,
                                                        lwc_init=big, **extra)).init_from(w)
    search = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=64, method=method, lwc=True,
                                                        lwc_init=big, clip_init="mse", **extra)).init_from(w)
    assert torch.allclose(minmax.clip_ratio(w), torch.ones(64, 4, dtype=torch.float64))
    _, _, r = mse_clip_range(w.double().view(64, 4, 64), 2)
    torch.testing.assert_close(search.clip_ratio(w), r, rtol=1e-6, atol=1e-6)
    assert float(r.mean()) < 0.9  # the search really clips Gaussian groups at 2 bits
    assert _mse(search, w) < 0.8 * _mse(minmax, w)


def test_search_init_capped_at_lwc_init_and_const_unchanged():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    cfg = WeightQuantConfig(bits=4, group_size=32, method="ldp", lwc=True, clip_init="mse")  # 4 bits: mild clipping
    q = WeightQuantizer(w.shape, cfg).init_from(w)
    assert float(q.gamma.detach().max()) <= 4.0 + 1e-6 and float(q.beta.detach().max()) <= 4.0 + 1e-6
    const = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=32)).init_from(w)
    assert torch.equal(const.gamma, torch.full((8, 2), 4.0)) and torch.equal(const.beta, const.gamma)


def test_clip_init_needs_lwc():
    with pytest.raises(ValueError, match="lwc=True"):
        WeightQuantConfig(method="ldp", lwc=False, clip_init="mse")
    with pytest.raises(ValueError, match="range_mode"):
        WeightQuantConfig(range_mode="fixed")


def test_static_range_starts_like_lwc_and_is_not_recomputed():
    torch.manual_seed(2)
    w = torch.randn(6, 64)
    lwc = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=32, ldp_init="lloyd")).init_from(w)
    st = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=32, ldp_init="lloyd",
                                                    range_mode="static")).init_from(w)
    torch.testing.assert_close(st(w), lwc(w), rtol=1e-5, atol=1e-6)
    assert {n for n, _ in st.named_parameters()} == {"theta", "lo", "hi"}
    lo0 = st.clip_range(w)[0].clone()
    torch.testing.assert_close(st.clip_range(3 * w)[0], lo0)  # a moved latent weight does not move the range
    assert not torch.allclose(lwc.clip_range(3 * w)[0], lwc.clip_range(w)[0])


def _reference_static(w, lo, hi, theta):
    """Plain float64 autograd reference: LDP levels on [lo, hi], nearest level, straight-through inside [lo, hi]."""
    out, n = w.shape
    ng = lo.shape[1]
    wg = w.view(out, ng, n // ng)
    hi_ = torch.maximum(hi, lo)
    lv = ldp_levels(theta, lo, hi_)
    mid = ((lv[..., 1:] + lv[..., :-1]) * 0.5).detach().contiguous()
    idx = torch.searchsorted(mid, wg.detach().contiguous())
    inside = ((wg >= lo.detach().unsqueeze(-1)) & (wg <= hi_.detach().unsqueeze(-1))).double()
    return (torch.gather(lv, -1, idx) + (wg - wg.detach()) * inside).view(out, n)


def _reference_static_uniform(w, lo, hi, bits):
    out, n = w.shape
    ng = lo.shape[1]
    wg = w.view(out, ng, n // ng)
    L = 2 ** bits
    s = ((hi - lo) / (L - 1)).unsqueeze(-1)
    x = ((wg - lo.unsqueeze(-1)) / s).clamp(0, L - 1)
    q = x + (torch.round(x) - x).detach()
    return (lo.unsqueeze(-1) + s * q).view(out, n)


@pytest.mark.parametrize("method", ["ldp", "rtn"])
def test_static_range_gradients_match_float64_autograd_reference(method):
    torch.manual_seed(3)
    cfg = WeightQuantConfig(bits=2, group_size=16, method=method, lwc=True, range_mode="static",
                            ldp_init="lloyd", lwc_init=0.5)
    w0 = torch.randn(4, 32, dtype=torch.float64)
    q = WeightQuantizer(w0.shape, cfg).double().init_from(w0)
    with torch.no_grad():
        if q.theta is not None:
            q.theta.add_(0.1 * torch.randn_like(q.theta))
    w = w0.clone().requires_grad_()
    g = torch.randn(4, 32, dtype=torch.float64)
    params = list(q.quant_parameters())
    grads = torch.autograd.grad(q(w), [w] + params, g)

    lo = q.lo.detach().clone().requires_grad_()
    hi = q.hi.detach().clone().requires_grad_()
    w2 = w0.clone().requires_grad_()
    if method == "ldp":
        theta = q.theta.detach().clone().requires_grad_()
        ref = _reference_static(w2, lo, hi, theta)
        ref_grads = dict(zip(("w", "theta", "lo", "hi"), torch.autograd.grad(ref, (w2, theta, lo, hi), g)))
        order = ["w", "theta", "lo", "hi"]
    else:
        ref = _reference_static_uniform(w2, lo, hi, cfg.bits)
        ref_grads = dict(zip(("w", "lo", "hi"), torch.autograd.grad(ref, (w2, lo, hi), g)))
        order = ["w", "lo", "hi"]
    torch.testing.assert_close(q(w0), ref.detach(), rtol=1e-12, atol=1e-12)
    inside = (w0.view(4, 2, 16) >= q.lo.detach().unsqueeze(-1)) & (w0.view(4, 2, 16) <= q.hi.detach().unsqueeze(-1))
    assert 0 < int(inside.sum()) < inside.numel()  # both clipped and unclipped weights
    for name, a in zip(order, grads):
        torch.testing.assert_close(a, ref_grads[name], rtol=1e-10, atol=1e-12)
        assert float(a.abs().sum()) > 0, name


def test_init_from_levels_reproduces_a_level_table_exactly():
    """A static LDP quantizer set to a level table maps weights that sit on those levels to themselves (the GPTQ
    start of "GPTQ on the LDP grid, then QAT")."""
    torch.manual_seed(5)
    cfg = WeightQuantConfig(bits=2, group_size=8, method="ldp", lwc=True, range_mode="static")
    q = WeightQuantizer((3, 16), cfg)
    levels = torch.sort(torch.randn(3, 2, 4), dim=-1).values
    codes = torch.randint(0, 4, (3, 2, 8))
    w = torch.gather(levels, -1, codes).view(3, 16)
    q.init_from_levels(levels)
    torch.testing.assert_close(q(w), w, rtol=0, atol=1e-6)
    lwc = WeightQuantizer((3, 16), WeightQuantConfig(bits=2, group_size=8))
    with pytest.raises(ValueError, match="static"):
        lwc.init_from_levels(levels)


def test_static_range_without_lwc_is_fixed_at_the_min_max_start():
    """range_mode="static" without LWC (a "w/o Clip" row's GPTQ start): lo / hi are buffers at clip_ratio * min-max
    of the start, equal to the relative quantizer there, never trained and not recomputed from a moved weight."""
    torch.manual_seed(3)
    w = torch.randn(6, 64)
    rel = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=32, lwc=False, ldp_init="lloyd")).init_from(w)
    st = WeightQuantizer(w.shape, WeightQuantConfig(bits=2, group_size=32, lwc=False, ldp_init="lloyd",
                                                    range_mode="static")).init_from(w)
    assert {n for n, _ in st.named_parameters()} == {"theta"} and {n for n, _ in st.named_buffers()} == {"lo", "hi"}
    assert list(st.quant_parameters()) == [st.theta] and list(st.range_parameters()) == []
    wg = w.view(6, 2, 32)
    torch.testing.assert_close(st.lo, wg.amin(-1))
    torch.testing.assert_close(st.hi, wg.amax(-1))
    torch.testing.assert_close(st(w), rel(w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.clip_range(3 * w)[0], st.lo)  # fixed
    assert set(st.state_dict()) == {"theta", "lo", "hi"}  # saved with the student
