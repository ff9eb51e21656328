"""The kernel-side layout of the fused W2A4 path (:mod:`.triton_w2a4`): an activation permutation and the weight row
sums, both derived at deploy time; the stored weight format (:mod:`.bitpack`) is unchanged.

Why the activations move, not the weights
-----------------------------------------
In the stored format word ``j`` of a row holds the 16 codes ``k = 16 j + i`` (slot ``i`` in bits ``[2i, 2i+2)``). A
GEMV program loads a ``[BLOCK_N, COLS]`` tile of words (each row a contiguous run of ``COLS`` int32: one 128-bit
load gives a thread 4 words, 64 codes) and decodes slot ``i`` of every word at once with ``(w >> 2i) & 3``. Slot
``i`` of the words ``j`` of one group are the weights ``k = g G + 16 jj + i`` (``jj = 0 .. G/16 - 1``): a stride-16
set of positions. Instead of re-packing the weights so that they become contiguous (a second copy of the codes, or
a new on-disk format), the fused activation pre-kernel writes its codes in the matching order, within each group of
``G``::

    position p(k) = (k // G) G + (k % 16) (G / 16) + (k % G) // 16        (a transpose of [G/16, 16] -> [16, G/16])

so that the activations of slot ``i`` are the contiguous bytes ``x'[g G + i G/16 : g G + (i + 1) G/16]``. The dot
product is invariant under a common permutation of ``k``; the 2-bit weights stay as stored (:func:`.bitpack.pack_codes`,
saved by :func:`rcp_lib.deploy.save_quantized`, format version unchanged). Requires ``G % 16 == 0`` and
``K % G == 0`` (every deployed W2 layer here: G = 128, or the test sizes).

Zero point
----------
The activation zero point is a float (:func:`rcp_lib.quant.activations.quantize_per_token`, ``zero = -lo / scale``,
the decision taken for fake quantization). The kernels use
``sum_k (c_k - zero) w_k = sum_k c_k w_k - zero * sum_k w_k``: the codes ``c`` stay small integers (exact in fp16,
so the batch > 1 path can feed them to ``tl.dot``), and ``sum_k w_k`` is a per-row constant, :func:`weight_row_sums`
(float64 sums of the stored levels, kept in float32), computed once per layer at deploy time.

Bit planes (the bit-serial GEMV, :func:`.triton_w2a4.w2a4_bitplane_matmul_triton`)
--------------------------------------------------------------------------------
A second kernel layout, derived at deploy time from the same stored words: every run of 32 consecutive ``k`` (a
*chunk*, ``t = k // 32``) is held as bit planes, one 32-bit word per bit, bit ``i`` of a word for ``k = 32 t + i``.

* weights, :func:`weight_bitplanes`: ``int32 [N, 2, K / 32]``: ``P0[n, t]`` (bit 0 of the 2-bit codes) and ``P1``
  (bit 1), the same 2 bits per weight as the stored format (a permutation of its bits);
* activations, :func:`activation_bitplanes`: ``int32 [B, A, K / 32]``, one plane per bit of the ``A``-bit codes
  (what the pre-kernel writes with ``planes=True``).

With ``c = b0 + 2 b1`` and ``a = sum_j 2^j a_j``, the dot product of a group ``g`` is exact in integers up to the
four levels::

    sum_k a_k lut[c_k] = l0 Qa + (l1 - l0) Q0 + (l2 - l0) Q1 + (l3 - l2 - l1 + l0) Q01
    Qa  = sum_j 2^j popcount(A_j)             Q0  = sum_j 2^j popcount(A_j & P0)
    Q1  = sum_j 2^j popcount(A_j & P1)        Q01 = sum_j 2^j popcount(A_j & P0 & P1)     (summed over the chunks)

(``c = 1``: ``l0 + (l1 - l0)``; ``c = 2``: ``l0 + (l2 - l0)``; ``c = 3``: all four terms, ``l3``.) 12 AND + 12
popcounts give 32 products of one row; no per-weight decode, select or float multiply. Requires ``K % 32 == 0`` and
``G % 32 == 0`` (:func:`bitplane_layout_supported`).

Tiles (the bit-serial GEMV on one stream per row, ``gemv_format="bitplane_tiled"``)
------------------------------------------------------------------------------------
The bit planes and the level table are two arrays: a program that reads group ``g`` of a row reads ``G / 32`` words of
``P0``, ``G / 32`` of ``P1`` (``K / 32`` words further) and the group's 4 levels from the LUT, three places in
memory. :func:`weight_tiles` interleaves them per row and pair of groups into one record of
:func:`tile_record_words` int32 words: ``P0`` and ``P1`` chunks of the first group, of the second, then the two
groups' four levels each (2 words per group in fp16, 4 in fp32): a multiple of 4 words, so every record starts
16-byte aligned (128-bit loads) with no padding, and the tiles hold exactly the bytes of the planes and the LUT (an odd
last group excepted). A row is one contiguous run of records, and the groups a program takes in one iteration one
contiguous block. Derived at deploy time like the planes (not saved).
Whether one stream beats three on a GPU is for a GPU to measure.
"""

