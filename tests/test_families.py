"""Every registered model family (rcp_lib.families) on a tiny random model: exact rotation invariance (R1-R4,
sdpa and eager, a sliding window that acts, Qwen2's q/k/v biases), greedy generation through the KV cache, a
W2A4KV4 forward, the packed save/load round trip, the memory accountant against the packed bytes, and the one
error for an unsupported family. Also the Hadamard order 148 (Qwen2.5-7B's MLP width 18944 = 148 · 128).

A new family registered in rcp_lib/families.py is picked up by the parametrized tests below; give it a SIZES entry
if the default sizes do not fit it.
"""

import copy
import importlib
import json
import math
from types import SimpleNamespace

import pytest
import torch

from rcp_lib import families as F
from rcp_lib import models as M
from rcp_lib.quant.apply import preset, quantize_model
from rcp_lib.rotation.fuse import RotationConfig, rotate_model
from rcp_lib.rotation.hadamard import apply_hadamard, hadamard, hadamard_int, is_hadamard_order

F64_TOL = 2e-6  # bounded by the float32 RMSNorm inside transformers, as in tests/rotation/test_fuse.py
SEQ = 24  # longer than the tiny configs' sliding window of 8 tokens

# Sizes whose Hadamard orders need a non-power-of-two base factor (Kronecker with Paley/Williamson matrices).
SIZES = {
    "llama": dict(hidden=96, intermediate=160, heads=3, kv_heads=1),  # 12·8, 20·8, head_dim 32
    "mistral": dict(hidden=96, intermediate=224, heads=3, kv_heads=1),  # 12·8, 28·8, head_dim 32
    "qwen2": dict(hidden=296, intermediate=592, heads=2, kv_heads=1),  # 148·2, 148·4, head_dim 148
}
DEFAULT_SIZES = dict(hidden=96, intermediate=160, heads=3, kv_heads=1)


def _tiny(family: str, **kw):
    return M.tiny_model(family, layers=2, vocab=256, **{**SIZES.get(family, DEFAULT_SIZES), **kw})


def _ids():
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _max_rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _attn_biases(model, name):
    return [getattr(M.attention(layer), name).bias for layer in M.decoder_layers(model)]


# ------------------------------------------------------------------------------------------------ registry


def test_registry_matches_models_constants():
    assert F.SUPPORTED == ("llama", "mistral", "qwen2")
    assert M.SUPPORTED_ARCHITECTURES == F.SUPPORTED
    assert M.SUPPORTED_CLASSES == ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    assert M.UnsupportedModelError is F.UnsupportedModelError
    for fam in F.FAMILIES.values():
        mod = importlib.import_module(fam.modeling_module)
        assert fam.eager_attention() is mod.eager_attention_forward
        assert fam.causal_lm() is getattr(mod, fam.causal_lm_class)
        assert F.family_of(fam.model_type) is fam


@pytest.mark.parametrize("family", F.SUPPORTED)
def test_tiny_model_is_the_family(family):
    model = _tiny(family)
    fam = F.family_of(model)
    assert fam.model_type == family and type(model).__name__ == fam.causal_lm_class
    M.check_supported(model)
    for name in ("q_proj", "k_proj", "v_proj"):
        biases = _attn_biases(model, name)
        if fam.qkv_bias:
            assert all(b is not None and b.abs().min() > 0 for b in biases)  # random non-zero, so tested
        else:
            assert all(b is None for b in biases)
    if fam.sliding_window:
        # the window acts at this sequence length: removing it changes the logits
        no_window = {"use_sliding_window": False} if family == "qwen2" else {"sliding_window": None}
        assert _max_rel(_logits(model, _ids()), _logits(_tiny(family, **no_window), _ids())) > 1e-3


def _assert_unsupported(exc: pytest.ExceptionInfo, what: str):
    msg = str(exc.value)
    assert "\n" not in msg and what in msg
    for fam in F.FAMILIES.values():
        assert fam.model_type in msg and fam.causal_lm_class in msg


