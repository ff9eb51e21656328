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
saved by :func:`rcp_lib.packing.save_quantized`, format version unchanged). Requires ``G % 16 == 0`` and
``K % G == 0`` (every deployed W2 layer here: G = 128, or the test sizes).

Zero point
----------
The activation zero point is a float (:func:`rcp_lib.quant.activations.quantize_per_token`, ``zero = -lo / scale``,
the decision taken for fake quantization). The kernels use
``sum_k (c_k - zero) w_k = sum_k c_k w_k - zero * sum_k w_k``: the codes ``c`` stay small integers (exact in fp16,
so the batch > 1 path can feed them to ``tl.dot``), and ``sum_k w_k`` is a per-row constant, :func:`weight_row_sums`
(float64 sums of the stored levels, kept in float32), computed once per layer at deploy time.
"""

from __future__ import annotations

import torch

from .bitpack import codes_per_word, dequantize

__all__ = ["activation_permutation", "permute_activations", "unpermute_activations", "weight_row_sums",
           "fused_layout_supported"]


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
