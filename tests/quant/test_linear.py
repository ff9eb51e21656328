"""QuantLinear: exactness when off, composition of transform / act quant / weight quant, parameter groups."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rcp_lib.quant import QuantLinear, WeightQuantConfig, fake_quant_per_token, fake_quant_uniform


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("act_bits", [None, 16])
def test_all_off_is_exactly_linear(bias, act_bits):
    lin = nn.Linear(48, 20, bias=bias)
    q = QuantLinear.from_linear(lin, None, act_bits=act_bits)
    x = torch.randn(3, 7, 48)
    assert torch.equal(q(x), lin(x))
    assert q.weight is lin.weight and q.bias is lin.bias


def test_forward_composition_matches_reference():
    lin = nn.Linear(64, 16)
    wcfg = WeightQuantConfig(bits=3, group_size=32, method="rtn", lwc=False, clip_ratio=0.9)
    scale = nn.Linear(64, 64, bias=False)
    q = QuantLinear.from_linear(lin, wcfg, act_bits=4, act_clip_ratio=0.9, input_transform=scale)
    x = torch.randn(2, 5, 64)
    ref = F.linear(fake_quant_per_token(scale(x), 4, 0.9), fake_quant_uniform(lin.weight, 3, 32, 0.9), lin.bias)
    torch.testing.assert_close(q(x), ref, atol=1e-6, rtol=0)


def test_input_transform_assigned_later_is_used_and_registered():
    lin = nn.Linear(32, 8)
    q = QuantLinear.from_linear(lin, None, act_bits=4)
    t = nn.Linear(32, 32, bias=False)
    q.input_transform = t
    assert "input_transform" in dict(q.named_children())
    x = torch.randn(4, 32)
    assert torch.equal(q(x), F.linear(fake_quant_per_token(t(x), 4), lin.weight, lin.bias))


def test_parameter_groups_and_gradients():
    lin = nn.Linear(64, 16)
    wcfg = WeightQuantConfig(bits=2, group_size=16, method="ldp", lwc=True, ldp_init="lloyd")
    q = QuantLinear.from_linear(lin, wcfg, act_bits=4)
    quant = list(q.quant_parameters())
    latent = list(q.latent_parameters())
    assert {id(p) for p in latent} == {id(lin.weight), id(lin.bias)}
    assert {id(p) for p in quant} == {id(q.weight_quantizer.theta), id(q.weight_quantizer.gamma), id(q.weight_quantizer.beta)}
    assert {id(p) for p in q.parameters()} == {id(p) for p in quant + latent}
    assert q.weight_quantizer.theta.abs().sum() > 0  # lloyd init ran in from_linear
    q(torch.randn(8, 64)).pow(2).sum().backward()
    for p in quant + latent:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_export_and_repr_and_errors():
    lin = nn.Linear(64, 16)
    q = QuantLinear.from_linear(lin, WeightQuantConfig(bits=2, group_size=16), act_bits=4, act_clip_ratio=0.9)
    codes, levels = q.export()
    assert torch.equal(levels.gather(-1, codes.view(16, 4, 16).long()).view(16, 64), q.quantized_weight())
    r = repr(q)
    assert "w_bits=2" in r and "a_bits=4" in r and "a_clip_ratio=0.9" in r
    assert "w_bits=16" in repr(QuantLinear.from_linear(lin, None)) and "a_bits=16" in repr(QuantLinear.from_linear(lin, None))
    with pytest.raises(ValueError, match="layers.2.mlp.down_proj"):
        QuantLinear.from_linear(nn.Linear(576, 8), WeightQuantConfig(group_size=128), name="layers.2.mlp.down_proj")
    with pytest.raises(ValueError, match="bits"):
        QuantLinear.from_linear(lin, None, act_bits=0)
    with pytest.raises(ValueError):
        QuantLinear.from_linear(lin, None).export()


def test_state_dict_roundtrip():
    lin = nn.Linear(32, 8)
    wcfg = WeightQuantConfig(bits=2, group_size=16, method="ldp", lwc=True)
    q = QuantLinear.from_linear(lin, wcfg, act_bits=4)
    with torch.no_grad():
        q.weight_quantizer.theta.normal_()
    q2 = QuantLinear(32, 8, weight_config=wcfg, act_bits=4)
    q2.load_state_dict(q.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(q(x), q2(x))


_START_CONFIGS = {  # every kind of state init_from writes: LWC logits, static lo / hi (learned or fixed), log-multipliers,
    # LDP theta (per group or per row), with the searched clip and the Lloyd fit
    "ldp-lwc-mse-lloyd": WeightQuantConfig(bits=2, group_size=16, method="ldp", lwc=True, clip_init="mse",
                                           ldp_init="lloyd"),
    "ldp-static-log": WeightQuantConfig(bits=2, group_size=16, method="ldp", lwc=True, clip_init="mse", ldp_init="lloyd",
                                        range_mode="static", range_param="log"),
    "ldp-static-abs": WeightQuantConfig(bits=2, group_size=16, method="ldp", lwc=True, clip_init="mse",
                                        ldp_init="lloyd", range_mode="static"),
    "ldp-fixed-row": WeightQuantConfig(bits=2, group_size=-1, method="ldp", lwc=False, ldp_init="lloyd",
                                       ldp_granularity="row", range_mode="static"),
    "rtn-lwc-static": WeightQuantConfig(bits=2, group_size=16, method="rtn", lwc=True, clip_init="mse",
                                        range_mode="static", range_param="log"),
}


@pytest.mark.parametrize("name", list(_START_CONFIGS))
def test_a_loaded_state_needs_no_initialisation(name):
    """``from_linear(init=False)`` + ``load_state_dict`` gives the initialised layer bit for bit (what ``build`` does for
    a cached QAT student): every value ``init_from`` sets is in the state dict."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 24)
    wcfg = _START_CONFIGS[name]
    q = QuantLinear.from_linear(lin, wcfg, act_bits=4, act_clip_ratio=0.9)
    blank = QuantLinear.from_linear(nn.Linear(64, 24), wcfg, act_bits=4, act_clip_ratio=0.9, init=False)
    state = q.state_dict()
    assert any(not torch.equal(v, blank.state_dict()[k]) for k, v in state.items() if "quantizer" in k)  # init did work
    blank.load_state_dict(state, strict=True)
    x = torch.randn(5, 64)
    assert torch.equal(blank.quantized_weight(), q.quantized_weight())
    assert torch.equal(blank(x), q(x))
