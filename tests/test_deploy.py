"""A trained fake-quant layer and its deployed form agree: QuantLinear (LDP + LWC weights, A4 inputs) after a few
optimizer steps, exported and deployed as PackedLinear (packed codes, float32 LUT, the registered W2A4 op)."""

import pytest
import torch
from torch import nn

from rcp_lib.kernels import unpack_codes
from rcp_lib.packing import PackedLinear
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
