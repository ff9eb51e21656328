"""Pure-torch reference of the W2A4 op: the default implementation of ``torch.ops.rcp.w2a4_gemv`` (:mod:`.op`).

``y[B, N] = x_hat[B, K] @ W_hat[N, K]^T`` in float32 with

* ``x_hat = (x_codes - x_zero) * x_scale`` per token: :func:`rcp_lib.quant.activations.dequantize_per_token`, the
  integer form of the activation fake quantizer (codes from :func:`rcp_lib.quant.activations.quantize_per_token`;
  the zero point is a float, ``-lo / scale``, as in fake quantization);
* ``W_hat[n, k] = lut[n, k // G, code[n, k]]``: :func:`.bitpack.dequantize`.
"""

from __future__ import annotations

import torch

import torch.nn.functional as F

from ..quant.activations import dequantize_per_token, quantize_per_token
from ..rotation.online import online_hadamard
from .bitpack import dequantize

__all__ = ["w2a4_gemv_reference", "w2a4_linear_reference", "glu_input"]


def w2a4_gemv_reference(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    packed_w: torch.Tensor,
    lut: torch.Tensor,
    K: int,
    G: int,
    bits: int = 2,
) -> torch.Tensor:
    """Pure-torch W2A4 product (float32 dequantization and accumulation).

    Args:
        x_codes: ``[B, K]`` uint8 activation codes (or float activations with ``x_scale = 1``, ``x_zero = 0``).
        x_scale, x_zero: ``[B]`` (or ``[B, 1]``) per-token scale / zero point (any float dtype; used in float32).
        packed_w: ``int32 [N, ceil(K / (32 // bits))]`` packed weight codes (:func:`.bitpack.pack_codes`).
        lut: ``[N, ceil(K/G), 2**bits]`` levels (fp16 in the kernel format; float32 accepted).
        K, G, bits: input size, group size, weight code width.
    Returns:
        ``y = x_hat @ W_hat^T``, ``float32 [B, N]``.
    """
    B = x_codes.shape[0]
    w = dequantize(packed_w, lut, K, G, bits, dtype=torch.float32)  # [N, K]
    xh = dequantize_per_token(x_codes, x_scale.reshape(B).float(), x_zero.reshape(B).float())  # [B, K]
    return xh @ w.t()


def glu_input(gu: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` of ``gu [..., 2K]`` = ``[gate | up]``: the input of a gated MLP's down projection, with
    the two operations of the MLP's own forward (``act_fn(gate_proj(h)) * up_proj(h)``, SiLU) in ``gu.dtype``."""
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def w2a4_linear_reference(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    lut: torch.Tensor,
    bias: "torch.Tensor | None",
    K: int,
    G: int,
    bits: int,
    act_bits: int,
    act_clip_ratio: float,
    hadamard_n: int = 0,
    hadamard_block: int = 0,
    gemv_backend: "str | None" = None,
    glu: bool = False,
) -> torch.Tensor:
    """The deployed linear, operation for operation as fake quantization computes it (what the fused kernels
    reproduce): ``x [B, K]`` -> ``[B, N]`` in ``x.dtype``.

    ``glu``: ``x`` is ``[B, 2K]`` = ``[gate | up]`` and the layer's input is ``F.silu(gate) * up`` (a gated MLP's
    ``act_fn(gate_proj(h)) * up_proj(h)``, the same two torch ops), computed first.

    The online Hadamard (``hadamard_n``/``hadamard_block``: :func:`rcp_lib.rotation.online.online_hadamard`; 0: none),
    then with ``act_bits`` the
    per-token quantizer (:func:`rcp_lib.quant.activations.quantize_per_token`) and the W2A4 product
    (:func:`.op.w2a4_gemv` with ``gemv_backend``, float32) cast to ``x.dtype``; with ``act_bits == 0`` (A16) the
    dequantized weight in ``x.dtype`` through ``F.linear``; then the bias in the output dtype.
    """
    if glu:
        x = glu_input(x)
    if hadamard_n:
        x = online_hadamard(x, hadamard_n, hadamard_block)
    if not act_bits:
        y = F.linear(x, dequantize(packed_w, lut, K, G, bits, dtype=x.dtype))
    else:
        from .op import w2a4_gemv

        codes, s, z = quantize_per_token(x, act_bits, act_clip_ratio)
        y = w2a4_gemv(codes, s, z, packed_w, lut, K, G, bits, backend=gemv_backend).to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
