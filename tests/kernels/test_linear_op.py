"""``torch.ops.rcp.w2a4_linear`` (kernels/op.py): the deployed linear as one registered op with a fake. Its reference
path is, operation for operation, what the layer computed before the op existed (online Hadamard, per-token
quantizer, the GEMV op, bias); its fused path is the Triton two-launch function itself (under the interpreter here);
:class:`rcp_lib.kernels.packed_linear.PackedLinear` goes through it on every path but the CPU decode cache."""

import pytest
import torch
import torch.nn.functional as F

import rcp_lib.kernels as rk
from rcp_lib.kernels import dequantize, pack_codes, w2a4_gemv_reference
from rcp_lib.kernels.layout import weight_row_sums
from rcp_lib.kernels.op import w2a4_linear
from rcp_lib.quant.activations import quantize_per_token
from rcp_lib.rotation.online import OnlineHadamard

needs_triton = pytest.mark.skipif(not rk.triton_available(), reason="triton not installed")


def _problem(B, N, K, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), dtype=torch.uint8, generator=g)
    lut = torch.randn(N, K // G, 4, generator=g).sort(-1).values.half()
    return pack_codes(codes), lut, torch.randn(B, K, generator=g) * 3, torch.randn(N, generator=g)


@pytest.mark.parametrize("block", [None, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_path_is_the_layer_sequence(block, dtype):
    K, G, N = 128, 64, 9
    packed, lut, x, bias = _problem(5, N, K, G)
    x = x.to(dtype)
    xr = OnlineHadamard(K, block)(x)
    c, s, z = quantize_per_token(xr, 4, 0.9)
    want = w2a4_gemv_reference(c, s, z, packed, lut, K, G, 2).to(dtype) + bias.to(dtype)
    for path in ("torch", "auto"):
        y = w2a4_linear(x, packed, lut, K, G, 2, 4, 0.9, bias, hadamard_n=K, hadamard_block=block or 0, path=path)
        assert y.dtype == dtype and torch.equal(y, want)
    # A16: the dequantized weight in the input's dtype, as F.linear computes it
    y = w2a4_linear(x, packed, lut, K, G, 2, None, 1.0, bias)
    assert torch.equal(y, F.linear(x, dequantize(packed, lut, K, G, dtype=dtype)) + bias.to(dtype))


def test_op_schema_and_fake():
    K, G, N = 128, 64, 7
    packed, lut, x, bias = _problem(3, N, K, G)
    args = (x, packed, lut, x.new_empty(0), bias, None, K, G, 2, 4, 1.0, 0, 0, "torch", False)
    torch.library.opcheck(torch.ops.rcp.w2a4_linear.default, args, test_utils=("test_schema", "test_faketensor"))
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    y = torch.ops.rcp.w2a4_linear(*meta)
    assert y.device.type == "meta" and y.shape == (3, N) and y.dtype == x.dtype
    gu = torch.cat([x, x.flip(-1)], -1)  # glu: [gate | up], [B, 2K] -> [B, N]
    glu_args = (gu, *args[1:-1], True)
    torch.library.opcheck(torch.ops.rcp.w2a4_linear.default, glu_args, test_utils=("test_schema", "test_faketensor"))
    assert torch.ops.rcp.w2a4_linear(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in glu_args]).shape == (3, N)
    with pytest.raises(ValueError, match=r"\[B, 2K=256\]"):
        w2a4_linear(x, packed, lut, K, G, glu=True)
    # glu defaults to False in the schema (a call written before it existed); the op checks the width itself
    assert torch.equal(torch.ops.rcp.w2a4_linear(*args[:-1]), torch.ops.rcp.w2a4_linear(*args))
    with pytest.raises(ValueError, match=r"\[B, 2K=256\]"):
        torch.ops.rcp.w2a4_linear(x, *args[1:-1], True)
    with pytest.raises(ValueError, match="path"):
        w2a4_linear(x, packed, lut, K, G, path="cuda")
    with pytest.raises(ValueError, match="wsum"):
        w2a4_linear(x, packed, lut, K, G, path="fused")


@needs_triton
@pytest.mark.parametrize("B,planes", [(2, False), (2, True), (6, False)])
def test_fused_path_is_the_triton_function(B, planes):
    """Through the op, bit for bit the two-launch function (split-K GEMV, bit-serial planes, GEMM)."""
    from rcp_lib.kernels.layout import weight_bitplanes
    from rcp_lib.kernels.triton_w2a4 import w2a4_linear_triton

    K, G, N = 128, 64, 8
    packed, lut, x, bias = _problem(B, N, K, G, seed=B)
    ws = weight_row_sums(packed, lut, K, G)
    wp = weight_bitplanes(packed, K) if planes else None
    y = w2a4_linear(x, packed, lut, K, G, 2, 4, 0.9, bias, hadamard_n=K, hadamard_block=64, path="fused", wsum=ws,
                    wplanes=wp)
    want = w2a4_linear_triton(x, packed, lut, ws, K, G, 4, 0.9, bias, hadamard_block=64, apply_hadamard=True,
                              out_dtype=x.dtype, wplanes=wp)
    assert torch.equal(y, want)
    # against the reference path: the pre-kernel's fp32 Hadamard sums in another order, so an activation code may
    # move by one at a rounding tie (tests/kernels/test_fused.py); without the Hadamard the codes are the same
    ref = w2a4_linear(x, packed, lut, K, G, 2, 4, 0.9, bias, path="torch")
    y = w2a4_linear(x, packed, lut, K, G, 2, 4, 0.9, bias, path="fused", wsum=ws, wplanes=wp)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-5 * float(ref.abs().max()))


def test_packed_linear_calls_the_registered_op(monkeypatch):
    """Every path of PackedLinear but the CPU decode cache goes through ``torch.ops.rcp.w2a4_linear``."""
    from rcp_lib.kernels import op as O
    from rcp_lib.deploy import PackedLinear

    K, G, N = 128, 64, 8
    packed, lut, x, bias = _problem(3, N, K, G)
    layer = PackedLinear(packed, lut, K, G, 2, bias=bias, act_bits=4, act_clip_ratio=1.0)
    layer.decode_cache = False
    seen = []
    real = O.w2a4_linear

    def spy(*a, **k):
        seen.append(k.get("path"))
        return real(*a, **k)

    monkeypatch.setattr(O, "w2a4_linear", spy)
    backends = ("torch", "auto", "triton") if rk.triton_available() else ("torch", "auto")
    for backend in backends:
        layer.backend = backend
        layer(x)
    assert seen == ["torch", "auto", "fused"][:len(backends)]
    layer.decode_cache, layer.backend = True, None  # the CPU decode cache: fake quantization's own operations
    layer(x)
    assert len(seen) == len(backends)
