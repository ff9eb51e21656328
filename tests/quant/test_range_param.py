"""The scale-free ("log") parametrisation of a learnable static range: exact at the start, equal relative steps in
every layer, gradients through the level formula, and a GPTQ level table kept exactly."""

import math

import pytest
import torch

from rcp_lib.quant.quantizers import WeightQuantConfig, WeightQuantizer


def _q(range_param="log", method="ldp"):
    cfg = WeightQuantConfig(bits=2, group_size=8, method=method, lwc=True, range_mode="static", range_param=range_param,
                            clip_init="mse", ldp_init="lloyd" if method == "ldp" else "uniform")
    return WeightQuantizer((4, 16), cfg)


def test_log_range_starts_exactly_at_the_absolute_range():
    """Same start as the absolute parametrisation (bit for bit), and log_lo / log_hi learnable, lo / hi buffers."""
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    a, b = _q("absolute").init_from(w), _q("log").init_from(w)
    assert torch.equal(a(w), b(w)) and torch.equal(a.clip_range(w)[0], b.clip_range(w)[0])
    names = {n for n, _ in b.named_parameters()}
    assert {"log_lo", "log_hi", "theta"} == names
    assert [id(p) for p in b.range_parameters()] == [id(b.log_lo), id(b.log_hi)]  # trained at lr_range when set
    assert {id(p) for p in b.quant_parameters()} == {id(b.log_lo), id(b.log_hi), id(b.theta)}


def test_log_range_step_is_relative_to_each_groups_range():
    """A change s of the log-multipliers moves each end away from the start's centre by the factor e^s, whatever the
    scale of the weights (float64 reference)."""
    for scale in (1e-3, 1.0, 50.0):
        w = scale * torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
        q = _q().init_from(w)
        lo0, hi0 = (t.detach().double().clone() for t in q.clip_range(w))
        with torch.no_grad():
            q.log_lo.fill_(0.1)
            q.log_hi.fill_(-0.2)
        lo, hi = (t.double() for t in q.clip_range(w))
        c = (lo0 + hi0) / 2
        assert torch.allclose((c - lo) / (c - lo0), torch.full_like(lo, math.exp(0.1)), rtol=1e-5)
        assert torch.allclose((hi - c) / (hi0 - c), torch.full_like(hi, math.exp(-0.2)), rtol=1e-5)


def test_log_range_gets_the_gradient_of_the_level_formula():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(2))
    q = _q(method="rtn").init_from(w)
    target = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    ((q(w) - target) ** 2).sum().backward()
    assert q.log_lo.grad is not None and q.log_lo.grad.abs().sum() > 0 and q.log_hi.grad.abs().sum() > 0


def test_log_range_keeps_a_given_level_table_exactly():
    """init_from_levels (the GPTQ start): the levels at step 0 are the given ones, bit for bit."""
    q = _q()
    lv = torch.sort(torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(4)), dim=-1).values
    q.init_from_levels(lv)
    w = torch.zeros(4, 16)
    got = q.levels(w)
    assert torch.allclose(got, lv, rtol=0, atol=1e-6)
    assert torch.equal(got[..., 0], lv[..., 0]) and torch.equal(got[..., -1], lv[..., -1])


def test_log_range_needs_a_learnable_static_range():
    with pytest.raises(ValueError, match="range_param"):
        WeightQuantConfig(range_param="log")  # relative (LWC logits): nothing to stretch
    with pytest.raises(ValueError, match="range_param"):
        WeightQuantConfig(range_param="log", range_mode="static", lwc=False)
    with pytest.raises(ValueError, match="range_param must be one of"):
        WeightQuantConfig(range_param="sigmoid", range_mode="static")
