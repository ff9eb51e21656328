"""The table's methods: rotation seeded by the profile, GSR blocks = the weight group, block-Hadamard controls,
clip-searched uniform baselines."""

import dataclasses

import pytest

from rcp_lib import experiments as X
from rcp_lib.profiles import get_profile
from rcp_lib.rotation.fuse import RotationConfig


def test_gsr_block_defaults_to_the_weight_group_and_is_recorded():
    for name, gs in (("cpu", 64), ("paper", 128)):
        P = dataclasses.replace(get_profile(name, qat_ablation_rows=True), methods=None)
        ms = {(m.name, m.setting): m for m in X.all_methods(P)}
        for key in (("GSR-GPTQ", "W2A4KV4"), ("BlockHadamard-GPTQ", "W2A4KV4"), ("RCP+GSR", "W2A4KV4"),
                    ("RCP+BlockHadamard", "W2A4KV4")):
            rot = ms[key].rotation_config(P)
            assert rot.r1_block == gs and rot.seed == P.seed
            assert X.method_config(ms[key], P)["rotation"]["r1_block"] == gs
        assert ms[("QuaRot-GPTQ", "W2A4KV4")].rotation_config(P).r1 == "random_hadamard"
    P = get_profile("cpu", seed=3)
    assert X.all_methods(P)[1].rotation_config(P) is None  # RTN: no rotation
    assert [m for m in X.all_methods(P) if m.name == "QuaRot-RTN"][0].rotation_config(P).seed == 3


def test_gsr_without_block_is_refused():
    with pytest.raises(ValueError, match="r1_block"):
        RotationConfig(r1="gsr").validate()


def test_uniform_baselines_use_the_clip_search():
    P = dataclasses.replace(get_profile("cpu"), methods=None)
    for m in X.all_methods(P):
        if m.family == "ptq":
            assert m.recipe(P).quant.weight.clip_search == "mse", m.name
    names = {(m.name, m.setting) for m in X.all_methods(P)}
    assert ("BlockHadamard-GPTQ", "W2A16KV16") in names and ("BlockHadamard-GPTQ", "W4A4KV4") not in names


def test_ptq_weights_are_keyed_by_what_determines_them():
    """QuaRot's GPTQ runs with 16-bit activations, so W2A4KV4 and W2A16KV16 share one set of weights (see
    test_gptq_model_hessians_from_16bit_activations); the bits, the rotation seed and the algorithm do not."""
    P = get_profile("cpu")
    ms = {(m.name, m.setting): m for m in X.all_methods(P)}
    k = lambda name, s, prof=P: X.ptq_key(ms[(name, s)], prof)  # noqa: E731
    assert k("QuaRot-GPTQ", "W2A4KV4") == k("QuaRot-GPTQ", "W2A16KV16")
    assert k("QuaRot-RTN", "W2A4KV4") == k("QuaRot-RTN", "W2A16KV16")
    assert k("QuaRot-GPTQ", "W2A4KV4") != k("QuaRot-GPTQ", "W4A4KV4")
    assert k("QuaRot-GPTQ", "W2A4KV4") != k("QuaRot-RTN", "W2A4KV4")
    assert k("QuaRot-GPTQ", "W2A4KV4") != k("GSR-GPTQ", "W2A4KV4")
    assert k("QuaRot-GPTQ", "W2A4KV4") != k("QuaRot-GPTQ", "W2A4KV4", get_profile("cpu", seed=1))
    assert k("QuaRot-GPTQ", "W2A4KV4") != k("QuaRot-GPTQ", "W2A4KV4", get_profile("cpu", calib_windows=8))
    assert k("QuaRot-RTN", "W2A4KV4") == k("QuaRot-RTN", "W2A4KV4", get_profile("cpu", calib_windows=8))


@pytest.mark.heavy
def test_ptq_cache_freezes_rtn_weights_bit_for_bit(monkeypatch, tmp_path, capsys):
    """A clip-searched RTN model is frozen to codes + levels equal to its quantizer's output; the second
    setting loads them (cache hit) instead of searching again."""
    import copy

    import torch

    from rcp_lib import models as M
    from rcp_lib.quant.apply import quantize_model, quantized_linears
    from rcp_lib.quant.quantizers import FrozenLevelsQuantizer

    monkeypatch.setenv("RCP_CACHE", str(tmp_path))
    P = get_profile("smoke", w_group_size=32)
    base = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128)
    out = {}
    for s in ("W2A4KV4", "W2A16KV16"):
        m = X.method("QuaRot-RTN", s)
        model = quantize_model(copy.deepcopy(base), m.recipe(P).quant)
        ref = {n: q.quantized_weight().clone() for n, q in quantized_linears(model)}
        X._ptq_cached(model, m, P, progress=False)
        assert all(isinstance(q.weight_quantizer, FrozenLevelsQuantizer) for _, q in quantized_linears(model))
        assert all(torch.equal(q.quantized_weight(), ref[n]) for n, q in quantized_linears(model))
        out[s] = capsys.readouterr().err
    assert "miss ptq-rtn-" in out["W2A4KV4"] and "hit ptq-rtn-" in out["W2A16KV16"]
    assert len(list((tmp_path / "ptq").glob("*.safetensors"))) == 1
