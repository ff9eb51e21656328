"""Per-token activation and KV fake quantization: error bounds, idempotence, references, gradients; the integer form
(codes, scale, zero) that the W2A4 op and the deployed layer consume."""

import math

import numpy as np
import pytest
import torch

from rcp_lib.quant import fake_quant_kv, fake_quant_per_token
from rcp_lib.quant.activations import dequantize_per_token, quantize_per_token


@pytest.mark.parametrize("bits", [None, 16])
def test_off_is_identity(bits):
    x = torch.randn(2, 5, 8)
    assert fake_quant_per_token(x, bits) is x
    assert fake_quant_kv(x, bits) is x


@pytest.mark.parametrize("bits", [0, 9, 17, 4.0])
def test_bits_validated(bits):
    with pytest.raises(ValueError, match="bits"):
        fake_quant_per_token(torch.randn(3, 4), bits)


def test_matches_numpy_reference():
    x = torch.randn(7, 33) * torch.rand(7, 1) * 5
    got = fake_quant_per_token(x, 4, clip_ratio=0.9).double().numpy()
    xn = x.double().numpy()
    lo, hi = 0.9 * xn.min(-1, keepdims=True), 0.9 * xn.max(-1, keepdims=True)
    s = (hi - lo) / 15
    ref = lo + s * np.clip(np.round((xn - lo) / s), 0, 15)
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("round_zero", [False, True])
def test_error_bound_inside_clip_range(bits, round_zero):
    x = torch.randn(64, 128) * 3 + 0.5
    for ratio in (1.0, 0.9):
        q = fake_quant_per_token(x, bits, clip_ratio=ratio, round_zero=round_zero)
        xd = x.double()
        lo, hi = xd.amin(-1, keepdim=True), xd.amax(-1, keepdim=True)
        if round_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        lo, hi = lo * ratio, hi * ratio
        s = (hi - lo) / (2**bits - 1)
        inside = (xd >= lo) & (xd <= hi)
        err = (q.double() - xd).abs()
        assert bool((err <= s / 2 * (1 + 1e-5) + 1e-7)[inside].all())
        assert max(len(torch.unique(r)) for r in q) <= 2**bits


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_idempotent(bits):
    x = torch.randn(16, 4, 64)
    q = fake_quant_per_token(x, bits)
    torch.testing.assert_close(fake_quant_per_token(q, bits), q, atol=1e-6, rtol=0)
    k = fake_quant_kv(x, bits, 16)
    torch.testing.assert_close(fake_quant_kv(k, bits, 16), k, atol=1e-6, rtol=0)


def test_round_zero_keeps_zero_exact():
    x = torch.randn(10, 32)
    x[:, 5] = 0.0
    q = fake_quant_per_token(x, 4, round_zero=True)
    assert torch.all(q[:, 5] == 0)


def test_symmetric_grid():
    x = torch.randn(8, 40)
    q = fake_quant_per_token(x, 4, asym=False)
    s = x.abs().amax(-1, keepdim=True) / 7
    k = q / s
    torch.testing.assert_close(k, torch.round(k), atol=1e-4, rtol=0)
    assert bool((k.round() >= -8).all() and (k.round() <= 7).all())
    assert ((q - x).abs() <= s / 2 + 1e-6).all()
    with pytest.raises(ValueError):
        fake_quant_per_token(x, 1, asym=False)


def test_ste_gradient_masks_clipped():
    x = torch.randn(6, 50, requires_grad=True)
    fake_quant_per_token(x, 4, clip_ratio=0.7).sum().backward()
    xd = x.detach()
    inside = (xd >= 0.7 * xd.amin(-1, keepdim=True)) & (xd <= 0.7 * xd.amax(-1, keepdim=True))
    assert 0 < inside.float().mean() < 1
    assert torch.equal(x.grad, inside.float())


def test_dtype_preserved_bf16():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    q = fake_quant_per_token(x, 4)
    assert q.dtype == torch.bfloat16 and q.shape == x.shape


