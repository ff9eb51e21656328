"""Pack/unpack round trips, the documented bit layout, and LUT dequantization (float64 references)."""

import pytest
import torch

from rcp_lib.kernels import dequantize, pack_codes, packed_words, unpack_codes
from rcp_lib.quant.quantizers import group_view, minmax_range, nearest_level_codes, uniform_levels


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("K", [1, 7, 15, 16, 17, 33, 200])
def test_round_trip_exact(bits, K):
    codes = torch.randint(0, 1 << bits, (5, K), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, -(-K // (32 // bits))) == (5, packed_words(K, bits))
    out = unpack_codes(packed, K, bits)
    assert out.dtype == torch.uint8 and torch.equal(out, codes)


def test_round_trip_leading_dims_and_all_ones():
    codes = torch.randint(0, 4, (2, 3, 50), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes), 50), codes)
    full = torch.full((4, 32), 3, dtype=torch.uint8)  # every bit set: words are -1 in two's complement
    p = pack_codes(full)
    assert (p == -1).all()
    assert torch.equal(unpack_codes(p, 32), full)


@pytest.mark.parametrize("bits", [2, 4])
def test_documented_layout(bits):
    """Word j of a row holds codes k = j*CPW + i in bits [bits*i, bits*i + bits); the tail pads with 0."""
    cpw = 32 // bits
    K = cpw + 3
    codes = torch.randint(0, 1 << bits, (1, K), dtype=torch.uint8)
    p = pack_codes(codes, bits)
    for j in range(p.shape[1]):
        expect = 0
        for i in range(cpw):
            k = j * cpw + i
            c = int(codes[0, k]) if k < K else 0
            expect |= c << (bits * i)
        got = int(p[0, j]) & 0xFFFFFFFF
        assert got == expect


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(TypeError):
        pack_codes(torch.zeros(2, 16), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(2, 16, dtype=torch.uint8), 3)
    with pytest.raises(ValueError):
        unpack_codes(torch.zeros(2, 2, dtype=torch.int32), 40)


@pytest.mark.parametrize("N,K,G,bits", [(8, 64, 32, 2), (5, 200, 40, 2), (3, 70, 32, 2), (4, 24, 8, 4)])
def test_dequantize_matches_elementwise_definition(N, K, G, bits):
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8)
    ng = -(-K // G)
    lut = torch.randn(N, ng, 1 << bits).half()
    W = dequantize(pack_codes(codes, bits), lut, K, G, bits, dtype=torch.float64)
    ref = torch.empty(N, K, dtype=torch.float64)
    for n in range(N):
        for k in range(K):
            ref[n, k] = float(lut[n, k // G, int(codes[n, k])])
    assert W.dtype == torch.float64 and torch.equal(W, ref)


def test_quantizer_codes_and_levels_pack_to_nearest_levels():
    """Codes and levels from the weight quantizer's helpers, packed and dequantized: every weight gets its nearest
    level of its group (float64 distances), the group extremes exactly."""
    w = torch.randn(6, 72)
    wg = group_view(w, 24)  # [6, 3, 24]
    lv = uniform_levels(*minmax_range(wg), 2)  # [6, 3, 4] float32
    assert lv.shape == (6, 3, 4) and lv.dtype == torch.float32 and (lv.diff(dim=-1) >= 0).all()
    codes = nearest_level_codes(wg, lv).reshape(6, 72).to(torch.uint8)
    assert int(codes.max()) <= 3
    wq = dequantize(pack_codes(codes), lv, 72, 24)
    grp = torch.arange(72) // 24
    dist_all = (w.double().unsqueeze(-1) - lv.double()[:, grp, :]).abs()
    assert torch.allclose((w.double() - wq.double()).abs(), dist_all.min(-1).values, atol=1e-7)
    g0 = w[:, :24]
    assert torch.allclose(wq[:, :24].amax(1), g0.amax(1)) and torch.equal(wq[:, :24].amin(1), g0.amin(1))