from __future__ import annotations

import torch

from .bitpack import codes_per_word, dequantize, pack_codes, unpack_codes

__all__ = ["activation_permutation", "permute_activations", "unpermute_activations", "weight_row_sums",
           "fused_layout_supported", "bitplane_layout_supported", "weight_bitplanes", "weight_bitplanes_to_packed",
           "activation_bitplanes", "bitplanes_to_codes", "GEMV_FORMATS", "tile_record_words", "weight_tiles",
           "tiles_to_planes"]


def fused_layout_supported(K: int, G: int, bits: int = 2) -> bool:
    """Whether the fused kernels run this shape: 2-bit weights, ``G % 16 == 0`` and ``K % G == 0``."""
    return bits == 2 and G > 0 and G % codes_per_word(bits) == 0 and K % G == 0 and K > 0


def _check(K: int, G: int) -> None:
    if not fused_layout_supported(K, G):
        raise ValueError(f"the fused W2A4 layout needs G % 16 == 0 and K % G == 0, got K={K}, G={G}")


def activation_permutation(K: int, G: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``p [K]`` (int64): activation ``k`` goes to position ``p[k]`` (module docstring). A bijection of ``0..K-1``."""
    _check(K, G)
    k = torch.arange(K, device=device)
    wpg = G // 16
    return (k // G) * G + (k % 16) * wpg + (k % G) // 16


def permute_activations(x: torch.Tensor, G: int) -> torch.Tensor:
    """``x' [..., K]`` with ``x'[..., p[k]] = x[..., k]`` (what the pre-kernel writes)."""
    K = x.shape[-1]
    out = torch.empty_like(x)
    out[..., activation_permutation(K, G, x.device)] = x
    return out


def unpermute_activations(xp: torch.Tensor, G: int) -> torch.Tensor:
    """Inverse of :func:`permute_activations`: ``x[..., k] = x'[..., p[k]]``."""
    return xp[..., activation_permutation(xp.shape[-1], G, xp.device)]


@torch.no_grad()
def weight_row_sums(packed: torch.Tensor, lut: torch.Tensor, K: int, G: int, bits: int = 2,
                    rows_per_chunk: int = 1024) -> torch.Tensor:
    """``sum_k W_hat[n, k]`` as float32 ``[N]`` (accumulated in float64, in chunks of rows to bound the temporary)."""
    N = packed.shape[0]
    out = torch.empty(N, dtype=torch.float32, device=packed.device)
    for n0 in range(0, N, rows_per_chunk):
        n1 = min(N, n0 + rows_per_chunk)
        out[n0:n1] = dequantize(packed[n0:n1], lut[n0:n1], K, G, bits, dtype=torch.float64).sum(1).float()
    return out


# ------------------------------------------------------------------------------------------------------ bit planes
GEMV_FORMATS = ("select", "bitplane", "bitplane_tiled")
"""Launch-2 kernels of the fused decode path (``B <= GEMV_MAX_BATCH``, :mod:`.triton_w2a4`): "select" reads the stored
words and selects each weight's level (``w2a4_matmul_triton``), "bitplane" the bit planes
(``w2a4_bitplane_matmul_triton`` / ``w2a4_bitplane_linear_triton``), "bitplane_tiled" the same kernel on the planes
and levels interleaved per (row, group) (:func:`weight_tiles`)."""


def bitplane_layout_supported(K: int, G: int, bits: int = 2) -> bool:
    """Whether the bit-serial GEMV runs this shape: 2-bit weights, ``G % 32 == 0`` and ``K % G == 0``."""
    return bits == 2 and G > 0 and G % 32 == 0 and K % G == 0 and K > 0


def _to_int32_bits(v: torch.Tensor) -> torch.Tensor:
    """int64 values in ``[0, 2**32)`` reinterpreted as two's complement int32."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _planes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """``codes [R, K]`` (integers below ``2**nbits``, ``K % 32 == 0``) -> int32 ``[R, nbits, K / 32]``."""
    R, K = codes.shape
    c = codes.to(torch.int64).reshape(R, K // 32, 32)
    lane = torch.arange(32, device=codes.device, dtype=torch.int64)
    return torch.stack([_to_int32_bits((((c >> j) & 1) << lane).sum(-1)) for j in range(nbits)], dim=1)


def bitplanes_to_codes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of the plane layout: int32 ``[R, nbits, K / 32]`` -> uint8 codes ``[R, K]``."""
    R, nbits, KC = planes.shape
    w = planes.to(torch.int64) & 0xFFFFFFFF
    lane = torch.arange(32, device=planes.device, dtype=torch.int64)
    bits = (w.unsqueeze(-1) >> lane) & 1  # [R, nbits, KC, 32]
    c = sum(bits[:, j] << j for j in range(nbits))
    return c.reshape(R, KC * 32).to(torch.uint8)


@torch.no_grad()
def weight_bitplanes(packed: torch.Tensor, K: int, rows_per_chunk: int = 1024) -> torch.Tensor:
    """The stored 2-bit words (:func:`.bitpack.pack_codes`, ``int32 [N, K / 16]``) as bit planes ``int32 [N, 2, K / 32]``
    (module docstring; ``K % 32 == 0``). Converted in chunks of rows to bound the temporary."""
    if K % 32 or packed.dim() != 2:
        raise ValueError(f"bit planes need packed [N, K/16] with K % 32 == 0, got K={K}, {tuple(packed.shape)}")
    N = packed.shape[0]
    out = torch.empty(N, 2, K // 32, dtype=torch.int32, device=packed.device)
    for n0 in range(0, N, rows_per_chunk):
        n1 = min(N, n0 + rows_per_chunk)
        out[n0:n1] = _planes(unpack_codes(packed[n0:n1], K, 2), 2)
    return out


def weight_bitplanes_to_packed(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_bitplanes`: ``int32 [N, 2, K / 32]`` -> the stored words ``int32 [N, K / 16]``."""
    if planes.dim() != 3 or planes.shape[1] != 2:
        raise ValueError(f"weight planes must be [N, 2, K/32], got {tuple(planes.shape)}")
    return pack_codes(bitplanes_to_codes(planes), 2)


def activation_bitplanes(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Activation codes ``[B, K]`` (natural order, values below ``2**bits``, ``K % 32 == 0``) as bit planes
    ``int32 [B, bits, K / 32]`` (what the pre-kernel writes with ``planes=True``)."""
    if codes.dim() != 2 or codes.shape[1] % 32:
        raise ValueError(f"activation planes need codes [B, K] with K % 32 == 0, got {tuple(codes.shape)}")
    return _planes(codes, bits)


# ------------------------------------------------------------------------------------------------------ tiles
def tile_record_words(G: int, lut_dtype: torch.dtype) -> int:
    """int32 words of one record of :func:`weight_tiles`: two groups of a row, each ``2 G / 32`` plane words and four
    levels (2 words in fp16, 4 in fp32): a multiple of 4 words, so every record starts 16-byte aligned without
    padding."""
    if lut_dtype not in (torch.float16, torch.float32):
        raise ValueError(f"tiles hold fp16 or fp32 levels, got {lut_dtype}")
    return 2 * (2 * (G // 32) + (2 if lut_dtype == torch.float16 else 4))


@torch.no_grad()
def weight_tiles(planes: torch.Tensor, lut: torch.Tensor, G: int) -> torch.Tensor:
    """Weight planes ``int32 [N, 2, K / 32]`` (:func:`weight_bitplanes`) and levels ``[N, K / G, 4]`` (fp16 / fp32) as
    one ``int32 [N, ceil(K / G / 2) * R]`` array (module docstring, "Tiles"; ``R`` = :func:`tile_record_words`):
    record ``r`` of row ``n`` holds groups ``g = 2 r, 2 r + 1``: ``P0`` then ``P1`` of group ``2 r``'s chunks, the
    same for ``2 r + 1``, then the four levels' bits of ``2 r`` and of ``2 r + 1`` (an odd last group: zeros)."""
    N, two, KC = planes.shape
    if two != 2 or planes.dtype != torch.int32 or G % 32 or (KC * 32) % G:
        raise ValueError(f"weight planes must be int32 [N, 2, K/32] with G % 32 == 0 dividing K, got "
                         f"{planes.dtype} {tuple(planes.shape)}, G={G}")
    NG, CH = KC * 32 // G, G // 32
    if tuple(lut.shape) != (N, NG, 4):
        raise ValueError(f"lut must be [N={N}, {NG}, 4], got {tuple(lut.shape)}")
    lw = 2 if lut.dtype == torch.float16 else 4
    NP = -(-NG // 2)
    p = torch.zeros(N, 2 * NP, 2, CH, dtype=torch.int32, device=planes.device)  # [row, group, plane, chunk]
    p[:, :NG] = planes.reshape(N, 2, NG, CH).transpose(1, 2)
    lv = torch.zeros(N, 2 * NP, lw, dtype=torch.int32, device=planes.device)
    lv[:, :NG] = lut.contiguous().view(torch.int32).reshape(N, NG, lw)
    rec = torch.cat([p.reshape(N, NP, 4 * CH), lv.reshape(N, NP, 2 * lw)], dim=2)
    return rec.reshape(N, NP * tile_record_words(G, lut.dtype))


def tiles_to_planes(tiles: torch.Tensor, K: int, G: int, lut_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`weight_tiles`: ``(planes int32 [N, 2, K / 32], lut [N, K / G, 4])``."""
    N, NG, CH = tiles.shape[0], K // G, G // 32
    lw = 2 if lut_dtype == torch.float16 else 4
    NP = -(-NG // 2)
    t = tiles.reshape(N, NP, tile_record_words(G, lut_dtype))
    p = t[:, :, :4 * CH].reshape(N, 2 * NP, 2, CH)[:, :NG]
    planes = p.transpose(1, 2).reshape(N, 2, K // 32).contiguous()
    lut = t[:, :, 4 * CH:].reshape(N, 2 * NP, lw)[:, :NG].contiguous().view(lut_dtype).reshape(N, NG, 4)
    return planes, lut
