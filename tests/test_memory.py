"""Memory accountant: LLaMA-2-7B numbers (the paper's 5.29x), KV-cache consistency, and agreement with the
bytes actually produced by the packing functions."""

import math

import pytest
import torch
from transformers import LlamaConfig

from rcp_lib.kernels import pack_codes
from rcp_lib.memory import FP16, PRESETS, W2A4KV4, W2A16KV16, W4A4KV4, Scheme, count_linear_weights, footprint, linear_shapes


def llama2_7b():
    return LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000,
    )  # fmt: skip


def test_llama2_7b_linear_count_and_fp16_size():
    cfg = llama2_7b()
    assert count_linear_weights(cfg) == 6_476_005_376
    fp = footprint(cfg, FP16)
    assert fp.weights == 13_476_831_232  # 6.476e9 linears + 2 x 32000x4096 + 65 x 4096 norms, all fp16
    assert fp.weights / 1e9 == pytest.approx(13.48, abs=0.005)
    assert fp.quant_metadata == 0 and fp.weight_ratio_vs_fp16 == 1.0


def test_llama2_7b_w2a4kv4_ratio_reproduces_paper():
    cfg = llama2_7b()
    fp = footprint(cfg, W2A4KV4)
    # weights only: 2-bit codes + 4 fp16 levels per 128-group = 2.5 bits per linear weight
    assert fp.weight_codes == 6_476_005_376 * 2 // 8
    assert fp.quant_metadata == 6_476_005_376 // 128 * 4 * 2
    assert fp.weight_ratio_vs_fp16 == pytest.approx(5.288, abs=1e-3)
    # per-kind sums add up; embed/lm_head/norms unchanged from fp16
    fp16 = footprint(cfg, FP16)
    for kind in ("embed", "lm_head", "norms"):
        assert fp.per_kind[kind] == fp16.per_kind[kind]
    assert sum(fp.per_kind.values()) == fp.weights
    assert fp.per_kind["attn_q"] == 32 * 4096 * 4096 * 2.5 / 8
    d = fp.to_dict()
    assert d["bytes_mlp_down"] == fp.per_kind["mlp_down"] and d["weights"] == fp.weights


@pytest.mark.parametrize("scheme", [FP16, W2A4KV4, W4A4KV4, W2A16KV16])
@pytest.mark.parametrize("seq_len,batch", [(2048, 1), (4096, 3)])
def test_kv_cache_consistency(scheme, seq_len, batch):
    cfg = llama2_7b()
    fp = footprint(cfg, scheme, seq_len=seq_len, batch=batch)
    L, Hkv, d = 32, 32, 128
    values = 2 * L * Hkv * d * seq_len * batch
    meta = 0 if scheme.kv_bits == 16 else 2 * L * Hkv * math.ceil(d / scheme.kv_group_size) * seq_len * batch * 4
    assert fp.kv_metadata == meta
    assert fp.kv_cache == values * scheme.kv_bits // 8 + meta
    assert fp.total == fp.weights + fp.kv_cache
    assert fp.fp16_kv_cache == values * 2
    assert fp.total_ratio_vs_fp16 == pytest.approx(fp.fp16_total / fp.total)


def test_ratio_with_kv_changes_sensibly():
    cfg = llama2_7b()
    w = footprint(cfg, W2A4KV4, seq_len=2048)
    # KV4 (4.25 bits/value with metadata) compresses less than 2.5-bit weights: including the cache lowers the ratio
    assert 5.0 < w.total_ratio_vs_fp16 < w.weight_ratio_vs_fp16
    assert footprint(cfg, W2A4KV4, seq_len=8192).total_ratio_vs_fp16 < w.total_ratio_vs_fp16
    # W2A16KV16 keeps an fp16 cache: same weights, much lower total ratio
    wo = footprint(cfg, W2A16KV16, seq_len=2048)
    assert wo.weights == w.weights and wo.total_ratio_vs_fp16 < w.total_ratio_vs_fp16
    # ordering of schemes
    assert 1.0 < footprint(cfg, W4A4KV4).weight_ratio_vs_fp16 < w.weight_ratio_vs_fp16
    # zero-length cache: total ratio equals the weight ratio
    assert footprint(cfg, W2A4KV4, seq_len=0).total_ratio_vs_fp16 == pytest.approx(w.weight_ratio_vs_fp16)


