"""Sequency-ordered Walsh matrices and GSR (Grouped Sequency-arranged Rotation, arXiv 2505.03810).

The sequency of a ±1 row is its number of sign changes. The Walsh matrix orders the rows of the natural
(Sylvester) Hadamard matrix by sequency: row ``s`` is natural row ``bitrev(gray(s))`` with
``gray(s) = s ^ (s >> 1)``, so row ``s`` has exactly ``s`` sign changes. It is symmetric and orthogonal
(here orthonormal). GSR's training-free R1 is the block-diagonal matrix of small Walsh blocks: similar
frequencies are grouped, and an outlier channel only mixes within its block.
"""

from __future__ import annotations

import torch

from .hadamard import hadamard
from .hadamard import random_signs as _random_signs

__all__ = ["walsh", "gsr", "block_hadamard", "largest_pow2_divisor", "sequency"]


def largest_pow2_divisor(n: int) -> int:
    """Largest power of two dividing ``n`` (576 -> 64, 4096 -> 4096, 11008 -> 256)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return n & (-n)


def _check_pow2(n: int, what: str) -> None:
    if n < 1 or n & (n - 1):
        raise ValueError(f"{what} must be a power of two, got {n}")


def sequency(rows: torch.Tensor) -> torch.Tensor:
    """Number of sign changes along the last dim of ``rows [..., n]`` (int64 ``[...]``)."""
    s = torch.sign(rows)
    return (s[..., 1:] != s[..., :-1]).sum(-1)


def _bitrev(v: int, bits: int) -> int:
    return int(format(v, f"0{bits}b")[::-1], 2) if bits else 0


def walsh(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sequency-ordered Walsh-Hadamard matrix ``[n, n]``, orthonormal; ``n`` a power of two."""
    _check_pow2(n, "walsh order n")
    bits = n.bit_length() - 1
    order = [_bitrev(s ^ (s >> 1), bits) for s in range(n)]
    return hadamard(n, dtype)[order]


def _block_diag(block: torch.Tensor, n: int) -> torch.Tensor:
    return torch.block_diag(*([block] * (n // block.shape[0])))


def _check_block(n: int, block: int, what: str) -> None:
    if block < 1 or n % block:
        raise ValueError(f"{what} {block} does not divide n={n}; the largest power-of-two block that does is "
                         f"{largest_pow2_divisor(n)}")


def _signed_block_diag(block_matrix: torch.Tensor, n: int, random_signs: bool, seed: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """``kron(I, block_matrix)`` ``[n, n]``, times ``diag(s)`` on the input side when ``random_signs``."""
    R = _block_diag(block_matrix, n)
    if random_signs:
        R = _random_signs(n, seed)[:, None] * R
    return R.to(dtype)


def gsr(n: int, block: int, random_signs: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """GSR rotation ``[n, n]``: block-diagonal of ``walsh(block)``; with ``random_signs`` ``diag(s) @ R``.

    The random signs act on the input before the mixing, as in :func:`~rcp_lib.rotation.hadamard.random_hadamard`.

    Raises:
        ValueError: ``block`` is not a power of two or does not divide ``n``.
    """
    _check_pow2(block, "GSR block")
    _check_block(n, block, "GSR block")
    return _signed_block_diag(walsh(block), n, random_signs, seed, dtype)


def block_hadamard(n: int, block: int, random_signs: bool = False, seed: int = 0,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Block-diagonal natural-order Hadamard ``[n, n]`` (``kron(I_{n/block}, hadamard(block))``).

    The control for GSR: the same blocks as :func:`gsr` with the rows in natural (Sylvester/Paley) order
    instead of sequency order; also the explicit option for sizes with no full Hadamard matrix. ``block`` may be
    any order :func:`~rcp_lib.rotation.hadamard.hadamard` can build (e.g. 64, 128, 12·2^k).

    Raises:
        ValueError: ``block`` does not divide ``n`` or no Hadamard matrix of that order can be built.
    """
    _check_block(n, block, "block")
    return _signed_block_diag(hadamard(block), n, random_signs, seed, dtype)
