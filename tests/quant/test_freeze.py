"""QuantLinear.freeze / freeze_model: the frozen form (codes + level table) computes exactly what the learnable
quantizer did; GPTQ ends in the same frozen state."""

import pytest
import torch
from torch import nn

from rcp_lib import models as M
from rcp_lib.quant import FrozenLevelsQuantizer, QuantLinear, WeightQuantConfig, freeze_model
from rcp_lib.quant.apply import preset, quantize_model, quantized_linears
from rcp_lib.quant.calibrate import gptq_model

CONFIGS = {
    "rtn": WeightQuantConfig(bits=2, group_size=32, method="rtn", lwc=False),
    "rtn-clip": WeightQuantConfig(bits=3, group_size=32, method="rtn", lwc=False, clip_ratio=0.9),
    "rtn-mse": WeightQuantConfig(bits=2, group_size=32, method="rtn", lwc=False, clip_search="mse"),
    "rtn-lwc": WeightQuantConfig(bits=4, group_size=16, method="rtn", lwc=True),
    "ldp-lwc": WeightQuantConfig(bits=2, group_size=32, method="ldp", lwc=True),
    "ldp-lloyd-row": WeightQuantConfig(bits=2, group_size=-1, method="ldp", lwc=False, ldp_init="lloyd",
                                       ldp_granularity="row"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_freeze_is_bit_identical(name):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(64, 24), CONFIGS[name], act_bits=4, act_clip_ratio=0.9)
    with torch.no_grad():  # a trained quantizer, not the initial one
        for p in q.quant_parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        ref_w, ref_y = q.quantized_weight().clone(), q(x)
        codes, levels = q.export()
    assert q.freeze() is q and q.frozen and isinstance(q.weight_quantizer, FrozenLevelsQuantizer)
    with torch.no_grad():
        assert torch.equal(q.quantized_weight(), ref_w)
        assert torch.equal(q(x), ref_y)
    assert torch.equal(q.weight, ref_w)  # the latent weight is now the quantized weight
    assert list(q.quant_parameters()) == []
    c2, l2 = q.export()
    assert torch.equal(c2, codes) and torch.equal(l2, levels)
    q.freeze()  # idempotent
    with torch.no_grad():
        assert torch.equal(q(x), ref_y)


def test_freeze_without_weight_quantizer_is_a_no_op():
    lin = nn.Linear(16, 8)
    q = QuantLinear.from_linear(lin, None, act_bits=4)
    w = q.weight.detach().clone()
    assert q.freeze() is q and q.weight_quantizer is None and torch.equal(q.weight, w)
    with pytest.raises(ValueError, match="no weight quantizer"):
        q.freeze(torch.zeros(8, 16, dtype=torch.uint8), torch.zeros(8, 1, 4))


def test_freeze_refuses_mismatched_codes():
    q = QuantLinear.from_linear(nn.Linear(32, 8), CONFIGS["rtn"])
    with pytest.raises(ValueError, match="codes"):
        q.freeze(torch.zeros(8, 16, dtype=torch.uint8), torch.zeros(8, 1, 4))
    with pytest.raises(ValueError, match="both"):
        q.freeze(torch.zeros(8, 32, dtype=torch.uint8))


def _tiny():
    return M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=96)


def test_freeze_model_keeps_the_logits():
    m = quantize_model(_tiny(), preset("W2A4KV4", w_group_size=32))
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(ids).logits
    assert freeze_model(m) is m
    assert all(q.frozen for _, q in quantized_linears(m))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref)


def test_gptq_ends_frozen():
    m = quantize_model(_tiny(), preset("W2A4KV4", w_group_size=32).with_weight(method="rtn", lwc=False))
    gptq_model(m, torch.randint(0, 96, (4, 16)), progress=False)
    qs = [q for _, q in quantized_linears(m)]
    assert qs and all(q.frozen for q in qs)
    assert all(torch.equal(q.weight, q.weight_quantizer(q.weight)) for q in qs)


def test_freeze_model_shows_the_clip_search_progress(tmp_path, monkeypatch):
    """The RTN clip search of an export runs inside freeze_model: with ``progress`` it reports through the project's
    progress helper (here its batch log, ``$RCP_PROGRESS_LOG``), one bar over the layers labelled "RTN clip search";
    the PTQ build passes its ``progress`` on."""
    import importlib
    import inspect
    import re

    build = importlib.import_module("rcp_lib.experiments.build")

    log = tmp_path / "progress.log"
    monkeypatch.setenv("RCP_PROGRESS_LOG", str(log))
    m = M.tiny_llama(hidden=64, intermediate=96, heads=2, kv_heads=1, layers=1, vocab=64)
    quantize_model(m, preset("W2A4KV4", w_group_size=32).with_weight(method="rtn", lwc=False, clip_search="mse"))
    freeze_model(m, progress=True)
    text = log.read_text()
    assert re.search(r"RTN clip search.*\b(\d+)/\1\b", text), text  # the bar reached the last layer
    assert all(isinstance(q.weight_quantizer, FrozenLevelsQuantizer) for _, q in quantized_linears(m))
    assert "freeze_model(model, progress=progress)" in inspect.getsource(build._ptq_cached)
