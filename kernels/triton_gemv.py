"""Triton GEMV/GEMM-for-small-batch kernel for non-uniform low-bit weights and per-token A4 activations.

Computes ``y[B, N] = x_hat[B, K] @ W_hat[N, K]^T`` in fp32 where

* ``W_hat[n, k] = lut[n, k // G, code[n, k]]`` with codes packed 16 (2-bit) per int32 along K
  (layout: :mod:`rcp_lib.kernels.bitpack`), the LUT in fp16 (converted to fp32 in registers);
* ``x_hat[b, k] = (x_codes[b, k] - zero[b]) * scale[b]``: the integer form of the per-token activation quantizer
  (:func:`rcp_lib.quant.activations.quantize_per_token`, the formula used in fake quantization; codes 0..15 in
  uint8 for A4). The zero point is a float, ``zero = -lo / scale`` (not rounded, as in fake quantization; an
  integer only for ``round_zero=True``). Passing float activations with ``scale = 1`` and ``zero = 0`` gives a
  weight-only (W2A16) product.

Formulation: the per-token scale is factored out of the K loop,
``y[b, n] = scale[b] * sum_k (c[b, k] - zero[b]) * W_hat[n, k]``; ``c - zero`` is computed in fp32 (one rounding
for a float zero point, exact for an integer one), then the fp32 products/sums. The torch reference
(:func:`rcp_lib.kernels.reference.w2a4_gemv_reference`) multiplies by the scale before the sum instead; the two
agree to fp32 rounding.

Program layout: program ``(pid_n, pid_b)`` owns ``BLOCK_N`` output rows and ``BLOCK_B`` tokens and loops
over K in ``BLOCK_K`` chunks. Per chunk it loads the packed words of its rows (the lanes of a row read
consecutive words: coalesced; the 16 lanes that decode one word load the same address, which the memory
system serves as one transaction), unpacks with ``(word >> (2*i)) & 3``, gathers the level from the group's
4-entry LUT (cached: 8 bytes per group and row), and accumulates the ``[BLOCK_B, BLOCK_N]`` partial products in
fp32. N, K and B need not be multiples of the blocks (masked loads/stores).

Importing this module requires triton. The kernel is JIT-decorated lazily (at first launch) so that
``TRITON_INTERPRET=1`` set after ``import triton`` is still honoured: triton 3.9 reads the knob when
``triton.jit`` runs, but its standard-library functions (``tl.sum`` ...) were decorated at ``import triton``,
so under the interpreter the kernel reduces with ``tl.reduce(.., tl.standard._sum_combine)`` (patched by the
interpreter) instead of ``tl.sum`` (``INTERPRET`` constexpr). Under the interpreter the kernel runs on CPU
tensors (correctness only; ~3000x slower than torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bitpack import codes_per_word, packed_words

__all__ = ["w2a4_gemv_triton", "interpret_mode"]


def _w2a4_gemv_kernel(
    x_ptr,  # [B, K] uint8 codes (or float activations)
    xs_ptr,  # [B] fp32 per-token scale
    xz_ptr,  # [B] fp32 per-token zero point
    w_ptr,  # [N, KW] int32 packed codes
    lut_ptr,  # [N, NG, 2**BITS] fp16 levels (contiguous)
    y_ptr,  # [B, N] fp32 output
    B,
    N,
    K,
    G,
    stride_xb,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ln,
    stride_lg,
    stride_yb,
    stride_yn,
    BITS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WORD_LOADS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    CPW: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    KW = (K + CPW - 1) // CPW
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_n = offs_n < N
    mask_b = offs_b < B
    zero = tl.load(xz_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)  # [BLOCK_B]
    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)  # builtin (tl.zeros is a jit helper)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        wmask = mask_n[:, None] & mask_k[None, :]
        if WORD_LOADS:
            # one load per packed word, then 3-D shift/mask and a row-major reshape (k = kw * CPW + i)
            offs_kw = k0 // CPW + tl.arange(0, BLOCK_K // CPW)
            kwmask = mask_n[:, None] & (offs_kw[None, :] < KW)
            words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_kw[None, :] * stride_wk, mask=kwmask, other=0)
            shifts = tl.arange(0, CPW) * BITS
            codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & MASK, (BLOCK_N, BLOCK_K))
        else:
            # element (n, k) reads word k // CPW of row n (the CPW lanes of one word share one address)
            words = tl.load(
                w_ptr + offs_n[:, None] * stride_wn + (offs_k[None, :] // CPW) * stride_wk, mask=wmask, other=0
            )
            codes = (words >> ((offs_k[None, :] % CPW) * BITS)) & MASK  # [BLOCK_N, BLOCK_K] int32
        grp = offs_k // G
        w = tl.load(
            lut_ptr + offs_n[:, None] * stride_ln + grp[None, :] * stride_lg + codes, mask=wmask, other=0.0
        ).to(tl.float32)  # [BLOCK_N, BLOCK_K] dequantized weights (0 where masked)
        xmask = mask_b[:, None] & mask_k[None, :]
        xc = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :] * stride_xk, mask=xmask, other=0)
        xc = tl.where(xmask, xc.to(tl.float32) - zero[:, None], 0.0)  # [BLOCK_B, BLOCK_K] centred codes
        prod = xc[:, None, :] * w[None, :, :]  # [BLOCK_B, BLOCK_N, BLOCK_K]
        if INTERPRET:
            # tl.sum is itself a @triton.jit function, unusable by the interpreter when triton was imported
            # before TRITON_INTERPRET=1 was set; the interpreter maps reduce(_sum_combine) to numpy.sum.
            acc += tl.reduce(prod, 2, tl.standard._sum_combine)
        else:
            acc += tl.sum(prod, axis=2)
    scale = tl.load(xs_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)
    y = acc * scale[:, None]
    ymask = mask_b[:, None] & mask_n[None, :]
    tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :] * stride_yn, y, mask=ymask)


_JITTED: dict[bool, object] = {}


def interpret_mode() -> bool:
    """Whether triton currently runs kernels in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton: env var only
        import os

        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _kernel():
    interp = interpret_mode()
    if interp not in _JITTED:
        _JITTED[interp] = triton.jit(_w2a4_gemv_kernel)
    return _JITTED[interp]


