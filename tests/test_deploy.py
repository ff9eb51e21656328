"""A trained fake-quant layer and its deployed form agree: QuantLinear (LDP + LWC weights, A4 inputs) after a few
optimizer steps, exported and deployed as PackedLinear (packed codes, float32 LUT, the registered W2A4 op)."""

import pytest
import torch
from torch import nn

from rcp_lib.kernels import unpack_codes
from rcp_lib.deploy import PackedLinear
from rcp_lib.quant import QuantLinear, WeightQuantConfig


def _trained_layer(K=96, N=40, G=32, act_clip_ratio=0.9, steps=5, seed=0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.2)
        lin.bias.copy_(torch.randn(N, generator=g) * 0.1)
    wcfg = WeightQuantConfig(bits=2, group_size=G, method="ldp", lwc=True, ldp_init="lloyd")
    q = QuantLinear.from_linear(lin, wcfg, act_bits=4, act_clip_ratio=act_clip_ratio)
    opt = torch.optim.AdamW([{"params": list(q.latent_parameters()), "lr": 1e-3},
                             {"params": list(q.quant_parameters()), "lr": 1e-2}])
    teacher = torch.randn(N, K, generator=g) * 0.2
    before = [p.detach().clone() for p in q.parameters()]
    for _ in range(steps):
        x = torch.randn(16, K, generator=g) * 2
        loss = (q(x) - x @ teacher.T).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, q.parameters()))  # every parameter was trained
    return q


@pytest.mark.parametrize("act_clip_ratio", [1.0, 0.9])
def test_trained_quant_linear_and_its_deployed_form_agree(act_clip_ratio):
    q = _trained_layer(act_clip_ratio=act_clip_ratio)
    p = PackedLinear.from_quant_linear(q, lut_dtype=torch.float32)
    codes, levels = q.export()
    assert (p.bits, p.group_size, p.in_features, p.out_features) == (2, 32, 96, 40)
    assert (p.act_bits, p.act_clip_ratio) == (4, act_clip_ratio)
    assert torch.equal(unpack_codes(p.qweight, 96), codes) and torch.equal(p.lut, levels)
    assert torch.equal(p.dequantized_weight(), q.quantized_weight().detach())  # the LUT holds the trained levels
    x = torch.randn(3, 7, 96) * 2
    with torch.no_grad():
        ref = q(x)
        for backend in ("torch", None):  # the reference directly, and torch.ops.rcp.w2a4_gemv
            p.backend = backend
            y = p(x)
            assert y.shape == ref.shape and y.dtype == ref.dtype
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_fp16_lut_is_the_kernel_format_and_close():
    q = _trained_layer()
    p16 = PackedLinear.from_quant_linear(q)
    assert p16.lut.dtype == torch.float16 and p16.qweight.dtype == torch.int32
    x = torch.randn(5, 96)
    with torch.no_grad():
        ref = q(x)
        rel = ((p16(x) - ref).norm() / ref.norm()).item()
    assert rel < 1e-2  # fp16 rounding of the levels only


def test_layer_without_weight_quantizer_is_refused():
    q = QuantLinear.from_linear(nn.Linear(32, 8), None, act_bits=4)
    with pytest.raises(ValueError, match="nothing to pack"):
        PackedLinear.from_quant_linear(q)


# -- the decode cache of the CPU path (issue item 8) -------------------------------------------------------------------