def test_kv_groups_per_token_and_head():
    x = torch.randn(2, 3, 5, 64)  # [B, heads, T, head_dim]
    q = fake_quant_kv(x, 4, group_size=16)
    ref = fake_quant_per_token(x.reshape(2, 3, 5, 4, 16), 4).reshape(x.shape)
    assert torch.equal(q, ref)
    # default group = whole head_dim = per token and head
    assert torch.equal(fake_quant_kv(x, 4), fake_quant_per_token(x, 4))
    # heads are independent: scaling head 1 leaves head 0 unchanged
    y = x.clone()
    y[:, 1] *= 100
    assert torch.equal(fake_quant_kv(y, 4)[:, 0], fake_quant_kv(x, 4)[:, 0])
    with pytest.raises(ValueError, match="divide"):
        fake_quant_kv(x, 4, group_size=24)


@pytest.mark.parametrize("asym,round_zero", [(True, False), (True, True), (False, False)])
def test_in_place_chain_equals_plain_formula_and_leaves_input_alone(asym, round_zero):
    """The implementation runs its element-wise chain in place; values must equal the textbook formula bit for bit."""
    torch.manual_seed(11)
    x = torch.randn(7, 3, 96) * torch.rand(7, 3, 1) * 5
    x0 = x.clone()
    b, r = 4, 0.9
    if asym:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        if round_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        lo, hi = lo * r, hi * r
        s = ((hi - lo) / (2**b - 1)).clamp_min(1e-10)
        if round_zero:
            z = torch.round(-lo / s)
            ref = (torch.clamp(torch.round(x / s) + z, 0, 2**b - 1) - z) * s
        else:
            ref = lo + s * torch.clamp(torch.round((x - lo) / s), 0, 2**b - 1)
    else:
        s = (x.abs().amax(-1, keepdim=True) * r / 7).clamp_min(1e-10)
        ref = torch.clamp(torch.round(x / s), -8, 7) * s
    q = fake_quant_per_token(x, b, clip_ratio=r, asym=asym, round_zero=round_zero)
    assert torch.equal(q, ref)
    assert torch.equal(x, x0)


# --------------------------------------------------------------------------------------------- integer form
def _plain_codes(x, b, r, asym, round_zero):
    """Textbook codes (float) of the module docstring, shifted into 0..2**b - 1 for the symmetric grid."""
    if asym:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        if round_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        lo, hi = lo * r, hi * r
        s = ((hi - lo) / (2**b - 1)).clamp_min(1e-10)
        if round_zero:
            return torch.clamp(torch.round(x / s) + torch.round(-lo / s), 0, 2**b - 1)
        return torch.clamp(torch.round((x - lo) / s), 0, 2**b - 1)
    s = (x.abs().amax(-1, keepdim=True) * r / (2 ** (b - 1) - 1)).clamp_min(1e-10)
    return torch.clamp(torch.round(x / s), -(2 ** (b - 1)), 2 ** (b - 1) - 1) + 2 ** (b - 1)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("asym,round_zero", [(True, False), (True, True), (False, False)])
def test_integer_form_has_the_fake_quant_codes(bits, asym, round_zero):
    """quantize_per_token gives the fake quantizer's codes; (codes - zero) * scale is its value: bit for bit with an
    integer zero point (round_zero, symmetric), to float rounding with the default float zero point ``-lo / s``."""
    torch.manual_seed(5)
    x = torch.randn(9, 4, 80) * torch.rand(9, 4, 1) * 6 + 0.4
    x0 = x.clone()
    r = 0.9
    c, s, z = quantize_per_token(x, bits, r, asym, round_zero)
    assert c.dtype == torch.uint8 and c.shape == x.shape and s.shape == z.shape == x.shape[:-1]
    assert s.dtype == z.dtype == torch.float32
    assert torch.equal(c.float(), _plain_codes(x, bits, r, asym, round_zero))
    fq = fake_quant_per_token(x, bits, r, asym, round_zero)
    xh = dequantize_per_token(c, s, z)
    if round_zero or not asym:
        assert torch.equal(z, z.round())
        assert torch.equal(xh, fq)
    else:
        assert not torch.equal(z, z.round())  # the zero point is a float, as in fake quantization
        torch.testing.assert_close(xh, fq, rtol=0, atol=1e-5 * float(x.abs().max()))
    assert torch.equal(x, x0)


