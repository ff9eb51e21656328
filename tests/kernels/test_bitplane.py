"""The bit-serial decode kernel (kernels/triton_w2a4.py, ``w2a4_bitplane_matmul_triton``) and its layout
(kernels/layout.py, "Bit planes"): plane round trips, the popcount identity in exact integers, the pre-kernel's planes
against quantize_per_token, the kernel against float64 products on odd shapes (interpreter), PackedLinear with
``gemv_format="bitplane"`` against fake quantization, and the sm_90 code: hardware popcounts, 128-bit loads, and
fewer instructions per weight than the select kernel (static counts, not a speed)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import rcp_lib.kernels as rk
from rcp_lib.kernels import dequantize, pack_codes
from rcp_lib.kernels.layout import (activation_bitplanes, bitplane_layout_supported, bitplanes_to_codes,
                                    weight_bitplanes, weight_bitplanes_to_packed, weight_row_sums)
from rcp_lib.quant.activations import quantize_per_token
from rcp_lib.rotation.online import OnlineHadamard

needs_triton = pytest.mark.skipif(not rk.triton_available(), reason="triton not installed")
REPO = Path(__file__).resolve().parents[2]


def _problem(B, N, K, G, seed=0, lut_dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), dtype=torch.uint8, generator=g)
    lut = torch.randn(N, K // G, 4, generator=g).sort(-1).values.to(lut_dtype)
    x = torch.randn(B, K, generator=g) * 3
    return codes, lut, x


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------- layout
def test_plane_layout_round_trips_and_bit_positions():
    codes, _, _ = _problem(1, 5, 96, 32)
    packed = pack_codes(codes)
    wp = weight_bitplanes(packed, 96, rows_per_chunk=2)
    assert wp.shape == (5, 2, 3) and wp.dtype == torch.int32
    assert torch.equal(weight_bitplanes_to_packed(wp), packed)
    n, t, i = 3, 2, 31  # bit i of word t of plane j is bit j of the code of k = 32 t + i (bit 31: the sign bit)
    for j in range(2):
        assert ((int(wp[n, j, t]) >> i) & 1) == ((int(codes[n, 32 * t + i]) >> j) & 1)
    a = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    ap = activation_bitplanes(a)
    assert ap.shape == (4, 4, 2) and torch.equal(bitplanes_to_codes(ap), a)
    assert bitplane_layout_supported(4096, 128) and not bitplane_layout_supported(4096, 16)
    assert not bitplane_layout_supported(96, 64) and not bitplane_layout_supported(256, 128, bits=4)
    with pytest.raises(ValueError, match="K % 32"):
        activation_bitplanes(a[:, :48])


def test_popcount_identity_is_exact():
    """The module's formula, in Python integers and float64, equals sum_k a_k lut[c_k] of one group."""
    g = torch.Generator().manual_seed(1)
    G = 128
    c = torch.randint(0, 4, (G,), generator=g)
    a = torch.randint(0, 16, (G,), generator=g)
    lv = torch.randn(4, generator=g, dtype=torch.float64)
    P = [sum(((int(c[k]) >> b) & 1) << (k % 32) for k in range(32 * t, 32 * t + 32)) for b in range(2) for t in range(4)]
    A = [[sum(((int(a[k]) >> j) & 1) << (k % 32) for k in range(32 * t, 32 * t + 32)) for t in range(4)] for j in range(4)]
    p0, p1 = P[:4], P[4:]
    pc = lambda v: bin(v).count("1")  # noqa: E731
    qa = sum(pc(A[j][t]) << j for j in range(4) for t in range(4))
    q0 = sum(pc(A[j][t] & p0[t]) << j for j in range(4) for t in range(4))
    q1 = sum(pc(A[j][t] & p1[t]) << j for j in range(4) for t in range(4))
    q01 = sum(pc(A[j][t] & p0[t] & p1[t]) << j for j in range(4) for t in range(4))
    got = lv[0] * qa + (lv[1] - lv[0]) * q0 + (lv[2] - lv[0]) * q1 + (lv[3] - lv[2] - lv[1] + lv[0]) * q01
    want = (a.double() * lv[c]).sum()
    assert abs(float(got - want)) < 1e-10 * float(want.abs() + 1)
    assert qa == int(a.sum())


