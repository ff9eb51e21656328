"""Bit-packing of low-bit weight codes and non-uniform (LUT) dequantization (the tensor format of the W2A4 op).

Not to be confused with :mod:`rcp_lib.deploy`, which saves and loads whole packed models (and holds the deployed
layer, :class:`rcp_lib.kernels.packed_linear.PackedLinear`). The codes and levels come from the weight quantizers of
:mod:`rcp_lib.quant.quantizers` (``WeightQuantizer.export``, ``nearest_level_codes``, ``uniform_levels``).

Packed format
-------------
A linear layer ``W [N_out, K_in]`` quantized non-uniformly to ``bits`` bits, with groups of ``G``
consecutive *input* elements per output row, is stored as two tensors:

* ``packed``: ``int32 [N, KW]`` with ``KW = ceil(K / CPW)`` and ``CPW = 32 // bits`` codes per word
  (16 for 2-bit, 8 for 4-bit). Word ``packed[n, j]`` holds the codes of ``k = j*CPW + i`` for
  ``i = 0..CPW-1``, code ``i`` in bits ``[bits*i, bits*i + bits)`` (little-endian inside the word)::

      packed[n, j] = sum_i codes[n, j*CPW + i] << (bits * i)      (two's complement int32)

  When ``K`` is not a multiple of ``CPW`` the last word of each row is padded with code 0; ``K`` itself
  is not stored in the tensor and must be passed along (:class:`rcp_lib.kernels.packed_linear.PackedLinear` keeps it as
  ``in_features``).
* ``lut``: ``fp16 [N, ceil(K / G), 2**bits]``: the (non-uniform, learnable) levels of each group.
  ``W_hat[n, k] = lut[n, k // G, code[n, k]]``. A ragged last group (``K % G != 0``) is allowed.

Why packed along K, row-major, in int32
---------------------------------------
* It keeps the ``[out, in]`` orientation of ``nn.Linear.weight``: one output row's codes are one
  contiguous byte stream (``K/4`` bytes for 2-bit), so slicing by output rows (tensor parallel, or a
  GEMV program owning ``BLOCK_N`` rows) is a view, and the group's LUT ``lut[n, g, :]`` (8 bytes for
  2-bit) sits next to the codes it decodes.
* In the GEMV kernel (``triton_gemv.py``) a program owns ``BLOCK_N`` rows and walks K in ``BLOCK_K``
  chunks; the lanes of a warp walk along K, so neighbouring lanes read neighbouring 4-byte words of the
  same row: each row of the tile is a contiguous ``BLOCK_K/4``-byte segment (64 bytes for BLOCK_K=256),
  i.e. full, aligned memory transactions. The reduction over K stays inside a program (no split-K
  atomics) and the activation chunk ``x[:, k0:k0+BLOCK_K]`` is reused across all ``BLOCK_N`` rows.
* The fused path of ``PackedLinear`` (``triton_w2a4.py``) reads the same words, a row's run of words per
  program in 128-bit loads, with split-K; it decodes slot ``i`` of every word at once, and its activation
  pre-kernel writes the codes in the matching order (``layout.py``), so this format needs no repacking.
* 32-bit words are the native load width; one word yields 16 codes with shifts/masks by constants, and
  a 2-bit ``CPW`` of 16 divides every power-of-two ``BLOCK_K`` and the usual group sizes (32..128), so
  a word never straddles two groups when ``G % 16 == 0``.

``bits`` may be 1, 2, 4 or 8 (any divisor of 32 up to 8); 2 is the main (W2) path, 4 is used for A4
activation codes and W4 weights.
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_BITS",
    "codes_per_word",
    "packed_words",
    "pack_codes",
    "unpack_codes",
    "dequantize",
]

SUPPORTED_BITS = (1, 2, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def codes_per_word(bits: int) -> int:
    """Number of ``bits``-bit codes in one int32 word (16 for 2-bit, 8 for 4-bit)."""
    _check_bits(bits)
    return 32 // bits


def packed_words(K: int, bits: int = 2) -> int:
    """Number of int32 words per row for ``K`` codes (``ceil(K / codes_per_word(bits))``)."""
    cpw = codes_per_word(bits)
    return -(-K // cpw)


def pack_codes(codes: torch.Tensor, bits: int = 2) -> torch.Tensor:
    """Pack integer codes along the last dimension, ``32 // bits`` codes per int32 word.

    Args:
        codes: integer tensor ``[..., K]`` (any integer dtype, typically uint8) with values in
            ``0 .. 2**bits - 1``.
        bits: code width, one of :data:`SUPPORTED_BITS`.

    Returns:
        ``int32 [..., ceil(K / (32 // bits))]``, on the device of ``codes``; the tail is padded with code 0.
        Layout: see the module docstring.
    """
    cpw = codes_per_word(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dimension")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}")
    K = c.shape[-1]
    KW = packed_words(K, bits)
    pad = KW * cpw - K
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], KW, cpw)
    shifts = torch.arange(cpw, device=c.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(dim=-1)  # in [0, 2**32)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's complement int32
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, K: int, bits: int = 2) -> torch.Tensor:
    """Exact inverse of :func:`pack_codes`.

    Args:
        packed: ``int32 [..., KW]`` as produced by :func:`pack_codes`.
        K: number of codes per row (``KW == ceil(K / (32 // bits))`` is checked).
        bits: code width.

    Returns:
        ``uint8 [..., K]`` codes.
    """
    cpw = codes_per_word(bits)
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {packed.dtype}")
    KW = packed.shape[-1]
    if KW != packed_words(K, bits):
        raise ValueError(f"packed has {KW} words per row, but K={K} at {bits} bits needs {packed_words(K, bits)}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(cpw, device=packed.device, dtype=torch.int64) * bits
    c = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    c = c.reshape(*packed.shape[:-1], KW * cpw)[..., :K]
    return c.to(torch.uint8)


def _check_lut(lut: torch.Tensor, N: int, K: int, G: int, bits: int) -> None:
    ng = -(-K // G)
    if lut.dim() != 3 or lut.shape[0] != N or lut.shape[1] != ng or lut.shape[2] != (1 << bits):
        raise ValueError(f"lut must have shape [N={N}, ceil(K/G)={ng}, 2**bits={1 << bits}], got {tuple(lut.shape)}")


def dequantize(
    packed: torch.Tensor, lut: torch.Tensor, K: int, G: int, bits: int = 2, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize a packed non-uniform weight: ``W_hat[n, k] = lut[n, k // G, code[n, k]]``.

    Args:
        packed: ``int32 [N, KW]`` packed codes.
        lut: ``[N, ceil(K/G), 2**bits]`` levels (fp16 in storage; any float dtype accepted).
        K: input features; G: group size along K; bits: code width.
        dtype: output dtype (the LUT values are converted, not re-rounded).

    Returns:
        ``W_hat`` of shape ``[N, K]`` and dtype ``dtype``.
    """
    if G <= 0:
        raise ValueError("group size G must be positive")
    N = packed.shape[0]
    _check_lut(lut, N, K, G, bits)
    codes = unpack_codes(packed, K, bits).long()  # [N, K]
    grp = torch.arange(K, device=packed.device) // G  # [K]
    lut_rows = lut.to(dtype)[:, grp, :]  # [N, K, L]
    return torch.gather(lut_rows, 2, codes.unsqueeze(-1)).squeeze(-1)