def test_config_as_dict_gqa_tied_and_uniform_metadata():
    cfg = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)  # fmt: skip
    assert linear_shapes(cfg)["attn_k"] == (512, 2048) and linear_shapes(cfg)["attn_o"] == (2048, 2048)
    fp = footprint(cfg, "W2A4KV4")
    assert fp.per_kind["lm_head"] == 0  # tied: shared with the embedding
    uni = footprint(cfg, Scheme(lut_levels=False))  # uniform: scale + zero = 2 fp16 per group
    assert uni.quant_metadata * 2 == fp.quant_metadata
    assert set(PRESETS) == {"FP16", "W2A4KV4", "W4A4KV4", "W2A16KV16"}
    with pytest.raises(ValueError):
        Scheme(keep_fp16=("embed",))


def test_accountant_matches_packed_tensors():
    """Weight bytes of a small LLaMA equal the nbytes of int32 codes + fp16 LUTs from the packing functions
    (K = 88 and 168 are not multiples of 16 nor of G: padded words and ragged groups are counted)."""
    cfg = LlamaConfig(
        hidden_size=88, intermediate_size=168, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=300,
    )  # fmt: skip
    G = 32
    scheme = Scheme(w_bits=2, group_size=G)
    actual = 0
    for _ in range(cfg.num_hidden_layers):
        for n, k in linear_shapes(cfg).values():
            codes = torch.randint(0, 4, (n, k), dtype=torch.uint8)  # the bytes depend on the shapes only
            levels = torch.randn(n, -(-k // G), 4).half()  # one fp16 LUT per (ragged last) group
            packed = pack_codes(codes, 2)
            actual += packed.nbytes + levels.nbytes
    fp16_rest = torch.zeros(cfg.vocab_size, 88, dtype=torch.float16).nbytes * 2  # embed + untied lm_head
    fp16_rest += torch.zeros((2 * cfg.num_hidden_layers + 1) * 88, dtype=torch.float16).nbytes
    actual += fp16_rest
    fp = footprint(cfg, scheme)
    assert fp.weights == pytest.approx(actual, rel=0.01)
    assert fp.weight_codes + fp.quant_metadata + fp16_rest == actual  # exact with the int32 padding model


def test_each_format_is_charged_what_it_stores_and_bits_per_weight_agrees():
    """LDP needs 2**b fp16 levels per group, a uniform grid an fp16 scale + zero: Scheme.of derives it from the weight
    method, and bits_per_weight equals the accountant's block-linear bytes * 8 / weights (LLaMA-2-7B, no row tails)."""
    from rcp_lib.memory import Scheme, count_linear_weights, footprint
    from rcp_lib.quant.apply import QuantConfig

    cfg = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, head_dim=128, vocab_size=32000, tie_word_embeddings=False)
    n = count_linear_weights(cfg)
    for method, g, bpw in (("ldp", 64, 3.0), ("ldp", 128, 2.5), ("rtn", 64, 2.5), ("rtn", 128, 2.25)):
        q = QuantConfig.from_dict({"weight": {"bits": 2, "group_size": g, "method": method, "lwc": False}})
        s = Scheme.of(q)
        assert s.lut_levels == (method == "ldp") and s.bits_per_weight == bpw
        f = footprint(cfg, s)
        block = sum(v for k, v in f.per_kind.items() if k.startswith(("attn_", "mlp_")))
        assert block * 8 / n == pytest.approx(bpw, rel=1e-12)
    assert Scheme.of(None).bits_per_weight == 16.0