# --------------------------------------------------------------------------------------------- pre-kernel
@needs_triton
@pytest.mark.parametrize("K,block", [(96, None), (256, None), (256, 64), (128, 16), (384, 192), (1536, 1536)])
def test_prekernel_planes_equal_quantize_per_token(K, block):
    from rcp_lib.kernels.triton_w2a4 import hadamard_supported, quantize_activations_triton

    x = torch.randn(3, K, dtype=torch.float16) * 2
    if block is not None:
        assert hadamard_supported(K, block)
        ref_in = OnlineHadamard(K, block)(x.float())
    else:
        ref_in = x.float()
    planes, s, z = quantize_activations_triton(x, 4, 0.9, 128, hadamard_block=block, apply_hadamard=block is not None,
                                               planes=True)
    rc, rs, rz = quantize_per_token(ref_in, 4, 0.9)
    assert planes.shape == (3, 4, K // 32) and planes.dtype == torch.int32
    if block is None or block & (block - 1) == 0:  # no transform, or a power-of-two one: bit for bit
        assert torch.equal(planes, activation_bitplanes(rc))
        assert torch.equal(s, rs.reshape(-1).float()) and torch.equal(z, rz.reshape(-1).float())
    else:  # the fp32 transform sums in another order than apply_hadamard: min / max to rounding, a code at a tie
        c = bitplanes_to_codes(planes)
        assert (c.int() - rc.int()).abs().max() <= 1 and (c != rc).float().mean() < 1e-2
        torch.testing.assert_close(s, rs.reshape(-1).float(), rtol=1e-5, atol=0)
        torch.testing.assert_close(z, rz.reshape(-1).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="K % 32"):
        quantize_activations_triton(torch.randn(1, 48), 4, 1.0, None, planes=True)


# --------------------------------------------------------------------------------------------- GEMV
CASES = [  # B, N, K, G, config (None: the interpreter's default)
    (1, 33, 384, 128, None),
    (3, 17, 320, 64, dict(BLOCK_N=8, GPI=2, SPLIT_K=3, NUM_STAGES=2)),  # split-K, ragged split, N tail
    (1, 40, 256, 32, dict(BLOCK_N=16, GPI=4, SPLIT_K=8, NUM_STAGES=1)),  # empty splits
    (6, 9, 256, 64, dict(BLOCK_N=8, GPI=1, SPLIT_K=2, NUM_STAGES=2)),  # two token tiles
    (4, 24, 512, 128, dict(BLOCK_N=16, GPI=2, SPLIT_K=1, NUM_STAGES=3)),
    (1, 24, 1024, 32, dict(BLOCK_N=16, GPI=1, SPLIT_K=32, NUM_STAGES=1)),  # deep split-K: one group per split
]


@pytest.mark.heavy
@needs_triton
@pytest.mark.parametrize("B,N,K,G,config", CASES)
def test_bitplane_matmul_matches_float64(B, N, K, G, config):
    from rcp_lib.kernels.triton_w2a4 import _WORKSPACE, quantize_activations_triton, w2a4_bitplane_matmul_triton

    codes, lut, x = _problem(B, N, K, G, seed=B + N)
    packed = pack_codes(codes)
    bias = torch.randn(N)
    planes, s, z = quantize_activations_triton(x, 4, 1.0, G, planes=True)
    ws = weight_row_sums(packed, lut, K, G)
    wp = weight_bitplanes(packed, K)
    y = w2a4_bitplane_matmul_triton(planes, s, z, wp, lut, ws, K, G, bias, torch.float32, config=config)
    rc, rs, rz = quantize_per_token(x, 4)
    w = dequantize(packed, lut, K, G, dtype=torch.float64)
    ref = ((rc.double() - rz.double().reshape(-1, 1)) * rs.double().reshape(-1, 1)) @ w.T + bias.double()
    assert y.shape == (B, N) and y.dtype == torch.float32
    assert _rel(y, ref) < 1e-5
    assert all(float(w_.abs().max()) == 0 and int(n.abs().max()) == 0 for w_, n in _WORKSPACE.values())  # reset
    y16 = w2a4_bitplane_matmul_triton(planes, s, z, wp, lut.float(), ws, K, G, None, torch.float16, config=config)
    assert y16.dtype == torch.float16 and _rel(y16, ref - bias.double()) < 2e-3


@pytest.mark.heavy
@needs_triton
@pytest.mark.parametrize("one_launch", [False, True])
def test_bitplane_error_within_3x_the_reference_on_weights_with_a_row_mean(one_launch):
    """The error budget of the bit-serial product against float64: at most the torch reference's own, on rows with a
    non-zero mean (levels near 0.05) and activations with a large zero point, where an uncentred ``sum c w - z wsum``
    cancels (measured under the interpreter: 3.17x and 1.44x the reference's before the sums were centred on 7.5,
    0.19x and 0.11x after)."""
    from rcp_lib.kernels.reference import w2a4_gemv_reference
    from rcp_lib.kernels.triton_w2a4 import w2a4_bitplane_linear_triton, w2a4_bitplane_matmul_triton

    N, K, G = 32, 2048, 128
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        packed = pack_codes(torch.randint(0, 4, (N, K), dtype=torch.uint8, generator=g))
        lut = (0.05 + 0.02 * torch.randn(N, K // G, 4, generator=g)).sort(-1).values.to(torch.float16)
        x = torch.randn(1, K, generator=g) * 3 + 1.0
        rc, rs, rz = quantize_per_token(x, 4)
        w = dequantize(packed, lut, K, G, dtype=torch.float64)
        ref64 = ((rc.double() - rz.double().reshape(-1, 1)) * rs.double().reshape(-1, 1)) @ w.T
        ref_err = _rel(w2a4_gemv_reference(rc, rs, rz, packed, lut, K, G), ref64)
        ws, wp = weight_row_sums(packed, lut, K, G), weight_bitplanes(packed, K)
        if one_launch:
            y = w2a4_bitplane_linear_triton(x, wp, lut, ws, K, G, 4, 1.0, None, torch.float32)
        else:
            y = w2a4_bitplane_matmul_triton(activation_bitplanes(rc), rs, rz, wp, lut, ws, K, G, None, torch.float32)
        assert _rel(y, ref64) <= ref_err, (seed, _rel(y, ref64), ref_err)


def _split_ranges(NG, SK, GPI):
    """The kernel's _split_range_fn in plain Python (the even deal of ceil(NG / GPI) iterations over SK splits)."""
    U = -(-NG // GPI)
    return [((s * U) // SK * GPI, min(((s + 1) * U) // SK * GPI, NG)) for s in range(SK)]


@needs_triton
def test_deep_split_k_candidates_are_pruned_exactly_where_a_split_would_be_empty(monkeypatch):
    """The deep split-K candidates (16-64 splits) reach the autotuner only where every split gets work: at K = 4096 and
    G = 128 (32 groups) 64 splits would leave 32 empty, at K = 11008 (86 groups) none is empty; over many K the prune
    keeps a candidate exactly when the kernel's split of the groups leaves no split empty, and the splits tile the
    groups once, each starting at a multiple of GPI."""
    import triton

    from rcp_lib.kernels.triton_w2a4 import _early_prune, _tuned, bitplane_configs, gemv_configs, prune_split_k

    cands = bitplane_configs(128)
    assert {c["SPLIT_K"] for c in cands} >= {16, 32, 64}
    k4096 = prune_split_k(cands, 4096, 128)
    assert max(c["SPLIT_K"] for c in k4096) == 32
    assert len(prune_split_k(cands, 11008, 128)) == len(cands)
    for G in (64, 128):
        for K in (G, 3 * G, 2048, 4096, 5632, 11008, 14336):
            NG = K // G
            for c in cands + gemv_configs(G):
                ranges = _split_ranges(NG, c["SPLIT_K"], c["GPI"])
                covered = [g for a, b in ranges for g in range(a, b)]
                assert covered == list(range(NG)) and all(a % c["GPI"] == 0 for a, _ in ranges), (K, G, c)
                kept = c in prune_split_k(cands + gemv_configs(G), K, G)
                assert kept == all(b > a for a, b in ranges) or not any(
                    all(b > a for a, b in _split_ranges(NG, d["SPLIT_K"], d["GPI"])) for d in cands + gemv_configs(G)
                ), (K, G, c)
    # never empty: with no candidate fitting, those of the smallest split-K stay
    assert {c["SPLIT_K"] for c in prune_split_k(cands, 128, 128)} == {1}
    # the autotuner prunes with the call's K (positional) and G (a constexpr keyword), on triton.Config objects;
    # built in compiled mode, as on a GPU (_tuned binds the compiled-mode helpers: under the interpreter's env it
    # would bind interpreted ones for every later compile in this process)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kern = _tuned("bitplane", 128, True)
    assert kern.early_config_prune is _early_prune
    # Triton's on-disk tuning cache sees only the source, the tuning key and the configurations: the constexprs that
    # make the one-launch, tiled and GLU variants read different amounts are in the key (and are kernel arguments)
    assert {"G", "ABITS", "QUANT_IN", "TILED", "GLU"} <= set(kern.keys) <= set(kern.arg_names)
    assert "G" in _tuned("gemv", 128, True).keys
    pruned = _early_prune(kern.configs, {"K": 4096, "N": 4096}, G=128)
    assert all(isinstance(c, triton.Config) for c in pruned) and len(pruned) == len(k4096)


@needs_triton
def test_split_k_workspace_is_reset_after_a_non_finite_partial_sum():
    """A split-K call whose partial sums are inf puts the workspace back to exact zeros (``0.0``, not ``part * 0.0``,
    which is nan), so the next call on the same workspace is unaffected."""
    from rcp_lib.kernels.triton_w2a4 import _WORKSPACE, quantize_activations_triton, w2a4_bitplane_matmul_triton

    B, N, K, G = 1, 40, 256, 32
    config = dict(BLOCK_N=16, GPI=4, SPLIT_K=8, NUM_STAGES=1)
    codes, lut, x = _problem(B, N, K, G, seed=7)
    packed = pack_codes(codes)
    planes, s, z = quantize_activations_triton(x, 4, 1.0, G, planes=True)
    ws, wp = weight_row_sums(packed, lut, K, G), weight_bitplanes(packed, K)
    bad = lut.float().clone()
    bad[:, 0, :] = float("inf")  # every partial sum of the first K split: inf
    y_bad = w2a4_bitplane_matmul_triton(planes, s, z, wp, bad, ws, K, G, None, torch.float32, config=config)
    assert not torch.isfinite(y_bad).all()
    assert all(bool((w_ == 0).all()) and int(n.abs().max()) == 0 for w_, n in _WORKSPACE.values())  # exact zeros
    y = w2a4_bitplane_matmul_triton(planes, s, z, wp, lut, ws, K, G, None, torch.float32, config=config)
    rc, rs, rz = quantize_per_token(x, 4)
    w = dequantize(packed, lut, K, G, dtype=torch.float64)
    ref = ((rc.double() - rz.double().reshape(-1, 1)) * rs.double().reshape(-1, 1)) @ w.T
    assert torch.isfinite(y).all() and _rel(y, ref) < 1e-5


@needs_triton
def test_bitplane_matmul_rejects_bad_operands():
    from rcp_lib.kernels.triton_w2a4 import w2a4_bitplane_matmul_triton

    codes, lut, _ = _problem(1, 4, 256, 128)
    wp = weight_bitplanes(pack_codes(codes), 256)
    ap = torch.zeros(1, 4, 8, dtype=torch.int32)
    one, zero, ws = torch.ones(1), torch.zeros(1), torch.zeros(4)
    with pytest.raises(ValueError, match="G % 32"):
        w2a4_bitplane_matmul_triton(ap, one, zero, wp, lut, ws, 256, 16)
    with pytest.raises(ValueError, match="aplanes"):
        w2a4_bitplane_matmul_triton(ap[:, :, :4], one, zero, wp, lut, ws, 256, 128)
    with pytest.raises(ValueError, match="wplanes"):
        w2a4_bitplane_matmul_triton(ap, one, zero, wp[:2, :1], lut, ws, 256, 128)
    with pytest.raises(ValueError, match="lut"):
        w2a4_bitplane_matmul_triton(ap, one, zero, wp, lut[:, :1], ws, 256, 128)


@needs_triton
@pytest.mark.parametrize("B,N,K,G,dtype,config", [
    (1, 37, 384, 128, torch.float16, None),
    (3, 17, 320, 64, torch.bfloat16, dict(BLOCK_N=8, GPI=2, SPLIT_K=3, NUM_STAGES=2)),
    (6, 9, 1152, 64, torch.float32, dict(BLOCK_N=8, GPI=1, SPLIT_K=2, NUM_STAGES=1)),  # rows > RB, 2 token tiles
])
@pytest.mark.heavy
def test_one_launch_equals_prekernel_then_matmul(B, N, K, G, dtype, config):
    """The kernel that quantizes its own chunks gives bit for bit what the pre-kernel's planes give (same codes,
    same integer sums, same epilogue), and that is the float64 product of quantize_per_token's operands."""
    from rcp_lib.kernels.triton_w2a4 import (quantize_activations_triton, w2a4_bitplane_linear_triton,
                                             w2a4_bitplane_matmul_triton)

    codes, lut, x = _problem(B, N, K, G, seed=B + K)
    x = x.to(dtype)
    packed = pack_codes(codes)
    wp, ws, bias = weight_bitplanes(packed, K), weight_row_sums(packed, lut, K, G), torch.randn(N)
    y1 = w2a4_bitplane_linear_triton(x, wp, lut, ws, K, G, 4, 0.9, bias, torch.float32, config=config)
    planes, s, z = quantize_activations_triton(x, 4, 0.9, G, planes=True)
    y2 = w2a4_bitplane_matmul_triton(planes, s, z, wp, lut, ws, K, G, bias, torch.float32, config=config)
    assert torch.equal(y1, y2)
    rc, rs, rz = quantize_per_token(x.float(), 4, 0.9)
    w = dequantize(packed, lut, K, G, dtype=torch.float64)
    ref = ((rc.double() - rz.double().reshape(-1, 1)) * rs.double().reshape(-1, 1)) @ w.T + bias.double()
    assert _rel(y1, ref) < 1e-5
    assert w2a4_bitplane_linear_triton(x, wp, lut, ws, K, G, 4, 0.9, config=config).dtype == dtype
    with pytest.raises(ValueError, match="act_clip_ratio"):
        w2a4_bitplane_linear_triton(x, wp, lut, ws, K, G, 4, 0.0)
    with pytest.raises(ValueError, match="x must be fp16"):
        w2a4_bitplane_linear_triton(x.to(torch.uint8), wp, lut, ws, K, G)


# --------------------------------------------------------------------------------------------- deployed layer
@needs_triton
@pytest.mark.parametrize("fmt", ["bitplane", "bitplane_tiled"])
@pytest.mark.parametrize("tokens,transform", [((1, 1), None), ((1, 3), OnlineHadamard(128, 32)), ((2, 3), None)])
def test_packed_linear_bitplane_matches_fake_quant(tokens, transform, fmt):
    """Decode batches (<= 4 tokens) run the bit-serial kernel, larger ones the GEMM; both equal fake quantization."""
    from rcp_lib.deploy import PackedLinear
    from rcp_lib.quant import QuantLinear, WeightQuantConfig

    K, N, G = 128, 24, 32
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.2)
    wcfg = WeightQuantConfig(bits=2, group_size=G, method="ldp", lwc=True, ldp_init="lloyd")
    q = QuantLinear.from_linear(lin, wcfg, act_bits=4, act_clip_ratio=0.9, input_transform=transform)
    p = PackedLinear.from_quant_linear(q, lut_dtype=torch.float32, backend="triton")
    p.gemv_format = fmt
    assert p._bitplane() and p.kernel_planes().shape == (N, 2, K // 32)
    assert p.kernel_tiles().shape == (N, K // G // 2 * 12)  # records of two groups: 2 x (2 + 2 + 2 words), fp32 LUT
    x = torch.randn(*tokens, K) * 2
    with torch.no_grad():
        ref = q(x)
        y = p(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-5 * float(ref.abs().max()))
    with pytest.raises(ValueError, match="gemv_format"):
        PackedLinear(p.qweight, p.lut, K, G, 2, None, 4, 1.0, gemv_format="planes")


# --------------------------------------------------------------------------------------------- sm_90 code
def _sass_tool():
    spec = importlib.util.spec_from_file_location("kernel_sass", REPO / "benchmarks" / "kernel_sass.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.heavy
@needs_triton
def test_bitplane_sm90_code_has_popc_wide_loads_and_fewer_instructions(tmp_path, monkeypatch):
    """Static: the loop uses the hardware POPC, loads its weight planes 128 bits at a time, needs no more than the
    pipeline's barriers, and issues fewer than half the instructions per weight of the select kernel (batch 1), also
    when it quantizes the activations itself (one launch)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    ks = _sass_tool()
    try:
        sel = ks.stats(*ks.CASES[0])
        bp = ks.stats("bitplane", dict(ks._BP, HAS_BIAS=True, BLOCK_B=1, BLOCK_N=64, GPI=2, SPLIT_K=4, NUM_STAGES=3), 4)
        plain = ks.stats("bitplane", dict(ks._BP, BLOCK_B=4, BLOCK_N=32, GPI=1, SPLIT_K=1, NUM_STAGES=1), 2)
        one = ks.stats("bitplane", dict(ks._BP, QUANT_IN=True, BLOCK_B=1, BLOCK_N=128, GPI=1, SPLIT_K=4,
                                        NUM_STAGES=1), 4)
        tiled = ks.stats("bitplane", dict(ks._BP, **ks._TILED, BLOCK_B=1, BLOCK_N=64, GPI=2, SPLIT_K=4, NUM_STAGES=3), 4)
        glu = ks.stats("bitplane", dict(ks._BP, QUANT_IN=True, GLU=True, ROUND=1, BLOCK_B=1, BLOCK_N=128, GPI=1,
                                        SPLIT_K=4, NUM_STAGES=1), 4)  # a gated MLP's product quantized on load
    except RuntimeError as e:  # a triton build without the CUDA backend / ptxas
        if "ptxas" in str(e).lower() or "backend" in str(e).lower():
            pytest.skip(f"no CUDA compiler backend: {e}")
        raise
    # 12 popcounts per (row, chunk) and token: 64 rows x 8 chunks / 128 threads = 4 per thread, + the token's own
    assert bp["popc"] >= 48 and plain["popc"] >= 4 * 12 * 32 * 4 // 64
    assert bp["ldgsts"] + bp["ldg_128"] > 0 and bp["bar"] <= 2 and plain["bar"] == 0 and plain["sts"] == 0
    assert bp["instr_per_weight"] < 0.5 * sel["instr_per_weight"]
    # one launch: the activation planes are built in the loop (their reductions convert layouts: barriers, once per
    # 128 rows x 128 weights instead of per 16 weights of 32 rows), still well under the select kernel
    assert one["popc"] >= 48 and one["instr_per_weight"] < 0.5 * sel["instr_per_weight"]
    assert sel["bar"] >= 16  # the select kernel's per-slot layout conversions (what the bit planes remove)
    # tiles: the same loop on one stream per row, still wide (asynchronous) loads and about the planes' instructions
    assert tiled["gemv_format"] == "bitplane_tiled" and tiled["popc"] == bp["popc"]
    assert tiled["ldgsts"] + tiled["ldg_128"] > 0 and tiled["instr_per_weight"] < 1.1 * bp["instr_per_weight"]
    # the gated MLP's product read and computed in the loop: the same popcounts, more instructions (two loads and an
    # exp per activation, K times per program), still under the select kernel
    assert glu["popc"] == one["popc"] and one["instr_per_weight"] < glu["instr_per_weight"] < sel["instr_per_weight"]


@needs_triton
def test_quantizing_kernels_launch_without_fma_contraction(tmp_path, monkeypatch):
    """Both kernels that quantize activations are launched with QUANT_LAUNCH_OPTIONS, and with those options the
    pre-kernel's sm_90 code has no fma (with contraction, ``x - clip * min`` becomes one fma per element and rounds
    differently from quantize_per_token when clip < 1)."""
    import rcp_lib.kernels.triton_w2a4 as T

    seen = []

    class _Rec:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append(kw)

    monkeypatch.setattr(T, "_jitted", lambda name: _Rec())
    x = torch.randn(2, 128)
    codes, lut, _ = _problem(1, 8, 128, 32)
    wp, ws = weight_bitplanes(pack_codes(codes), 128), torch.zeros(8)
    T.quantize_activations_triton(x, 4, 0.9, 32)
    T.w2a4_bitplane_linear_triton(x, wp, lut, ws, 128, 32, 4, 0.9)
    assert len(seen) == 2 and all(kw.get("enable_fp_fusion") is False for kw in seen)
    monkeypatch.undo()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {"x_ptr": "*fp16", "c_ptr": "*i32", "s_ptr": "*fp32", "z_ptr": "*fp32", "hc_ptr": "*fp32", "hl_ptr": "*fp32",
           "K": "i32", "stride_xb": "i32", "stride_cb": "i32", "stride_cj": "i32", "clip": "fp32", "inv_sqrt": "fp32"}
    const = dict(LEVELS=16, G=128, PERMUTE=False, HADAMARD=False, MIX_ROWS=False, KP=4096, C=16, RP=16, PLANES=True,
                 ABITS=4, INTERPRET=False, GLU=False, ROUND=0)
    ptx = {}
    for fusion in (True, False):
        src = ASTSource(fn=T._jitted("act"), signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
        try:
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "enable_fp_fusion": fusion})
        except RuntimeError as e:
            if "ptxas" in str(e).lower() or "backend" in str(e).lower():
                pytest.skip(f"no CUDA compiler backend: {e}")
            raise
        ptx[fusion] = k.asm["ptx"]
    assert "fma.rn.f32" in ptx[True]  # what contraction does to the quantizer
    assert "fma.rn.f32" not in ptx[False] and T.QUANT_LAUNCH_OPTIONS == {"enable_fp_fusion": False}


@needs_triton
@pytest.mark.slow
def test_every_bitplane_candidate_lowers_to_sm90(tmp_path, monkeypatch):
    """Each autotuning candidate compiles to sm_90 code with hardware popcounts, for activation planes and for the
    one-launch kernel, at one and four tokens per tile (~40 s): a GPU's first autotuning run meets no compile error."""
    from rcp_lib.kernels.triton_w2a4 import bitplane_configs

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    ks = _sass_tool()
    for quant_in in (False, True):
        for block_b in (1, 4):
            for cfg in bitplane_configs(128):
                cfg = dict(cfg)
                nw = cfg.pop("num_warps")
                r = ks.stats("bitplane", dict(ks._BP, QUANT_IN=quant_in, BLOCK_B=block_b, **cfg), nw)
                assert r["popc"] > 0, (quant_in, block_b, cfg)


# --------------------------------------------------------------------------------------------- merged projections
@needs_triton
@pytest.mark.heavy
@pytest.mark.parametrize("fmt", ["select", "bitplane"])
@pytest.mark.parametrize("tokens", [(1, 1), (2, 5)])
def test_merged_layer_on_the_fused_path_computes_each_layer(fmt, tokens):
    """q | k | v merged (:meth:`PackedLinear.concat`) on the fused path (decode: the select or bit-serial GEMV; 10
    tokens: the GEMM): each slice equals its own layer's fused output, which uses the same activation codes and the
    same rows."""
    from rcp_lib.deploy import PackedLinear

    K, G = 128, 32
    g = torch.Generator().manual_seed(3)
    layers = []
    for N in (32, 16, 16):
        codes = torch.randint(0, 4, (N, K), generator=g, dtype=torch.uint8)
        lut = torch.randn(N, K // G, 4, generator=g).sort(-1).values.add(0.3)  # rows with a non-zero mean
        layers.append(PackedLinear(pack_codes(codes, 2), lut, K, G, 2, torch.randn(N, generator=g), 4, 0.9,
                                   backend="triton", gemv_format=fmt))
    merged = PackedLinear.concat(layers)
    x = torch.randn(*tokens, K, generator=g) * 2
    with torch.no_grad():
        want = torch.cat([m(x) for m in layers], -1)
        got = merged(x)
    assert merged.kernel_path(x) == "fused" and (fmt == "select" or merged._bitplane())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


# --------------------------------------------------------------------------------------------- tiles
def test_weight_tiles_round_trip_and_record_layout():
    """Each record holds two groups of a row: P0 and P1 chunks of the first, of the second, then both groups'
    levels; a multiple of 4 words (16-byte aligned records, no padding); an odd last group is zeros."""
    from rcp_lib.kernels.layout import tile_record_words, tiles_to_planes, weight_tiles

    N, K, G = 3, 384, 128  # 3 groups: one full record and one with an empty second group
    codes = torch.randint(0, 4, (N, K), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    planes = weight_bitplanes(pack_codes(codes), K)
    for dt, rec, lw in ((torch.float16, 20, 2), (torch.float32, 24, 4)):
        lut = torch.randn(N, K // G, 4).to(dt)
        assert tile_record_words(G, dt) == rec and rec % 4 == 0
        t = weight_tiles(planes, lut, G)
        assert t.shape == (N, 2 * rec) and t.dtype == torch.int32
        r = t.reshape(N, 2, rec)
        assert torch.equal(r[1, 0, 8:12], planes[1, 0, 4:8]) and torch.equal(r[1, 0, 12:16], planes[1, 1, 4:8])
        assert torch.equal(r[2, 1, :4], planes[2, 0, 8:12])  # group 2: the second record's first group
        assert torch.equal(r[2, 0, 16 + lw:16 + 2 * lw].contiguous().view(dt), lut[2, 1])
        assert int(r[:, 1, 8:16].abs().sum()) == 0 and int(r[:, 1, 16 + lw:].abs().sum()) == 0  # no group 3
        p2, l2 = tiles_to_planes(t, K, G, dt)
        assert torch.equal(p2, planes) and torch.equal(l2, lut)
    assert tile_record_words(64, torch.float16) == 12 and tile_record_words(32, torch.float32) == 12
    with pytest.raises(ValueError, match="fp16 or fp32"):
        tile_record_words(128, torch.bfloat16)


@pytest.mark.heavy
@needs_triton
@pytest.mark.parametrize("case,lut_dtype", [(CASES[0], torch.float16), (CASES[0], torch.float32),
                                            (CASES[1], torch.float32), (CASES[-1], torch.float16)])
def test_bitplane_tiles_compute_what_the_planes_compute(case, lut_dtype):
    """The bit-serial kernel on tiles (planes and levels in one array) gives the planar kernel's output bit for bit
    (the same integer sums and levels, in the same order), in two launches and in one: odd group counts, a ragged and
    a deep split-K, fp16 and fp32 levels."""
    from rcp_lib.kernels.layout import weight_tiles
    from rcp_lib.kernels.triton_w2a4 import (pop_launch_config, quantize_activations_triton,
                                             w2a4_bitplane_linear_triton, w2a4_bitplane_matmul_triton)

    B, N, K, G, config = case
    codes, lut, x = _problem(B, N, K, G, seed=B + N)
    lut = lut.to(lut_dtype)
    packed = pack_codes(codes)
    bias = torch.randn(N)
    planes, s, z = quantize_activations_triton(x, 4, 1.0, G, planes=True)
    ws = weight_row_sums(packed, lut, K, G)
    wp = weight_bitplanes(packed, K)
    tiles = weight_tiles(wp, lut, G)
    want = w2a4_bitplane_matmul_triton(planes, s, z, wp, lut, ws, K, G, bias, torch.float32, config=config)
    got = w2a4_bitplane_matmul_triton(planes, s, z, tiles, lut, ws, K, G, bias, torch.float32, config=config)
    assert torch.equal(got, want) and pop_launch_config().startswith("bitplane_tiled ")
    want1 = w2a4_bitplane_linear_triton(x, wp, lut, ws, K, G, 4, 0.9, bias, torch.float32, config=config)
    got1 = w2a4_bitplane_linear_triton(x, tiles, lut, ws, K, G, 4, 0.9, bias, torch.float32, config=config)
    assert torch.equal(got1, want1)
    with pytest.raises(ValueError, match="weight tiles must be int32"):
        w2a4_bitplane_matmul_triton(planes, s, z, tiles[:, :-4], lut, ws, K, G)