def test_unsupported_family_one_clear_error(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    for call in (M.check_supported, rotate_model, lambda m: quantize_model(m, preset("W2A4KV4", w_group_size=32))):
        with pytest.raises(M.UnsupportedModelError) as e:
            call(gpt2)
        _assert_unsupported(e, "'gpt2'")
    with pytest.raises(F.UnsupportedModelError) as e:
        F.family_of(SimpleNamespace(model_type="phi3"))
    _assert_unsupported(e, "'phi3'")
    with pytest.raises(F.UnsupportedModelError) as e:
        F.family_of(torch.nn.Linear(2, 2))
    _assert_unsupported(e, "Linear without a transformers config")
    with pytest.raises(F.UnsupportedModelError) as e:
        M.tiny_model("gpt2")
    _assert_unsupported(e, "'gpt2'")
    # load() refuses from the config alone, before any weights are read
    (tmp_path / "config.json").write_text(json.dumps(GPT2Config(n_layer=1, n_embd=32, n_head=2).to_dict()))
    with pytest.raises(M.UnsupportedModelError) as e:
        M.load(str(tmp_path))
    _assert_unsupported(e, "'gpt2'")


# ------------------------------------------------------------------------------------- rotation invariance


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", F.SUPPORTED)
def test_rotated_logits_float64(family, attn):
    model = _tiny(family).double()
    model.config._attn_implementation = attn
    ids = _ids()
    ref = _logits(model, ids)
    q_bias = [None if b is None else b.clone() for b in _attn_biases(model, "q_proj")]
    v_bias = [None if b is None else b.clone() for b in _attn_biases(model, "v_proj")]
    rotate_model(model, RotationConfig(r1="random_hadamard", r2=True, r3=True, r4=True, seed=3))
    assert model.config._attn_implementation == f"rcp_{attn}"
    assert _max_rel(ref, _logits(model, ids)) < F64_TOL
    if F.family_of(model).qkv_bias:
        # R1 acts on the projections' inputs (q bias kept); R2 rotates the v_proj output, bias included
        assert all(torch.equal(a, b) for a, b in zip(q_bias, _attn_biases(model, "q_proj")))
        assert all(not torch.allclose(a, b) for a, b in zip(v_bias, _attn_biases(model, "v_proj")))


@pytest.mark.parametrize("family", F.SUPPORTED)
def test_rotated_generation_with_kv_cache(family):
    """Greedy decoding past the sliding window through the KV cache: rotated == original (float64)."""
    model = _tiny(family).double()
    rot = rotate_model(copy.deepcopy(model), RotationConfig(r1="random_hadamard", seed=1))
    ids = _ids()[:1, :6]
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        b = rot.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ W2A4KV4 forward


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", F.SUPPORTED)
def test_w2a4kv4_forward(family, attn):
    model = _tiny(family)
    model.config._attn_implementation = attn
    d = M.dims(model)
    ids = _ids()
    ref = _logits(model, ids)
    rotate_model(model, RotationConfig(r1="random_hadamard", seed=3))
    group = math.gcd(d.hidden, d.intermediate, d.n_heads * d.head_dim)
    quantize_model(model, preset("W2A4KV4", w_group_size=group))
    assert model.config._attn_implementation == f"rcp_{attn}"
    assert all(hasattr(M.attention(layer), "rcp_kv_quantizer") for layer in M.decoder_layers(model))
    out = _logits(model, ids)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert _max_rel(ref, out) > 1e-3  # the quantizers are really in the forward


# ------------------------------------------------------------------------------------------ Hadamard 148


def test_hadamard_148_exact():
    H = hadamard_int(148)
    assert set(H.unique().tolist()) == {-1, 1}
    assert torch.equal(H @ H.T, 148 * torch.eye(148, dtype=torch.int64))
    Hn = hadamard(148)
    assert torch.allclose(Hn @ Hn.T, torch.eye(148, dtype=torch.float64), atol=1e-12)
    # Qwen2.5-7B: hidden 3584 = 28·128, MLP 18944 = 148·128, head_dim 128 all have a full Hadamard now
    assert all(is_hadamard_order(n) for n in (3584, 18944, 128))


def test_apply_hadamard_148_multiples_match_dense():
    n = 148 * 4
    x = torch.randn(5, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(apply_hadamard(x), x @ hadamard(n), atol=1e-10, rtol=0)


def test_apply_hadamard_18944_matches_dense_columns():
    """18944 = 148 · 128: the dense 18944² matrix (2.9 GB in float64) is compared one 128-column block at a time,
    column block ``a`` of ``kron(H_148, H_128) / √n`` being ``kron(H_148[:, a], H_128) / √n``."""
    n = 18944
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = apply_hadamard(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)  # orthonormal
    H148, H128 = hadamard_int(148).double(), hadamard_int(128).double()
    for a in (0, 1, 73, 147):
        cols = torch.kron(H148[:, a : a + 1], H128) / math.sqrt(n)  # [n, 128]
        assert torch.allclose(y[:, a * 128 : (a + 1) * 128], x @ cols, atol=1e-10, rtol=0)


@pytest.mark.heavy
@pytest.mark.parametrize("label", ["W2A16KV16", "W2A4KV16"])
@pytest.mark.parametrize("family", F.SUPPORTED)
def test_packed_round_trip(family, label, tmp_path):
    """save_quantized / load_quantized rebuild the family from its config (window, q/k/v biases included).

    KV16: with KV4 the packed integer A4 kernel's float32 rounding (and Qwen2's bias added after it, not fused)
    differs from the fake-quant model in the last ulp, which flips some 4-bit KV codes and moves those logits by
    percents (seen on qwen2: 3 of 48 positions); that is rounding, not a format error, so it is not asserted here.
    """
    from rcp_lib.deploy import load_quantized, save_quantized

    model = _tiny(family)
    d = M.dims(model)
    rotate_model(model, RotationConfig(r1="random_hadamard", seed=3))
    quantize_model(model, preset(label, w_group_size=math.gcd(d.hidden, d.intermediate, d.n_heads * d.head_dim)))
    ids = _ids()
    ref = _logits(model, ids)
    save_quantized(model, tmp_path / "q", dtype=torch.float32)
    loaded, _ = load_quantized(tmp_path / "q")
    assert type(loaded).__name__ == "Rcp" + F.family_of(family).causal_lm_class  # the packed model type's class
    assert isinstance(loaded, F.family_of(family).causal_lm())
    assert _max_rel(ref, _logits(loaded, ids)) < 1e-5


@pytest.mark.parametrize("family", F.SUPPORTED)
def test_memory_accountant_matches_packed_bytes(family, tmp_path):
    """The accountant's weight bytes equal the packed file's tensor bytes, Qwen2's q/k/v biases included."""
    from dataclasses import replace

    from rcp_lib.memory import W2A4KV4, footprint
    from rcp_lib.deploy import packed_model_bytes, save_quantized

    model = _tiny(family)
    d = M.dims(model)
    group = math.gcd(d.hidden, d.intermediate, d.n_heads * d.head_dim)
    quantize_model(model, preset("W2A4KV4", w_group_size=group).with_weight(method="rtn", lwc=False))
    save_quantized(model, tmp_path / "q", dtype=torch.float16)  # the accountant counts the fp16 format
    f = footprint(model.config, replace(W2A4KV4, group_size=group, kv_group_size=d.head_dim))
    assert packed_model_bytes(tmp_path / "q")["total"] == f.weights
    qkv = (d.n_heads + 2 * d.n_kv_heads) * d.head_dim * d.n_layers * 2  # fp16
    assert f.per_kind["biases"] == (qkv if F.family_of(family).qkv_bias else 0)