def _random_packed(K=192, N=40, G=64, act_bits=4, lut_dtype=torch.float32, seed=0):
    """A PackedLinear with random codes and levels, a bias and an online Hadamard on its input (R4's form)."""
    from rcp_lib.kernels import pack_codes
    from rcp_lib.rotation.online import OnlineHadamard

    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), generator=g, dtype=torch.uint8)
    lut = torch.randn(N, K // G, 4, generator=g).sort(-1).values.to(lut_dtype)
    bias = torch.randn(N, generator=g)
    return PackedLinear(pack_codes(codes, 2), lut, K, G, 2, bias, act_bits, 0.9, OnlineHadamard(K, 64))


@pytest.mark.parametrize("act_bits", [4, None])
@pytest.mark.parametrize("lut_dtype", [torch.float32, torch.float16])
def test_decode_cache_agrees_with_the_reference_op(act_bits, lut_dtype):
    """The cached path (decoded W_hat kept on the layer) and the W2A4 op's torch reference (the path without the
    cache) agree to float rounding (rel <= 1e-6), with a bias and an input transform, for a batch and one token."""
    from rcp_lib.kernels import w2a4_gemv_reference
    from rcp_lib.quant.activations import quantize_per_token

    p = _random_packed(act_bits=act_bits, lut_dtype=lut_dtype)
    for shape in [(3, 5, 192), (1, 1, 192)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3
        with torch.no_grad():
            p.decode_cache = True
            y = p(x)
            assert p._kernel_cache is not None and any(k.startswith("decoded") for k in p._kernel_cache[1])
            # the reference, written out: transform, quantize, torch reference op, bias
            xt = p.input_transform(x).reshape(-1, 192)
            if act_bits is None:
                ref = xt @ p.dequantized_weight().t()
            else:
                ref = w2a4_gemv_reference(*quantize_per_token(xt, 4, 0.9), p.qweight, p.lut, 192, 64, 2)
            ref = (ref + p.bias).reshape(*shape[:-1], 40)
            p.decode_cache = False
            y_off = p(x)
        assert y.shape == ref.shape and y.dtype == x.dtype
        assert ((y - ref).abs().max() / ref.abs().max()).item() <= 1e-6
        assert ((y_off - ref).abs().max() / ref.abs().max()).item() <= 1e-6


@pytest.mark.parametrize("act_clip_ratio", [1.0, 0.9])
def test_decode_cache_computes_the_fake_quant_layer_bit_for_bit(act_clip_ratio):
    """On the CPU the cached path runs QuantLinear's own operations on the same W_hat: the deployed layer's output
    equals the trained fake-quant layer's exactly (float32 LUT), with and without an input transform."""
    from rcp_lib.rotation.online import OnlineHadamard

    q = _trained_layer(K=128, act_clip_ratio=act_clip_ratio)
    x = torch.randn(4, 9, 128) * 2
    for transform in (None, OnlineHadamard(128, 64)):
        q.input_transform = transform
        p = PackedLinear.from_quant_linear(q, lut_dtype=torch.float32)
        with torch.no_grad():
            assert torch.equal(p(x), q(x))
            assert torch.equal(p(x[:1, :1]), q(x[:1, :1]))


def test_decode_cache_decodes_once_and_follows_the_buffers(monkeypatch):
    """One decode per layer, not one per call; rebuilt when the stored codes change in place; off with
    ``decode_cache = False`` (every call decodes)."""
    import rcp_lib.kernels.bitpack as bitpack
    import rcp_lib.kernels.reference as reference
    import rcp_lib.kernels.packed_linear as packed_linear

    calls = []
    real = bitpack.dequantize

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(packed_linear, "dequantize", counting)
    monkeypatch.setattr(reference, "dequantize", counting)
    p = _random_packed()
    x = torch.randn(1, 192)
    with torch.no_grad():
        first = p(x)
        for _ in range(4):
            assert torch.equal(p(x), first)
        assert len(calls) == 1
        p.qweight.bitwise_xor_(1)  # other codes, same storage: the cache key's version changes
        changed = p(x)
        assert len(calls) == 2 and not torch.equal(changed, first)
        p.decode_cache = False
        p(x)
        p(x)
        assert len(calls) == 4


def test_decode_cache_budget_and_identity(monkeypatch):
    """The decode caches of a process stay within PackedLinear.decode_cache_max_bytes: a layer over the budget
    computes the same output from a weight decoded for the call (one warning); freeing a cached layer returns its
    bytes; a deep copy holds no decoded weight; a new qweight tensor is decoded again."""
    import copy
    import gc
    import threading
    import warnings

    from rcp_lib.kernels import packed_linear as P

    torch.manual_seed(0)
    K, N, G = 64, 32, 32
    codes = torch.randint(0, 4, (N, K), dtype=torch.uint8)
    lut = torch.sort(torch.randn(N, K // G, 4), dim=-1).values
    layer = P.PackedLinear(P.pack_codes(codes, 2), lut, K, G, 2, None, 4, 0.9)
    x = torch.randn(3, K)
    budget = {"bytes": 0, "warned": False, "lock": threading.Lock()}
    monkeypatch.setattr(P, "_DECODE_BUDGET", budget)
    y = layer(x)
    assert budget["bytes"] == N * K * 4 and any(k.startswith("decoded") for k in layer._kernel_cache[1])
    twin = copy.deepcopy(layer)
    assert getattr(twin, "_kernel_cache", None) is None and torch.equal(twin(x), y)  # rebuilt, counted
    assert budget["bytes"] == 2 * N * K * 4
    del twin
    gc.collect()
    assert budget["bytes"] == N * K * 4
    other = P.PackedLinear(P.pack_codes(codes, 2), lut.clone(), K, G, 2, None, 4, 0.9)
    other.decode_cache_max_bytes = N * K * 4 + 1  # per layer
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y2 = other(x)
        other(x)
    assert torch.equal(y, y2) and budget["bytes"] == N * K * 4
    assert sum("decode cache full" in str(m.message) for m in w) == 1
    assert not any(k.startswith("decoded") for k in other._kernel_cache[1])
    layer.qweight = P.pack_codes((codes + 1) % 4, 2)  # a new tensor: the cache must not serve the old decode
    assert not torch.equal(layer(x), y)
