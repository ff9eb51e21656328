"""A gated MLP's SiLU and product fused into ``down_proj``'s activation quantizer (issue 36, "per-token min / max and
R4 produced in the previous op's epilogue"): the pre-kernel and the one-launch bit-serial kernel read ``[gate | up]``
and quantize ``silu(gate) * up`` as torch computes it in the activations' dtype. References: an exact numpy
emulation of the kernel's GLU (checked against torch's own ``F.silu(gate) * up``), and the kernels run on torch's
product, which they must reproduce."""

import numpy as np
import pytest
import torch

import rcp_lib.kernels as rk
from rcp_lib.kernels import pack_codes
from rcp_lib.kernels.layout import weight_bitplanes, weight_row_sums
from rcp_lib.kernels.reference import glu_input, w2a4_linear_reference

needs_triton = pytest.mark.skipif(not rk.triton_available(), reason="triton not installed")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's exp of -gate = 120


def _gu(B, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(B, K, generator=g) * 3
    up = torch.randn(B, K, generator=g) * 2
    gate[:, 5] = 40.0  # exp(-g) underflows
    gate[:, 6] = -120.0  # exp(-g) overflows: silu = -0.0
    return torch.cat([gate, up], 1).to(dtype)


def _glu_numpy(gu: torch.Tensor) -> torch.Tensor:
    """What the kernel's _glu_fn computes, in numpy float32 (the interpreter's exp is numpy's): g / (1 + exp(-g))
    rounded to the dtype, times up, rounded to the dtype (torch's round-to-nearest-even conversion)."""
    K = gu.shape[1] // 2
    g = gu[:, :K].float().numpy()
    u = gu[:, K:].float().numpy()
    with np.errstate(over="ignore"):
        a = torch.from_numpy(g / (np.float32(1) + np.exp(-g))).to(gu.dtype).float().numpy()
    return torch.from_numpy(a * u).to(gu.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_emulation_is_torchs_product(dtype):
    """The kernel's GLU formula is torch's ``F.silu(gate) * up`` up to the exp's last bit: identical in fp16 / bf16
    but for a product at a rounding tie of the two exps, within two fp32 ulps in fp32 (torch's vectorised exp against
    numpy's)."""
    gu = _gu(4, 512, dtype)
    want, got = glu_input(gu), _glu_numpy(gu)
    if dtype != torch.float32:
        assert (got != want).sum().item() <= 2
        assert torch.allclose(got.float(), want.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-3, atol=0)
    else:
        assert torch.allclose(got, want, rtol=2.5e-7, atol=1e-30)
    assert got[:, 6].eq(0).all() and want[:, 6].eq(0).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K,hb,planes", [(256, None, False), (256, None, True), (192, 192, True), (512, 128, False)])
def test_pre_kernel_glu_is_the_pre_kernel_on_the_product(dtype, K, hb, planes):
    """``glu=True`` on ``[gate | up]`` gives, bit for bit, the pre-kernel's output on the emulated product (codes or
    planes, scale, zero; with a Hadamard of 192 = 12 · 16 rows mixed, or blocks of 128), and agrees with the pre-kernel
    on torch's own product (codes within one where the two exps round differently)."""
    from rcp_lib.kernels.triton_w2a4 import quantize_activations_triton as q

    gu = _gu(3, K, dtype, seed=K)
    kw = dict(hadamard_block=hb, apply_hadamard=hb is not None, planes=planes)
    G = None if planes else 64
    got = q(gu, 4, 0.9, G, glu=True, **kw)
    want = q(_glu_numpy(gu), 4, 0.9, G, **kw)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    torch_ = q(glu_input(gu), 4, 0.9, G, **kw)
    assert torch.allclose(got[1], torch_[1], rtol=1e-5) and torch.allclose(got[2], torch_[2], rtol=1e-5, atol=1e-4)
    if not planes:
        assert (got[0].int() - torch_[0].int()).abs().max().item() <= 1
    with pytest.raises(ValueError, match="even width"):
        q(gu[:, 1:], 4, 0.9, G, glu=True, **kw)


@needs_triton
@pytest.mark.parametrize("hb", [None, 256])
def test_fused_linear_glu_is_the_linear_on_the_product(hb):
    """The whole fused linear with ``glu`` (the one-launch bit-serial kernel without a Hadamard, pre-kernel planes
    with one; the select GEMV and the GEMM) equals the same path on the emulated product bit for bit, and the
    registered op's reference with ``glu`` (torch's product) to the reference's own tolerance."""
    from rcp_lib.kernels.triton_w2a4 import w2a4_linear_triton

    N, K, G = 24, 256, 64
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 4, (N, K), dtype=torch.uint8, generator=g)
    lut = torch.randn(N, K // G, 4, generator=g).sort(-1).values.half()
    packed, bias = pack_codes(codes), torch.randn(N, generator=g)
    wsum = weight_row_sums(packed, lut, K, G)
    planes = weight_bitplanes(packed, K)
    for B, wp in ((1, planes), (2, planes), (3, None), (6, None)):
        gu = _gu(B, K, torch.float32, seed=B)
        kw = dict(hadamard_block=hb, apply_hadamard=hb is not None, wplanes=wp)
        got = w2a4_linear_triton(gu, packed, lut, wsum, K, G, 4, 0.9, bias, glu=True, **kw)
        want = w2a4_linear_triton(_glu_numpy(gu), packed, lut, wsum, K, G, 4, 0.9, bias, **kw)
        assert torch.equal(got, want), (B, wp is not None)
        ref = w2a4_linear_reference(gu, packed, lut, bias, K, G, 2, 4, 0.9, K if hb else 0, hb or 0, glu=True)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-2, B  # fp32 rounding and codes at a tie


@needs_triton
@pytest.mark.parametrize("K", [256, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_one_launch_glu_rounds_in_the_dtype_and_spans_chunks(dtype, K):
    """The one-launch bit-serial kernel with ``glu`` (no Hadamard: its quantizer runs inside the GEMV) rounds the
    SiLU and the product in each activation dtype (``ROUND``) and takes the per-token range over every chunk of the
    row (K = 2048: two chunks of 1024): bit for bit the same kernel on the emulated product."""
    from rcp_lib.kernels.triton_w2a4 import w2a4_linear_triton

    N, G = 16, 64
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 4, (N, K), dtype=torch.uint8, generator=g)
    lut = torch.randn(N, K // G, 4, generator=g).sort(-1).values.half()
    packed = pack_codes(codes)
    wsum, planes = weight_row_sums(packed, lut, K, G), weight_bitplanes(packed, K)
    gu = _gu(2, K, dtype, seed=K)
    gu[1, K + 1500 % K] = 50.0  # the second row's largest product sits in the second chunk when K = 2048
    gu[1, 1500 % K] = 8.0
    got = w2a4_linear_triton(gu, packed, lut, wsum, K, G, 4, 1.0, None, glu=True, wplanes=planes)
    want = w2a4_linear_triton(_glu_numpy(gu), packed, lut, wsum, K, G, 4, 1.0, None, wplanes=planes)
    assert torch.equal(got, want)
