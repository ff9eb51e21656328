"""The invariant every rotation paper relies on: a rotated full-precision model computes the same function.

transformers' LlamaRMSNorm normalises in float32 even for a float64 model, so the float64 checks are bounded by
float32 rounding inside the norms (~1e-7), not by the float64 rotation arithmetic.
"""

import copy

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.rotation.fuse import BLOCK_KINDS, R1_KINDS, RotationConfig, rotate_model


F64_TOL = 2e-6


def _max_rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# awkward sizes: non-power-of-two hidden/intermediate (Kronecker Hadamards), odd head counts, GQA, tied
TINY = {
    "h96_i160_3heads_gqa": dict(hidden=96, intermediate=160, heads=3, kv_heads=1),
    "h72_i88_3heads_mha_tied": dict(hidden=72, intermediate=88, heads=3, kv_heads=3, tied=True),
    "h128_i256_4heads_gqa2": dict(hidden=128, intermediate=256, heads=4, kv_heads=2),
}


@pytest.mark.parametrize("shape", list(TINY))
@pytest.mark.parametrize("r1", [k for k in R1_KINDS if k != "walsh"])
@pytest.mark.parametrize("online", [pytest.param(True, marks=pytest.mark.heavy), False])  # online: the slower half
def test_tiny_rotated_logits_float64(shape, r1, online):
    model = M.tiny_llama(layers=2, vocab=300, **TINY[shape]).double()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    cfg = RotationConfig(r1=r1, r1_block=8 if r1 in BLOCK_KINDS else None, r2=online, r3=online, r4=online, seed=3)
    rotate_model(model, cfg)
    assert _max_rel(ref, _logits(model, ids)) < F64_TOL
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_walsh_full_needs_power_of_two():
    model = M.tiny_llama(hidden=128, intermediate=256, heads=4, kv_heads=2).double()
    ids = torch.randint(0, 256, (1, 16))
    ref = _logits(model, ids)
    rotate_model(model, RotationConfig(r1="walsh"))
    assert _max_rel(ref, _logits(model, ids)) < F64_TOL
    odd = M.tiny_llama(hidden=96, intermediate=160)
    with pytest.raises(ValueError, match="gsr"):
        rotate_model(odd, RotationConfig(r1="walsh"))


@pytest.mark.parametrize("r1", ["random_hadamard", "gsr"])
def test_tiny_rotated_logits_float32_eager(r1):
    model = M.tiny_llama(hidden=96, intermediate=160, heads=3, kv_heads=1)
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 256, (2, 32))
    ref = _logits(model, ids)
    rotate_model(model, RotationConfig(r1=r1, r1_block=32 if r1 == "gsr" else None))
    assert model.config._attn_implementation == "rcp_eager"
    assert _max_rel(ref, _logits(model, ids)) < 1e-5


def test_gsr_block_option():
    model = M.tiny_llama(hidden=96, intermediate=160).double()
    ids = torch.randint(0, 256, (1, 16))
    ref = _logits(model, ids)
    rotate_model(model, RotationConfig(r1="gsr", r1_block=16, r1_random_signs=True))
    assert _max_rel(ref, _logits(model, ids)) < F64_TOL


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cfg,err", [
    (RotationConfig(r1="gsr", r1_block=64), ValueError),       # 64 does not divide 96
    (RotationConfig(r1="gsr", r1_block=24), ValueError),       # not a power of two
    (RotationConfig(r1="bogus"), ValueError),
    (RotationConfig(r1="gsr"), ValueError),                    # no block: GSR's block must be chosen (the group)
    (RotationConfig(r1="block_hadamard", r1_block=64), ValueError),
    (RotationConfig(r2_kind="bogus"), ValueError),
])
def test_bad_config_leaves_model_untouched(cfg, err):
    model = M.tiny_llama(hidden=96, intermediate=160)
    before = _snapshot(model)
    with pytest.raises(err):
        rotate_model(model, cfg)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.heavy
def test_unbuildable_intermediate_size_leaves_model_untouched():
    # 10944 = 171 * 64 has no Hadamard construction (a real size; QuaRot issue #44)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=10944, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="10944"):
        rotate_model(model, RotationConfig(r1="hadamard", r4=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model2 = LlamaForCausalLM(cfg).double()
    ids = torch.randint(0, 64, (1, 8))
    ref = _logits(model2, ids)
    rotate_model(model2, RotationConfig(r1="hadamard", r4=True, r4_block=64))  # explicit block-diagonal R4
    assert _max_rel(ref, _logits(model2, ids)) < F64_TOL
    with pytest.raises(ValueError, match="r4_block"):
        rotate_model(LlamaForCausalLM(cfg), RotationConfig(r4_block=48))


def test_not_llama_and_double_rotation():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(M.UnsupportedModelError):
        rotate_model(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    model = M.tiny_llama()
    rotate_model(model)
    with pytest.raises(M.UnsupportedModelError, match="already rotated"):
        rotate_model(model)


def test_config_roundtrip():
    cfg = RotationConfig(r1="gsr", r1_block=32, r2=False, seed=7)
    assert RotationConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        RotationConfig.from_dict({"r1": "gsr", "blocks": 3})


@pytest.fixture(scope="module")
def real_text_ids(embedded, excerpt_test_ids):
    return excerpt_test_ids[:, :256]


@pytest.mark.parametrize("r1", ["random_hadamard", "gsr"])
def test_embedded_model_rotated_logits(embedded, real_text_ids, r1):
    model = copy.deepcopy(embedded[0])
    ref = _logits(embedded[0], real_text_ids)
    rotate_model(model, RotationConfig(r1=r1, r1_block=64 if r1 == "gsr" else None, r2=True, r3=True, r4=True))
    assert _max_rel(ref, _logits(model, real_text_ids)) < 1e-4


def test_embedded_generation_with_kv_cache(embedded):
    model, tok = embedded
    rot = copy.deepcopy(model)
    rotate_model(rot, RotationConfig(r1="gsr", r1_block=64))
    ids = tok("The history of mathematics", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=12, do_sample=False)
        b = rot.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)
