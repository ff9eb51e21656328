"""save_quantized / load_quantized: packed tensors round-trip to the fake-quant model; bad folders are refused.
(The Hugging Face side of the same folder, from_pretrained / lm_eval / sharding, is tested in test_hf.py.)"""

import copy
import json
from dataclasses import replace

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.packing import PackedFormatError, PackedLinear, load_quantized, packed_model_bytes, save_quantized
from rcp_lib.quant.apply import QuantConfig, quantize_model
from rcp_lib.quant.calibrate import gptq_model
from rcp_lib.rotation.fuse import RotationConfig, rotate_model


def _model(q: QuantConfig, r1="gsr"):
    m = M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1, layers=2, vocab=128)
    rotate_model(m, RotationConfig(r1=r1, r1_block=32 if r1 == "gsr" else None))
    return quantize_model(m, q)


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("q", [QuantConfig(w_group_size=32), QuantConfig(w_group_size=32, a_bits=16, kv_bits=16),
                               QuantConfig(w_bits=4, w_group_size=32)], ids=lambda q: q.label)
def test_round_trip_logits_and_generation(tmp_path, q):
    m = _model(q)
    with torch.no_grad():
        ref = m(IDS).logits
        gen = m.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False)
    save_quantized(m, tmp_path / "f32", dtype=torch.float32)
    loaded, _ = load_quantized(tmp_path / "f32")
    assert sum(isinstance(x, PackedLinear) for x in loaded.modules()) == 14
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 1e-5
        assert torch.equal(gen, loaded.generate(IDS[:1, :5], max_new_tokens=8, do_sample=False))
    if q.act.bits == 16:  # fp16 storage: within fp16 rounding (with A4, rounding flips of the 4-bit grid amplify it)
        save_quantized(m, tmp_path / "f16")
        l16, _ = load_quantized(tmp_path / "f16")
        with torch.no_grad():
            assert _rel(ref, l16(IDS).logits) < 3e-3


def test_gptq_model_round_trip(tmp_path):
    m = _model(QuantConfig(w_group_size=32, w_method="rtn", w_lwc=False))
    gptq_model(m, torch.randint(0, 128, (16, 32)), progress=False)
    with torch.no_grad():
        ref = m(IDS).logits
    save_quantized(m, tmp_path / "g", dtype=torch.float32)
    loaded, _ = load_quantized(tmp_path / "g")
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 1e-5


def test_three_bits_cannot_be_packed(tmp_path):
    with pytest.raises(NotImplementedError, match="3 bits"):
        save_quantized(_model(QuantConfig(w_bits=3, w_group_size=32)), tmp_path / "x")


def test_unquantized_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="quantize_model"):
        save_quantized(M.tiny_llama(), tmp_path / "x")


@pytest.fixture()
def saved(tmp_path):
    save_quantized(_model(QuantConfig(w_group_size=32)), tmp_path / "m")
    return tmp_path / "m"


def test_wrong_format_version(saved):
    mp = saved / "quant_map.json"
    d = json.loads(mp.read_text())
    d["format_version"] = 99
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="version 99"):
        load_quantized(saved)


def test_truncated_file(saved):
    w = saved / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(PackedFormatError, match="checksum"):
        load_quantized(saved)


def test_map_names_a_missing_tensor(saved):
    mp = saved / "quant_map.json"
    d = json.loads(mp.read_text())
    d["tensors"]["model.layers.0.mlp.extra.qweight"] = {"shape": [1], "dtype": "int32"}
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="extra.qweight"):
        load_quantized(saved)


def test_shape_mismatch(saved):
    mp = saved / "quant_map.json"
    d = json.loads(mp.read_text())
    d["tensors"]["model.layers.0.mlp.up_proj.lut"]["shape"][0] += 1
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="up_proj.lut"):
        load_quantized(saved)


def test_accountant_matches_bytes_on_disk_for_embedded_model(embedded, tmp_path):
    from rcp_lib.memory import W2A4KV4, footprint

    model = copy.deepcopy(embedded[0])
    quantize_model(model, QuantConfig(w_group_size=64, w_method="rtn", w_lwc=False))
    save_quantized(model, tmp_path / "packed")
    disk = packed_model_bytes(tmp_path / "packed")
    f = footprint(model.config, replace(W2A4KV4, group_size=64, kv_group_size=64))
    block = sum(v for k, v in f.per_kind.items() if k.startswith(("attn_", "mlp_")))
    assert abs(disk["block_linears"] - block) / block < 0.01
    assert abs(disk["total"] - f.weights) / f.weights < 0.01
    assert abs(disk["file_bytes"] - f.weights) / f.weights < 0.01
    assert model.config.tie_word_embeddings is False  # quantize_model unties: lm_head is counted and stored