def _default_blocks(B: int, interp: bool) -> tuple[int, int, int]:
    block_b = min(triton.next_power_of_2(max(B, 1)), 8)
    if interp:  # few, large programs: the interpreter's cost is per program and per op
        return block_b, 32, 128
    # GPU: small BLOCK_N gives enough programs to fill the SMs at N=2048..11008; the 3-D partial
    # product has BLOCK_B*BLOCK_N*BLOCK_K elements, kept <= 8192 to limit register pressure.
    block_n = 16 if block_b <= 2 else 8
    block_k = max(64, min(256, 8192 // (block_b * block_n)))
    return block_b, block_n, block_k


def w2a4_gemv_triton(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    packed_w: torch.Tensor,
    lut: torch.Tensor,
    K: int,
    G: int,
    bits: int = 2,
    block_b: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    word_loads: bool = False,
) -> torch.Tensor:
    """Launch the Triton kernel.

    Args:
        x_codes: ``[B, K]`` uint8 activation codes (or float activations with scale 1 / zero 0).
        x_scale, x_zero: ``[B]`` (or ``[B, 1]``) per-token scale and (float) zero point (module docstring).
        packed_w: ``int32 [N, ceil(K / (32 // bits))]``. lut: ``[N, ceil(K/G), 2**bits]`` (fp16).
        K, G, bits: input features, group size, weight code width.
        block_b, block_n, block_k: tile sizes (powers of two); defaults depend on B and interpreter mode.
        num_warps: warps per program (ignored by the interpreter).
        word_loads: unpacking variant. False (default): every code lane loads its word (``k // CPW``) and
            shifts by ``(k % CPW) * bits``, the GPTQ-Triton style; True: one load per word, a 3-D
            ``[BLOCK_N, BLOCK_K/CPW, CPW]`` shift/mask and a reshape (needs ``block_k >= 32 // bits``).
            Both are exact; which is faster is a GPU question (``benchmarks/bench_kernel.py --tune`` tries both).

    Returns:
        ``float32 [B, N]`` on the device of the inputs.
    """
    if x_codes.dim() != 2 or x_codes.shape[1] != K:
        raise ValueError(f"x_codes must be [B, K={K}], got {tuple(x_codes.shape)}")
    B = x_codes.shape[0]
    N = packed_w.shape[0]
    if packed_w.dtype != torch.int32 or packed_w.shape != (N, packed_words(K, bits)):
        raise ValueError(f"packed_w must be int32 [N, {packed_words(K, bits)}], got {packed_w.dtype} {tuple(packed_w.shape)}")
    NG = -(-K // G)
    if lut.shape != (N, NG, 1 << bits):
        raise ValueError(f"lut must be [N={N}, {NG}, {1 << bits}], got {tuple(lut.shape)}")
    codes_per_word(bits)
    dev = x_codes.device
    interp = interpret_mode()
    if dev.type == "cpu" and not interp:
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    x_scale = x_scale.reshape(B).to(device=dev, dtype=torch.float32).contiguous()
    x_zero = x_zero.reshape(B).to(device=dev, dtype=torch.float32).contiguous()
    packed_w = packed_w.contiguous()
    lut = lut.contiguous()
    y = torch.empty((B, N), device=dev, dtype=torch.float32)
    if B == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_()
    db, dn, dk = _default_blocks(B, interp)
    block_b, block_n, block_k = block_b or db, block_n or dn, block_k or dk
    for v in (block_b, block_n, block_k):
        if v & (v - 1):
            raise ValueError("block sizes must be powers of two")
    if word_loads and block_k % (32 // bits):
        raise ValueError(f"word_loads needs block_k to be a multiple of {32 // bits}")
    grid = (triton.cdiv(N, block_n), triton.cdiv(B, block_b))
    _kernel()[grid](
        x_codes, x_scale, x_zero, packed_w, lut, y,
        B, N, K, G,
        x_codes.stride(0), x_codes.stride(1),
        packed_w.stride(0), packed_w.stride(1),
        lut.stride(0), lut.stride(1),
        y.stride(0), y.stride(1),
        BITS=bits, BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, WORD_LOADS=word_loads, INTERPRET=interp,
        num_warps=num_warps,
    )  # fmt: skip
    return y