@pytest.mark.parametrize("shape", [(1, 64), (5, 200), (2, 3, 33)])
def test_a4_integer_form_error_bound(shape):
    x = torch.randn(*shape) * 4 + 0.5
    c, s, z = quantize_per_token(x, 4)
    assert int(c.max()) <= 15
    xh = (c.double() - z.double().unsqueeze(-1)) * s.double().unsqueeze(-1)
    # clip_ratio 1: the grid spans [min, max] exactly, every element is within half a step
    assert ((x.double() - xh).abs() <= s.double().unsqueeze(-1) / 2 * (1 + 1e-5)).all()
    assert torch.allclose(dequantize_per_token(c, s, z).double(), xh, atol=1e-6)


def test_integer_form_edge_cases_and_dtypes():
    x = torch.zeros(2, 16)
    c, s, z = quantize_per_token(x, 4)
    assert torch.equal(dequantize_per_token(c, s, z), x)  # exact zeros, no NaN
    const = torch.full((3, 8), 2.5)  # constant token: zero range, the smallest step
    c, s, z = quantize_per_token(const, 4)
    torch.testing.assert_close(dequantize_per_token(c, s, z), const, rtol=1e-6, atol=0)
    xh16 = torch.randn(3, 40).half()
    c, s, z = quantize_per_token(xh16, 4, clip_ratio=0.9)
    assert s.dtype == torch.float32 and z.dtype == torch.float32
    torch.testing.assert_close(dequantize_per_token(c, s, z), fake_quant_per_token(xh16, 4, 0.9).float(),
                               rtol=0, atol=2e-3)  # the fake-quant value is rounded to fp16
    c, s, z = quantize_per_token(torch.randn(3, 40, dtype=torch.float64), 4)
    assert s.dtype == torch.float64 and dequantize_per_token(c, s, z).dtype == torch.float64
    for bits in (None, 16):
        with pytest.raises(ValueError, match="bits"):
            quantize_per_token(x, bits)


def test_cuda_style_reciprocal_scale_is_one_ulp_off_the_division():
    """Torch on CUDA divides a tensor by a Python scalar as a product with the scalar's reciprocal; torch on the CPU
    and the kernels (``div_rn``) divide. Emulated here: ``(hi - lo) * float32(1/15)`` is one ULP off the correctly
    rounded ``(hi - lo) / 15`` on most tokens, enough to move an activation code at a rounding tie. So a required-zero
    code comparison against the kernel (``benchmarks/gpu_check.py``) must compute ``quantize_per_token`` on the CPU,
    whose scale is the division, bit for bit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 576, generator=g)
    width = x.amax(-1) - x.amin(-1)
    exact = (width.double() / 15).float()  # the correctly rounded float32 quotient
    rcp = width * torch.tensor(1 / 15, dtype=torch.float32)
    off = rcp != exact
    assert off.float().mean() > 0.3  # 71 % of these tokens
    ulp = torch.nextafter(exact, torch.full_like(exact, math.inf)) - exact
    assert ((rcp - exact).abs() <= ulp).all()  # at most one ULP
    _, s, _ = quantize_per_token(x, 4)
    assert torch.equal(s, exact)  # the CPU quantizer divides
    # under the emulated CUDA scale a code can move (by one step) only where (x - lo) / s sits within rounding of a
    # half-integer: rare (none of these 2.4 M), but a required-zero count of mismatches must not depend on it
    lo = x.amin(-1, keepdim=True)
    codes_rcp = (x - lo).div(rcp[:, None]).round().clamp(0, 15)
    assert ((codes_rcp - quantize_per_token(x, 4)[0].float()).abs() <= 1).all()
    # the library's own quantizer divides by a tensor on the activations' device, never by a Python number (which
    # CUDA torch would turn into the reciprocal product): on a GPU it then computes the kernel's scale
    import inspect

    from rcp_lib.quant import activations as A

    src = inspect.getsource(A._per_token_grid)
    assert "/ (L - 1)" not in src and "/ qmax" not in src