def _structure(model):
    """What the surgery decides, module by module: types (a deployed PackedLinear counts as the QuantLinear it
    replaces), online rotations, KV quantizers, activation settings, and the configs it records."""
    from rcp_lib.quant.linear import QuantLinear

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (PackedLinear, QuantLinear)):
            wq = getattr(mod, "weight_quantizer", None)
            bits = mod.bits if isinstance(mod, PackedLinear) else (None if wq is None else wq.config.bits)
            out[name] = ("quantized", bits, mod.act_bits, mod.act_clip_ratio, repr(mod.input_transform))
        elif "." not in name or not name.rsplit(".", 1)[-1].startswith(("weight_quantizer", "input_transform")):
            out[name] = (type(mod).__name__, mod.extra_repr())
    return out, model.config._attn_implementation, model.config.rcp_rotation, model.config.rcp_quant


def test_frozen_round_trip_re_runs_the_surgery(tmp_path):
    """A frozen, rotated W2A4KV4 model: the loaded model is the same surgery (module for module) as a freshly
    rotated + quantized one, and its logits equal the in-memory frozen model's."""
    from rcp_lib.quant.linear import freeze_model

    q = QuantConfig(w_group_size=32, lm_head_a_bits=8)  # lm_head's input quantizer is part of the surgery too
    m = freeze_model(_model(q))
    with torch.no_grad():
        ref = m(IDS).logits
    save_quantized(m, tmp_path / "p", dtype=torch.float32)
    loaded, _ = load_quantized(tmp_path / "p")
    fresh = _model(q)
    assert _structure(loaded) == _structure(fresh)
    assert sum(isinstance(x, PackedLinear) for x in loaded.modules()) == 14
    with torch.no_grad():
        assert _rel(ref, loaded(IDS).logits) < 1e-5


def test_load_calls_rotate_and_quantize(tmp_path, monkeypatch):
    """load_quantized rebuilds through rotate_model (structural part only) and quantize_model, not its own copy."""
    from rcp_lib.quant import apply
    from rcp_lib.rotation import fuse

    save_quantized(_model(QuantConfig(w_group_size=32)), tmp_path / "p")
    calls = []
    rot, quant = fuse.rotate_model, apply.quantize_model
    monkeypatch.setattr(fuse, "rotate_model", lambda m, c, **kw: calls.append(("rotate", kw)) or rot(m, c, **kw))
    monkeypatch.setattr(apply, "quantize_model",
                        lambda m, c, **kw: calls.append(("quantize", c.label, sorted(kw))) or quant(m, c, **kw))
    load_quantized(tmp_path / "p")
    assert calls == [("rotate", {"fuse_weights": False}), ("quantize", "W2A4KV4", ["layer_factory"])]


def test_rotate_without_weights_installs_the_same_modules():
    a = M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1, layers=2, vocab=128)
    b = M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1, layers=2, vocab=128)
    w = {k: v.clone() for k, v in b.state_dict().items()}
    cfg = RotationConfig(r1="gsr", r1_block=32, r4_block=32)
    rotate_model(a, cfg)
    rotate_model(b, cfg, fuse_weights=False)
    assert [(n, type(x).__name__, x.extra_repr()) for n, x in a.named_modules()] == \
           [(n, type(x).__name__, x.extra_repr()) for n, x in b.named_modules()]
    assert a.config.rcp_rotation == b.config.rcp_rotation and a.config._attn_implementation == b.config._attn_implementation
    assert all(torch.equal(w[k], v) for k, v in b.state_dict().items() if k != "lm_head.weight")


def test_map_that_the_surgery_does_not_rebuild(saved):
    mp = saved / "quant_map.json"
    d = json.loads(mp.read_text())
    d["layers"]["model.layers.1.mlp.down_proj"]["r4"] = None
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="down_proj: the surgery rebuilds"):
        load_quantized(saved)


def test_unknown_stored_config_field(saved):
    mp = saved / "config.json"
    d = json.loads(mp.read_text())
    d["quantization_config"]["quant"]["w_future_option"] = 1
    mp.write_text(json.dumps(d))
    with pytest.raises(PackedFormatError, match="re-export"):
        load_quantized(saved)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quantized_state_file_round_trip(tmp_path, bits):
    """The PTQ cache's file (the projection part of the same tensor format) restores the frozen layers bit for bit,
    3-bit codes included (stored in 4-bit slots)."""
    from rcp_lib.packing import load_quantized_state, save_quantized_state
    from rcp_lib.quant.apply import quantized_linears

    m = _model(QuantConfig(w_bits=bits, w_group_size=32, w_method="rtn", w_lwc=False, w_clip_search="mse"))
    ref = {n: q.quantized_weight().clone() for n, q in quantized_linears(m)}
    save_quantized_state(m, tmp_path / "s.safetensors")
    fresh = _model(QuantConfig(w_bits=bits, w_group_size=32, w_method="rtn", w_lwc=False, w_clip_search="mse"))
    load_quantized_state(fresh, tmp_path / "s.safetensors")
    assert all(q.frozen and torch.equal(q.quantized_weight(), ref[n]) for n, q in quantized_linears(fresh))
