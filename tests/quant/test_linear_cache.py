import torch
from torch import nn

from rcp_lib.quant.linear import QuantLinear
from rcp_lib.quant.quantizers import WeightQuantConfig


def test_eval_cache_follows_weight_and_quantizer_changes():
    lin = nn.Linear(64, 8, bias=False)
    q = QuantLinear.from_linear(lin, WeightQuantConfig(bits=2, group_size=32, method="ldp", lwc=True))
    x = torch.randn(3, 64)
    with torch.no_grad():
        a = q(x)
        assert torch.equal(a, q(x))
        q.weight.mul_(2.0)  # in-place change of the latent weight
        b = q(x)
        assert torch.allclose(b, x @ q.weight_quantizer(q.weight).T)
        assert not torch.allclose(a, b)
        for p in q.quant_parameters():  # quantizer parameters change -> re-quantized
            p.add_(0.5)
        c = q(x)
        assert torch.allclose(c, x @ q.weight_quantizer(q.weight).T)
    d = q(x)  # with autograd: never cached
    assert d.requires_grad and torch.allclose(c, d)
