"""The fused W2A4 linear in two Triton launches: an activation pre-kernel, then a split-K GEMV (batch <= 4; the select
kernel, or the bit-serial one) or a ``tl.dot`` GEMM (batch > 4), all autotuned per shape.

Launch 1, :func:`quantize_activations_triton` (one program per token): optional online Hadamard (R4) of a block
``HB`` (a power of two ``>= 16``, or a small built order ``base · P``, :func:`hadamard_supported`: e.g. 1536 = 12 · 128)
in fp32, then the per-token asymmetric quantizer of
:func:`rcp_lib.quant.activations.quantize_per_token` with the same operations (``lo = clip * min``,
``s = max((hi - lo) / (L - 1), 1e-10)``, ``c = clamp(round_half_even((x - lo) / s), 0, L - 1)``,
``zero = -lo / s``, a float; IEEE divisions through ``div_rn``; launched without FMA contraction,
:data:`QUANT_LAUNCH_OPTIONS`): codes (uint8, written in the order of
:func:`.layout.activation_permutation`), scale and zero (float32 ``[B]``). The Hadamard is computed as
``Y = L (X H_C) / sqrt(HB)`` on the row viewed as ``X [K / C, C]`` with ``C = min(P, 128)`` and
``L = kron(I, H_{HB / C})ᵀ`` (``H_HB = kron(H_base, H_P) = kron(H_{HB/C}, H_C)``): two small ``tl.dot`` in full fp32
(``input_precision="ieee"``); the ±1 matrices are built once per device (:func:`_hadamard_operands`). Rows up to
``K = 32768`` (the whole row is in registers: min / max need it). With ``glu`` the row read is a gated MLP's
``[gate | up]`` (``2K``) and the quantized input is ``silu(gate) * up``, computed as torch computes it in the
activations' dtype (:func:`_glu_fn`): the MLP's SiLU and product run in this launch instead of two torch launches
before it (:class:`rcp_lib.kernels.packed_linear.GatedMLP`; the one-launch bit-serial kernel below does the same).

Launch 2, :func:`w2a4_matmul_triton`: ``y [B, N] = scale * (sum_k c_k W_hat[n, k] - zero * wsum[n]) (+ bias)`` in
the output dtype, fp32 accumulation (:mod:`.layout` for why ``zero`` factors out). The weights are the stored
:func:`.bitpack.pack_codes` words, read as ``[BLOCK_N, COLS]`` tiles (``COLS = GPI * G / 16`` words of a row:
contiguous, 128-bit loads); ``G`` is a compile-time constant; per (row, group) the 4 levels are loaded once into
registers (fp16 or fp32 LUT) and each 2-bit code selects among them with ``tl.where`` (no gather that depends on
the codes). The K loop is ``tl.range(..., num_stages=NUM_STAGES)`` (software pipelined on GPU).

* GEMV (``B <= GEMV_MAX_BATCH``): the tokens of a ``BLOCK_B`` tile share each decoded weight; the products are
  accumulated in fp32 ``[BLOCK_B, BLOCK_N, COLS]`` and reduced at the end.
* GEMM (prefill): each slot ``i`` of the word tile is dequantized to a ``[BLOCK_N, COLS]`` fp16 tile (fp32 for an
  fp32 LUT) and multiplied with the matching ``[BLOCK_B, COLS]`` codes by ``tl.dot`` (codes 0..15 and fp16 levels
  are exact in fp16; fp32 accumulation).

Launch 2, bit-serial, :func:`w2a4_bitplane_matmul_triton` (decode; ``w2a4_linear_triton(..., wplanes=...)``, i.e.
``PackedLinear(gemv_format="bitplane")``): the same output from bit planes (:mod:`.layout`, "Bit planes"): the
pre-kernel writes the activation codes as 4 planes of 32-bit words (``planes=True``), the weights are planes derived
once per layer. Per 32 weights of a row and token: 12 ANDs and 12 hardware popcounts (``popc.b32``; SWAR arithmetic
under the interpreter) give the exact integer sums ``Q0, Q1, Q01`` (and the token's own ``Qa``), summed over the
group's chunks; the four levels enter once per (row, group): ``l0 Qa + (l1 - l0) Q0 + (l2 - l0) Q1 +
(l3 - l2 - l1 + l0) Q01`` in fp32, each sum centred first as the select kernels' codes are (``Q - C n`` with
``C = 7.5`` and ``n`` the count of the weight bit pattern, 3 more popcounts per row and 32 weights, shared by the
tokens; exact half-integers), so the epilogue's ``(zero - C) wsum`` does not cancel a large ``zero wsum``. No per-weight decode, select, conversion or float multiply; the weight tile, the
token planes and the levels are loaded in the 3-D layout they are used in, so the loop needs no layout conversion
through shared memory (``benchmarks/kernel_sass.py`` counts it in the sm_90 code: no ``STS``, and a ``BAR`` only for
the cp.async pipeline when ``NUM_STAGES > 1``). Numerics: the integer part is exact; the per-group combination rounds
differently from the select kernel (level differences, partial cancellation), fp32 rounding either way.

One launch, :func:`w2a4_bitplane_linear_triton` (``QUANT_IN``; what ``w2a4_linear_triton`` runs for a decode batch
with weight planes and no in-kernel Hadamard): no pre-kernel. Every program reads its tokens' whole rows for min and
max (order-independent, so every program gets the same exact range), then quantizes and packs only the chunks its
loop consumes, with the pre-kernel's own helpers (``_act_range``, ``_act_codes``): the output equals the two-launch
result bit for bit (tested). This removes the pre-kernel's launch and its one-program-per-token phase, which at
batch 1 runs on one SM; the cost is the redundant min / max read (``K`` activations per program, from L2) and one
layout conversion per activation plane and iteration (the in-loop reductions that build the planes).

Split-K (``SPLIT_K > 1``): ``SPLIT_K`` programs share an output tile, each owning a contiguous range of groups, so
that ``N / BLOCK_N * SPLIT_K`` programs fill the SMs several times over. Each adds its fp32 partial into a zeroed
fp32 workspace with ``tl.atomic_add``, then takes a ticket from a per-tile counter (after a CTA barrier, acq_rel);
the program that draws the last ticket reads the sum (bypassing L1), applies scale / zero / bias, writes the
output in its dtype, and puts the workspace and the counter back to zero, so that no memset launch is needed (the
serial split-K fix-up of CUTLASS). The workspace and counters are cached per (device, N, batch bucket) and never
freed (CUDA graphs keep their addresses); two calls that use the same workspace must not run concurrently on
different streams.

Autotuning: ``triton.autotune`` over the configurations of :func:`gemv_configs` / :func:`bitplane_configs` /
:func:`gemm_configs`, keyed by
``(N, K, batch)`` (batch rounded to a power of two for the GEMM), cached per process (and on disk with triton's
autotune cache). Tuning runs at the first call of each key: warm up before capturing a CUDA graph. Under
``TRITON_INTERPRET=1`` (CPU, tests) there is no tuning: a fixed, or the given, configuration runs.

Kernels are ``triton.jit``-decorated lazily (see :mod:`.triton_gemv`: the interpreter knob is read at decoration),
and reductions use ``tl.reduce`` with the standard combine functions under the interpreter (``INTERPRET``).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .layout import GEMV_FORMATS, fused_layout_supported  # noqa: F401  (GEMV_FORMATS re-exported)

__all__ = ["quantize_activations_triton", "w2a4_matmul_triton", "w2a4_bitplane_matmul_triton",
           "w2a4_bitplane_linear_triton", "w2a4_linear_triton",
           "hadamard_supported", "bitplane_configs", "GEMV_FORMATS", "QUANT_LAUNCH_OPTIONS",
           "gemv_configs", "gemm_configs", "default_config", "AUTOTUNE", "GEMV_MAX_BATCH", "MAX_ROW"]

GEMV_MAX_BATCH = 4
#: launch options of every kernel that quantizes activations (the pre-kernel, the bit-serial GEMV): no FMA contraction,
#: so that ``x - clip * min`` rounds its product first, as ``quantize_per_token`` does in torch (with contraction the
#: sm_90 code computes it as one fma per element and, for a clip ratio below 1, codes move across rounding boundaries)
QUANT_LAUNCH_OPTIONS = {"enable_fp_fusion": False}
MAX_ROW = 32768
_SPLITK_MAX_BUCKET = 64  # split-K (and its workspace) only up to this many tokens
#: what the select and GEMM kernels subtract from every 4-bit activation code before the product (and from the zero
#: point in the epilogue): sum (c - 7.5) w - (z - 7.5) wsum equals sum c w - z wsum, but its two terms are small where
#: those of the uncentred form are large and cancel (weights with a non-zero row mean); c - 7.5 is exact in fp16
CODE_CENTER = 7.5


def interpret_mode() -> bool:
    from .triton_gemv import interpret_mode as _im

    return _im()


# ----------------------------------------------------------------------------------------------- pre-kernel
def _act_range_fn(mn, mx, clip, LEVELS: tl.constexpr):
    """:func:`rcp_lib.quant.activations.quantize_per_token`'s range, operation by operation (asymmetric, float zero
    point): ``(lo, scale, zero)`` from the row's min and max (any shape, elementwise)."""
    lo = mn * clip
    hi = mx * clip
    s = tl.maximum(tl.math.div_rn(hi - lo, LEVELS - 1.0), 1e-10)
    return lo, s, tl.math.div_rn(-lo, s)


def _act_codes_fn(v, lo, s, LEVELS: tl.constexpr):
    """The codes of ``quantize_per_token`` (float values 0 .. LEVELS - 1): ``clamp(round_half_even((v - lo) / s))``
    with an IEEE division; ``lo`` and ``s`` broadcast against ``v``."""
    t = tl.math.div_rn(v - lo, s)
    fl = tl.math.floor(t)  # round half to even (torch.round), exact: t - floor(t) is exact in fp32
    d = t - fl
    odd = (fl - 2.0 * tl.math.floor(fl * 0.5)) != 0.0
    q = fl + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)
    return tl.minimum(tl.maximum(q, 0.0), LEVELS - 1.0)


def _glu_fn(g, u, ROUND: tl.constexpr, INTERPRET: tl.constexpr):
    """``silu(g) * u``, the gated MLP's ``act_fn(gate_proj(x)) * up_proj(x)``, as torch computes it in the
    activations' dtype: each of the two ops in fp32 and rounded to that dtype (``ROUND`` 0: fp32, 1: fp16, 2: bf16),
    the SiLU as ``g / (1 + exp(-g))`` with libdevice's ``exp`` (CUDA's ``expf``; numpy's under the interpreter, which
    has no libdevice) and an IEEE division. Our reading of ATen's CUDA SiLU (opmath fp32); on the CPU, torch's
    vectorised ``exp`` may differ from numpy's in the last bit."""
    g = g.to(tl.float32)
    if INTERPRET:
        e = tl.exp(-g)
    else:
        e = libdevice.exp(-g)
    a = _round_to(tl.math.div_rn(g, 1.0 + e), ROUND, INTERPRET)
    return _round_to(a * u.to(tl.float32), ROUND, INTERPRET)


def _round_to_fn(v, ROUND: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``v`` rounded to nearest even in the dtype of ``ROUND`` (0: fp32, unchanged; 1: fp16; 2: bf16), as fp32.
    The interpreter truncates fp32 to bf16, so there the rounding is done on the bits (NaN kept)."""
    if ROUND == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif ROUND == 2:
        if INTERPRET:
            b = v.to(tl.uint32, bitcast=True)
            r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
            v = tl.where(v != v, v, r)
        else:
            v = v.to(tl.bfloat16).to(tl.float32)
    return v


def _act_quant_kernel(
    x_ptr, c_ptr, s_ptr, z_ptr, hc_ptr, hl_ptr,
    K, stride_xb, stride_cb, stride_cj, clip, inv_sqrt,
    LEVELS: tl.constexpr, G: tl.constexpr, PERMUTE: tl.constexpr, HADAMARD: tl.constexpr, MIX_ROWS: tl.constexpr,
    KP: tl.constexpr, C: tl.constexpr, RP: tl.constexpr, PLANES: tl.constexpr, ABITS: tl.constexpr,
    INTERPRET: tl.constexpr, GLU: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    # GLU: a row of x is [gate (K) | up (K)]: the quantized input is _glu(gate, up) (the MLP's product before down_proj)
    pid = tl.program_id(0)
    if HADAMARD:
        r = tl.arange(0, RP)
        cc = tl.arange(0, C)
        k = r[:, None] * C + cc[None, :]  # [RP, C], row-major view of the row
        mask = k < K
        x = tl.load(x_ptr + pid * stride_xb + k, mask=mask, other=0.0).to(tl.float32)
        if GLU:
            x = _glu(x, tl.load(x_ptr + pid * stride_xb + K + k, mask=mask, other=0.0), ROUND, INTERPRET)
        hc = tl.load(hc_ptr + cc[:, None] * C + cc[None, :])  # ±1, [C, C]
        v = tl.dot(x, hc, input_precision="ieee")  # within-C mixing
        if MIX_ROWS:
            hl = tl.load(hl_ptr + r[:, None] * RP + r[None, :])  # kron(I, H_m), zero-padded, [RP, RP]
            v = tl.dot(hl, v, input_precision="ieee")
        v = v * inv_sqrt
    else:
        k = tl.arange(0, KP)
        mask = k < K
        v = tl.load(x_ptr + pid * stride_xb + k, mask=mask, other=0.0).to(tl.float32)
        if GLU:
            v = _glu(v, tl.load(x_ptr + pid * stride_xb + K + k, mask=mask, other=0.0), ROUND, INTERPRET)
    vmin = tl.where(mask, v, float("inf"))
    vmax = tl.where(mask, v, float("-inf"))
    if HADAMARD:
        if INTERPRET:
            vmin = tl.reduce(vmin, 1, tl.standard._elementwise_min)
            vmax = tl.reduce(vmax, 1, tl.standard._elementwise_max)
        else:
            vmin = tl.min(vmin, axis=1)
            vmax = tl.max(vmax, axis=1)
    if INTERPRET:
        mn = tl.reduce(vmin, 0, tl.standard._elementwise_min)
        mx = tl.reduce(vmax, 0, tl.standard._elementwise_max)
    else:
        mn = tl.min(vmin, axis=0)
        mx = tl.max(vmax, axis=0)
    lo, s, zero = _act_range(mn, mx, clip, LEVELS)
    q = _act_codes(v, lo, s, LEVELS)
    if PLANES:
        # bit planes (.layout, "Bit planes"): word t of plane j holds bit j of the codes of k = 32 t .. 32 t + 31
        NCH: tl.constexpr = (RP * C if HADAMARD else KP) // 32
        qr = tl.reshape(q.to(tl.int32), (NCH, 32))  # row-major: chunk t = k // 32
        lane = tl.arange(0, 32)
        chunk = tl.arange(0, NCH)
        for j in tl.static_range(ABITS):
            bitj = ((qr >> j) & 1) << lane[None, :]  # distinct bits: the sum is their OR (wraps at bit 31)
            if INTERPRET:
                plane = tl.reduce(bitj, 1, tl.standard._sum_combine)
            else:
                plane = tl.sum(bitj, axis=1)
            tl.store(c_ptr + pid * stride_cb + j * stride_cj + chunk, plane.to(tl.int32), mask=chunk * 32 < K)
    else:
        if PERMUTE:
            WPG: tl.constexpr = G // 16
            p = (k // G) * G + (k % 16) * WPG + (k % G) // 16
        else:
            p = k
        tl.store(c_ptr + pid * stride_cb + p, q.to(tl.uint8), mask=mask)
    tl.store(s_ptr + pid, s)
    tl.store(z_ptr + pid, zero)


def _split_range_fn(NG, pid_k, SPLIT_K: tl.constexpr, GPI: tl.constexpr):
    """Groups ``[g_start, g_end)`` of split ``pid_k``: the ``U = ceil(NG / GPI)`` loop iterations of ``GPI`` groups
    dealt out over ``SPLIT_K`` contiguous ranges as evenly as possible (split ``s`` takes iterations
    ``[s U // SPLIT_K, (s + 1) U // SPLIT_K)``), so every range starts at a multiple of ``GPI`` (the last one ends at
    ``NG``, ragged) and a split is empty only when ``SPLIT_K > U`` (:func:`split_k_fits`). An earlier version gave
    every split ``ceil(ceil(NG / SPLIT_K) / GPI) * GPI`` groups, which left trailing splits empty well below that
    (at ``NG`` = 86, 64 splits: 21 empty)."""
    U = (NG + GPI - 1) // GPI  # tl.cdiv is a jit helper
    g_start = (pid_k * U) // SPLIT_K * GPI
    return g_start, tl.minimum(((pid_k + 1) * U) // SPLIT_K * GPI, NG)


def _epilogue_fn(part, scale, zero, offs_b, offs_n, mask_b, mask_n, pid_b, pid_n, N, stride_yb, wsum_ptr, bias_ptr,
                 y_ptr, ws_ptr, cnt_ptr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                 SPLIT_K: tl.constexpr, CENTER: tl.constexpr):
    """The end of every launch-2 kernel: the split-K fix-up (module docstring) when ``SPLIT_K > 1``, then
    ``y = scale * (part - (zero - CENTER) * wsum) (+ bias)`` stored in the output dtype. ``part``: fp32
    ``[BLOCK_B, BLOCK_N]``, the sum of ``(code - CENTER) * w`` (:data:`CODE_CENTER` for 4-bit codes: the centred sum
    is small where ``sum code * w`` and ``zero * wsum`` would cancel); ``scale``, ``zero``: fp32 ``[BLOCK_B]``."""
    ymask = mask_b[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        wsp = ws_ptr + offs_b[:, None] * N + offs_n[None, :]
        tl.atomic_add(wsp, part, mask=ymask, sem="relaxed")
        tl.debug_barrier()
        tile = pid_b * tl.num_programs(0) + pid_n
        ticket = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
        last = ticket == SPLIT_K - 1
        ymask = ymask & ((tl.full((BLOCK_B, BLOCK_N), 0, tl.int32) + ticket) == SPLIT_K - 1)
        part = tl.load(wsp, mask=ymask, other=0.0, cache_modifier=".cg")
        # a true 0.0, never part * 0.0: a non-finite partial sum (inf * 0 = nan) must not outlive its call
        tl.store(wsp, tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32), mask=ymask)
        tl.store(cnt_ptr + tile, 0, mask=last)
    wsum = tl.load(wsum_ptr + offs_n, mask=mask_n, other=0.0)
    y = scale[:, None] * (part - (zero[:, None] - CENTER) * wsum[None, :])
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_b[:, None] * stride_yb + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=ymask)


# ----------------------------------------------------------------------------------------------- GEMV / GEMM
def _w2a4_gemv_kernel(
    x_ptr, xs_ptr, xz_ptr, w_ptr, lut_ptr, wsum_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    B, N, K, stride_xb, stride_wn, stride_ln, stride_yb, B_KEY,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, GPI: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, INTERPRET: tl.constexpr, CENTER: tl.constexpr,
):  # fmt: skip
    WPG: tl.constexpr = G // 16
    COLS: tl.constexpr = GPI * WPG
    NG = K // G
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_n = offs_n < N
    mask_b = offs_b < B
    g_start, g_end = _split_range(NG, pid_k, SPLIT_K, GPI)
    col = tl.arange(0, COLS)
    gcol = col // WPG
    jcol = col % WPG
    acc = tl.full((BLOCK_B, BLOCK_N, COLS), 0.0, tl.float32)
    for g0 in tl.range(g_start, g_end, GPI, num_stages=NUM_STAGES):
        g = g0 + gcol
        gmask = g < g_end
        wmask = mask_n[:, None] & gmask[None, :]
        wcol = tl.multiple_of(g0 * WPG, WPG) + tl.max_contiguous(col, COLS)  # hints: 128-bit loads / cp.async
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + wcol[None, :], mask=wmask, other=0)
        lb = lut_ptr + offs_n[:, None] * stride_ln + (g * 4)[None, :]
        l0 = tl.load(lb, mask=wmask, other=0.0).to(tl.float32)
        l1 = tl.load(lb + 1, mask=wmask, other=0.0).to(tl.float32)
        l2 = tl.load(lb + 2, mask=wmask, other=0.0).to(tl.float32)
        l3 = tl.load(lb + 3, mask=wmask, other=0.0).to(tl.float32)
        xb = x_ptr + offs_b[:, None] * stride_xb + (g * G + jcol)[None, :]
        xmask = mask_b[:, None] & gmask[None, :]
        for i in tl.static_range(16):
            c = (words >> (2 * i)) & 3
            b0 = (c & 1) != 0
            w = tl.where(c >= 2, tl.where(b0, l3, l2), tl.where(b0, l1, l0))  # [BLOCK_N, COLS]
            xi = tl.load(xb + i * WPG, mask=xmask, other=0).to(tl.float32) - CENTER  # [BLOCK_B, COLS], exact
            acc += xi[:, None, :] * w[None, :, :]
    if INTERPRET:
        part = tl.reduce(acc, 2, tl.standard._sum_combine)
    else:
        part = tl.sum(acc, axis=2)
    scale = tl.load(xs_ptr + offs_b, mask=mask_b, other=0.0)
    zero = tl.load(xz_ptr + offs_b, mask=mask_b, other=0.0)
    _epilogue(part, scale, zero, offs_b, offs_n, mask_b, mask_n, pid_b, pid_n, N, stride_yb, wsum_ptr, bias_ptr, y_ptr,
              ws_ptr, cnt_ptr, HAS_BIAS, BLOCK_B, BLOCK_N, SPLIT_K, CENTER)


def _w2a4_gemm_kernel(
    x_ptr, xs_ptr, xz_ptr, w_ptr, lut_ptr, wsum_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    B, N, K, stride_xb, stride_wn, stride_ln, stride_yb, B_KEY,
    G: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, GPI: tl.constexpr,
    SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr,
    CENTER: tl.constexpr,
):  # fmt: skip
    WPG: tl.constexpr = G // 16
    COLS: tl.constexpr = GPI * WPG
    NG = K // G
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_n = offs_n < N
    mask_b = offs_b < B
    g_start, g_end = _split_range(NG, pid_k, SPLIT_K, GPI)
    col = tl.arange(0, COLS)
    gcol = col // WPG
    jcol = col % WPG
    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)
    for g0 in tl.range(g_start, g_end, GPI, num_stages=NUM_STAGES):
        g = g0 + gcol
        gmask = g < g_end
        wmask = mask_n[:, None] & gmask[None, :]
        wcol = tl.multiple_of(g0 * WPG, WPG) + tl.max_contiguous(col, COLS)  # hints: 128-bit loads / cp.async
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + wcol[None, :], mask=wmask, other=0)
        lb = lut_ptr + offs_n[:, None] * stride_ln + (g * 4)[None, :]
        if DOT_F32:
            l0 = tl.load(lb, mask=wmask, other=0.0).to(tl.float32)
            l1 = tl.load(lb + 1, mask=wmask, other=0.0).to(tl.float32)
            l2 = tl.load(lb + 2, mask=wmask, other=0.0).to(tl.float32)
            l3 = tl.load(lb + 3, mask=wmask, other=0.0).to(tl.float32)
        else:
            l0 = tl.load(lb, mask=wmask, other=0.0).to(tl.float16)
            l1 = tl.load(lb + 1, mask=wmask, other=0.0).to(tl.float16)
            l2 = tl.load(lb + 2, mask=wmask, other=0.0).to(tl.float16)
            l3 = tl.load(lb + 3, mask=wmask, other=0.0).to(tl.float16)
        xb = x_ptr + offs_b[:, None] * stride_xb + (g * G + jcol)[None, :]
        xmask = mask_b[:, None] & gmask[None, :]
        for i in tl.static_range(16):
            c = (words >> (2 * i)) & 3
            b0 = (c & 1) != 0
            w = tl.where(c >= 2, tl.where(b0, l3, l2), tl.where(b0, l1, l0))  # [BLOCK_N, COLS] dequantized tile
            xi = tl.load(xb + i * WPG, mask=xmask, other=0)  # [BLOCK_B, COLS] codes
            if DOT_F32:
                acc = tl.dot(xi.to(tl.float32) - CENTER, tl.trans(w), acc, input_precision="ieee")
            else:  # code - 7.5 is a half-integer in [-7.5, 7.5]: exact in fp16
                acc = tl.dot((xi.to(tl.float32) - CENTER).to(tl.float16), tl.trans(w), acc)
    part = acc
    scale = tl.load(xs_ptr + offs_b, mask=mask_b, other=0.0)
    zero = tl.load(xz_ptr + offs_b, mask=mask_b, other=0.0)
    _epilogue(part, scale, zero, offs_b, offs_n, mask_b, mask_n, pid_b, pid_n, N, stride_yb, wsum_ptr, bias_ptr, y_ptr,
              ws_ptr, cnt_ptr, HAS_BIAS, BLOCK_B, BLOCK_N, SPLIT_K, CENTER)


def _popcount_fn(x, INTERPRET: tl.constexpr):
    """Population count of every uint32 element: the hardware ``popc.b32`` on the GPU; under the interpreter (no
    inline assembly) the SWAR bit count in numpy uint32 arithmetic. (LLVM would recognise the SWAR idiom alone, but
    not once its result is shifted, as the bit-serial sums do: InstCombine folds the shift in first.)"""
    if INTERPRET:
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return (x * 0x01010101) >> 24
    else:
        return tl.inline_asm_elementwise("popc.b32 $0, $1;", "=r,r", [x], dtype=tl.uint32, is_pure=True, pack=1)


def _w2a4_bitplane_gemv_kernel(
    a_ptr, xs_ptr, xz_ptr, w_ptr, lut_ptr, wsum_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    B, N, K, stride_ab, stride_aj, stride_wn, stride_wp, stride_ln, stride_yb, B_KEY, clip,
    G: tl.constexpr, ABITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    GPI: tl.constexpr, SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, QUANT_IN: tl.constexpr, RB: tl.constexpr,
    INTERPRET: tl.constexpr, CENTER: tl.constexpr, TILED: tl.constexpr, REC: tl.constexpr, LREC: tl.constexpr,
    LOFF: tl.constexpr, ALIGN: tl.constexpr, GLU: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    # GLU (with QUANT_IN): a row of the activations is [gate (K) | up (K)], quantized as _glu(gate, up)
    # TILED: w holds one record of REC int32 words per row and pair of groups (.layout, "Tiles": P0 and P1 chunks of
    # each group, then the two groups' levels), and lut_ptr is the same memory in the levels' dtype: LREC elements
    # per record, the levels at LOFF; a group's chunks start at a multiple of ALIGN words
    # CENTER: the sums are of (code - CENTER) * w (the middle of the code range; 0.0: of the codes themselves), from
    # the exact integer sums and, per group, the weight planes' own popcounts (the bit patterns' counts)
    # a: int32 [B, ABITS, K/32] activation planes, or (QUANT_IN) the float activations [B, K], quantized here with
    # clip; w: int32 [N, 2, K/32] weight planes (.layout, "Bit planes"); the plane strides are arguments (not K // 32)
    # so that triton's divisibility specialisation keeps 128-bit loads
    CH: tl.constexpr = G // 32  # chunks of 32 weights per group
    COLS: tl.constexpr = GPI * CH
    NG = K // G
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_b = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_n = offs_n < N
    mask_b = offs_b < B
    g_start, g_end = _split_range(NG, pid_k, SPLIT_K, GPI)
    col = tl.arange(0, COLS)
    grp = tl.arange(0, GPI)
    n3 = offs_n[None, :, None]
    b3 = offs_b[:, None, None]
    if QUANT_IN:
        # every program reads its tokens' whole rows for min / max (the same exact values in every program), then
        # quantizes only its own chunks in the loop: one launch, no pre-kernel
        r = tl.arange(0, RB)
        mn = tl.full((BLOCK_B,), float("inf"), tl.float32)
        mx = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        for k0 in range(0, K, RB):
            m = mask_b[:, None] & ((k0 + r) < K)[None, :]
            v = tl.load(a_ptr + offs_b[:, None] * stride_ab + (k0 + r)[None, :], mask=m, other=0.0).to(tl.float32)
            if GLU:
                v = _glu(v, tl.load(a_ptr + offs_b[:, None] * stride_ab + K + (k0 + r)[None, :], mask=m, other=0.0),
                         ROUND, INTERPRET)
            if INTERPRET:
                mn = tl.minimum(mn, tl.reduce(tl.where(m, v, float("inf")), 1, tl.standard._elementwise_min))
                mx = tl.maximum(mx, tl.reduce(tl.where(m, v, float("-inf")), 1, tl.standard._elementwise_max))
            else:
                mn = tl.minimum(mn, tl.min(tl.where(m, v, float("inf")), axis=1))
                mx = tl.maximum(mx, tl.max(tl.where(m, v, float("-inf")), axis=1))
        mn = tl.where(mask_b, mn, 0.0)  # padded tokens: a finite range (their rows are never stored)
        mx = tl.where(mask_b, mx, 0.0)
        lo_t, s_t, z_t = _act_range(mn, mx, clip, 1 << ABITS)  # [BLOCK_B]
        lane = tl.arange(0, 32)
    acc = tl.full((BLOCK_B, BLOCK_N, GPI), 0.0, tl.float32)
    for g0 in tl.range(g_start, g_end, GPI, num_stages=NUM_STAGES):
        cmask = (g0 + col // CH) < g_end
        ch = tl.multiple_of(g0 * CH, CH) + tl.max_contiguous(col, COLS)  # hints: 128-bit loads / cp.async
        if TILED:  # the iteration's groups of each row: one contiguous block of records per row
            ci = tl.arange(0, CH)
            gg = g0 + grp
            rec = tl.multiple_of((gg // 2) * REC + (gg % 2) * (2 * CH), ALIGN)[:, None] + ci[None, :]  # [GPI, CH]
            tmask = (offs_n < N)[:, None, None] & ((g0 + grp) < g_end)[None, :, None]  # [BLOCK_N, GPI, 1]
            wp = w_ptr + offs_n[:, None, None] * stride_wn + rec[None, :, :]
            p0 = tl.reshape(tl.load(wp, mask=tmask, other=0), (1, BLOCK_N, COLS)).to(tl.uint32, bitcast=True)
            p1 = tl.reshape(tl.load(wp + CH, mask=tmask, other=0), (1, BLOCK_N, COLS)).to(tl.uint32, bitcast=True)
        else:
            wmask = (n3 < N) & cmask[None, None, :]  # [1, BLOCK_N, COLS]
            wp = w_ptr + n3 * stride_wn + ch[None, None, :]
            p0 = tl.load(wp, mask=wmask, other=0).to(tl.uint32, bitcast=True)
            p1 = tl.load(wp + stride_wp, mask=wmask, other=0).to(tl.uint32, bitcast=True)
        p01 = p0 & p1
        if CENTER != 0.0:  # per (row, chunk): how many weights have bit 0, bit 1, both (3 popcounts, any batch)
            n0 = _popcount(p0, INTERPRET)
            n1 = _popcount(p1, INTERPRET)
            n01 = _popcount(p01, INTERPRET)
        amask = (b3 < B) & cmask[None, None, :]  # [BLOCK_B, 1, COLS]
        ap = a_ptr + b3 * stride_ab + ch[None, None, :]
        qa = tl.full((BLOCK_B, 1, COLS), 0, tl.uint32)
        q0 = tl.full((BLOCK_B, BLOCK_N, COLS), 0, tl.uint32)
        q1 = tl.full((BLOCK_B, BLOCK_N, COLS), 0, tl.uint32)
        q01 = tl.full((BLOCK_B, BLOCK_N, COLS), 0, tl.uint32)
        if QUANT_IN:  # this iteration's codes [BLOCK_B, COLS, 32] (k = 32 chunk + lane)
            xk = ch[None, :, None] * 32 + lane[None, None, :]
            xv = tl.load(a_ptr + b3 * stride_ab + xk, mask=(b3 < B) & cmask[None, :, None], other=0.0).to(tl.float32)
            if GLU:
                xv = _glu(xv, tl.load(a_ptr + b3 * stride_ab + K + xk, mask=(b3 < B) & cmask[None, :, None], other=0.0),
                          ROUND, INTERPRET)
            qc = _act_codes(xv, lo_t[:, None, None], s_t[:, None, None], 1 << ABITS).to(tl.int32)
        for j in tl.static_range(ABITS):
            if QUANT_IN:
                bitj = ((qc >> j) & 1) << lane[None, None, :]  # distinct bits: the sum is their OR
                if INTERPRET:
                    aj = tl.reduce(bitj, 2, tl.standard._sum_combine)
                else:
                    aj = tl.sum(bitj, axis=2)
                aj = tl.where(cmask[None, :], aj, 0).to(tl.uint32, bitcast=True)[:, None, :]  # [BLOCK_B, 1, COLS]
            else:
                aj = tl.load(ap + j * stride_aj, mask=amask, other=0).to(tl.uint32, bitcast=True)
            qa += _popcount(aj, INTERPRET) << j
            q0 += _popcount(aj & p0, INTERPRET) << j
            q1 += _popcount(aj & p1, INTERPRET) << j
            q01 += _popcount(aj & p01, INTERPRET) << j
        # integer sums per group (< 2**ABITS * G), then the four levels of each (row, group)
        if INTERPRET:
            qa = tl.reduce(tl.reshape(qa, (BLOCK_B, 1, GPI, CH)), 3, tl.standard._sum_combine)
            q0 = tl.reduce(tl.reshape(q0, (BLOCK_B, BLOCK_N, GPI, CH)), 3, tl.standard._sum_combine)
            q1 = tl.reduce(tl.reshape(q1, (BLOCK_B, BLOCK_N, GPI, CH)), 3, tl.standard._sum_combine)
            q01 = tl.reduce(tl.reshape(q01, (BLOCK_B, BLOCK_N, GPI, CH)), 3, tl.standard._sum_combine)
            if CENTER != 0.0:
                n0 = tl.reduce(tl.reshape(n0, (1, BLOCK_N, GPI, CH)), 3, tl.standard._sum_combine)
                n1 = tl.reduce(tl.reshape(n1, (1, BLOCK_N, GPI, CH)), 3, tl.standard._sum_combine)
                n01 = tl.reduce(tl.reshape(n01, (1, BLOCK_N, GPI, CH)), 3, tl.standard._sum_combine)
        else:
            qa = tl.sum(tl.reshape(qa, (BLOCK_B, 1, GPI, CH)), axis=3)
            q0 = tl.sum(tl.reshape(q0, (BLOCK_B, BLOCK_N, GPI, CH)), axis=3)
            q1 = tl.sum(tl.reshape(q1, (BLOCK_B, BLOCK_N, GPI, CH)), axis=3)
            q01 = tl.sum(tl.reshape(q01, (BLOCK_B, BLOCK_N, GPI, CH)), axis=3)
            if CENTER != 0.0:
                n0 = tl.sum(tl.reshape(n0, (1, BLOCK_N, GPI, CH)), axis=3)
                n1 = tl.sum(tl.reshape(n1, (1, BLOCK_N, GPI, CH)), axis=3)
                n01 = tl.sum(tl.reshape(n01, (1, BLOCK_N, GPI, CH)), axis=3)
        # centred sums, exact in fp32 (half-integers below 2**23): sum (c - C) w = l0 (qa - C G) + (l1 - l0)
        # (q0 - C n0) + (l2 - l0) (q1 - C n1) + (l3 - l2 - l1 + l0) (q01 - C n01); a group past the end has levels 0
        fa = qa.to(tl.float32)
        f0 = q0.to(tl.float32)
        f1 = q1.to(tl.float32)
        f01 = q01.to(tl.float32)
        if CENTER != 0.0:
            fa = fa - CENTER * G
            f0 = f0 - CENTER * n0.to(tl.float32)
            f1 = f1 - CENTER * n1.to(tl.float32)
            f01 = f01 - CENTER * n01.to(tl.float32)
        # the 4 levels of a (row, group) in one 8-byte load (fp16 LUT; 16 bytes for fp32), split in registers
        lev = tl.arange(0, 4)
        gmask = (n3[:, :, :, None] < N) & ((g0 + grp) < g_end)[None, None, :, None]  # [1, BLOCK_N, GPI, 1]
        if TILED:
            gl = g0 + grp[:, None]
            loff = (gl // 2) * LREC + LOFF + (gl % 2) * 4 + lev[None, :]  # [GPI, 4], inside each row's records
        else:
            loff = g0 * 4 + grp[:, None] * 4 + lev[None, :]
        lvals = tl.load(lut_ptr + n3[:, :, :, None] * stride_ln + loff[None, None],
                        mask=gmask, other=0.0).to(tl.float32)  # [1, BLOCK_N, GPI, 4]
        l02, l13 = tl.split(tl.reshape(lvals, (1, BLOCK_N, GPI, 2, 2)))
        l0, l2 = tl.split(l02)
        l1, l3 = tl.split(l13)
        acc += l0 * fa + (l1 - l0) * f0 + (l2 - l0) * f1 + ((l3 - l2) - (l1 - l0)) * f01
    if INTERPRET:
        part = tl.reduce(acc, 2, tl.standard._sum_combine)
    else:
        part = tl.sum(acc, axis=2)
    if QUANT_IN:
        scale, zero = s_t, z_t
    else:
        scale = tl.load(xs_ptr + offs_b, mask=mask_b, other=0.0)
        zero = tl.load(xz_ptr + offs_b, mask=mask_b, other=0.0)
    _epilogue(part, scale, zero, offs_b, offs_n, mask_b, mask_n, pid_b, pid_n, N, stride_yb, wsum_ptr, bias_ptr, y_ptr,
              ws_ptr, cnt_ptr, HAS_BIAS, BLOCK_B, BLOCK_N, SPLIT_K, CENTER)


# ----------------------------------------------------------------------------------------------- configurations
def gemv_configs(G: int) -> list[dict]:
    """GEMV candidates (``BLOCK_N``, groups per iteration ``GPI``, ``SPLIT_K``, warps, pipeline stages)."""
    # every tile has >= 4 words per thread at G = 128 (BLOCK_N * GPI * 8 >= 128 * num_warps): 128-bit loads
    cands = [(16, 1, 4, 1, 2), (16, 1, 8, 1, 2), (32, 1, 4, 2, 2), (32, 1, 8, 2, 3), (32, 2, 4, 4, 2),
             (64, 1, 2, 4, 2), (64, 1, 4, 4, 3), (16, 2, 4, 2, 2), (32, 2, 2, 4, 3), (64, 2, 1, 8, 2),
             (16, 1, 1, 1, 2), (32, 1, 1, 2, 2)]  # fmt: skip
    return [dict(BLOCK_N=bn, GPI=gpi, SPLIT_K=sk, num_warps=nw, NUM_STAGES=ns) for bn, gpi, sk, nw, ns in cands]


def gemm_configs(G: int, split_k: bool = True) -> list[dict]:
    """GEMM candidates (``BLOCK_B``, ``BLOCK_N``, ``GPI``, ``SPLIT_K``, warps, stages); ``tl.dot`` needs every dim
    >= 16, so ``GPI * G / 16 >= 16``."""
    wpg = G // 16
    gpi_min = max(1, -(-16 // wpg))
    cands = [(16, 32, 1, 4, 4, 2), (16, 64, 1, 2, 4, 2), (16, 64, 2, 4, 4, 2), (32, 64, 1, 2, 4, 2),
             (64, 64, 1, 1, 4, 2), (64, 128, 1, 1, 8, 2), (128, 128, 1, 1, 8, 2), (32, 128, 1, 1, 4, 3),
             (16, 128, 1, 4, 8, 3), (64, 64, 2, 1, 4, 3)]  # fmt: skip
    out = []
    for bb, bn, gm, sk, nw, ns in cands:
        if not split_k and sk > 1:
            continue
        out.append(dict(BLOCK_B=bb, BLOCK_N=bn, GPI=gpi_min * gm, SPLIT_K=sk, num_warps=nw, NUM_STAGES=ns))
    return out


AUTOTUNE = True
"""False: compiled launches without a ``config`` use :func:`default_config` instead of autotuning (``--no-tune``)."""


def bitplane_configs(G: int) -> list[dict]:
    """Bit-serial GEMV candidates (``BLOCK_N``, ``GPI``, ``SPLIT_K``, warps, stages). With ``G = 128`` a (row, group)
    is 32 bytes of planes + 8 of levels; the candidates keep >= 2 such per thread and span 1..64-fold split-K, with and
    without the cp.async pipeline (``NUM_STAGES = 1``: plain loads, no shared memory, no barrier in the loop)."""
    cands = [(32, 1, 4, 1, 1), (32, 1, 4, 2, 2), (64, 1, 4, 2, 2), (64, 2, 4, 4, 3), (64, 2, 2, 4, 2),
             (128, 1, 2, 4, 2), (128, 2, 1, 4, 3), (32, 2, 8, 2, 2), (64, 1, 8, 2, 1), (128, 1, 4, 4, 1),
             (64, 4, 2, 4, 2), (256, 1, 1, 8, 2),
             # deep split-K (issue 36): at batch 1 and N = 4096, BLOCK_N 64 x SPLIT_K 4 is 256 programs, about two
             # per SM of an H100; 16-64 splits fill the 132 SMs several times over (gemlite's split-K, the stream-K
             # of FLUTE / Marlin). Candidates that would leave whole splits empty are pruned per K (prune_split_k)
             (64, 1, 16, 1, 1), (128, 1, 16, 2, 1), (64, 1, 32, 1, 1), (64, 1, 64, 1, 1)]  # fmt: skip
    return [dict(BLOCK_N=bn, GPI=gpi, SPLIT_K=sk, num_warps=nw, NUM_STAGES=ns) for bn, gpi, sk, nw, ns in cands]


def split_k_fits(config: dict, K: int, G: int) -> bool:
    """Whether every one of the ``SPLIT_K`` splits of ``config`` gets at least one iteration of ``GPI`` groups of
    ``G`` in a reduction of length ``K``: with the even deal of :func:`_split_range_fn`, exactly when
    ``ceil(K / G / GPI) >= SPLIT_K``; otherwise some splits are empty (correct, but they only add zeros and draw
    tickets)."""
    iters = -(-(K // G) // config.get("GPI", 1))
    return config.get("SPLIT_K", 1) <= max(iters, 1)


def prune_split_k(configs: list, K: int, G: int) -> list:
    """The candidates of ``configs`` (dicts or ``triton.Config``) whose split-K fits ``K`` (:func:`split_k_fits`);
    never empty: with none fitting, those of the smallest ``SPLIT_K``. Used by the autotuner
    (``early_config_prune``) and by the GPU report's compile warm-up, so that both compile the same set."""
    kw = [c.kwargs if isinstance(c, triton.Config) else c for c in configs]
    keep = [c for c, k in zip(configs, kw) if split_k_fits(k, K, G)]
    if keep:
        return keep
    least = min(k.get("SPLIT_K", 1) for k in kw)
    return [c for c, k in zip(configs, kw) if k.get("SPLIT_K", 1) == least]


def _early_prune(configs, named_args, **kwargs):
    """``triton.autotune``'s ``early_config_prune``: :func:`prune_split_k` at the call's ``K`` and ``G``."""
    args = {**named_args, **kwargs}
    return prune_split_k(configs, int(args["K"]), int(args["G"]))


def default_config(path: str, G: int) -> dict:
    """A fixed, untuned configuration (used when :data:`AUTOTUNE` is False; not chosen by any measurement)."""
    if path == "gemv":
        return dict(BLOCK_N=32, GPI=1, SPLIT_K=4, num_warps=2, NUM_STAGES=2)
    if path == "bitplane":
        return dict(BLOCK_N=64, GPI=2, SPLIT_K=4, num_warps=4, NUM_STAGES=3)
    return dict(BLOCK_B=16, BLOCK_N=64, GPI=max(1, -(-16 // (G // 16))), SPLIT_K=2, num_warps=4, NUM_STAGES=2)


_DEFAULT_INTERP = {"gemv": dict(BLOCK_N=16, GPI=1, SPLIT_K=1, num_warps=4, NUM_STAGES=1),
                   "gemm": dict(BLOCK_B=16, BLOCK_N=16, GPI=None, SPLIT_K=1, num_warps=4, NUM_STAGES=1),
                   "bitplane": dict(BLOCK_N=16, GPI=1, SPLIT_K=1, num_warps=4, NUM_STAGES=1)}

_JIT: dict = {}
_TUNED: dict = {}
_popcount = _epilogue = _act_range = _act_codes = _split_range = _glu = _round_to = None  # the jit helpers, bound per mode by _set_helpers before a kernel is decorated or launched


_KERNELS = {"act": "_act_quant_kernel", "gemv": "_w2a4_gemv_kernel", "gemm": "_w2a4_gemm_kernel",
            "bitplane": "_w2a4_bitplane_gemv_kernel"}


def _set_helpers(interp: bool) -> None:
    """Bind the jit helpers the kernels call (``_popcount``, ``_epilogue``, ...) for this mode: decorated lazily, like the
    kernels, and rebound before every decoration or launch (the interpreter and the compiler need different
    objects)."""
    for name, fn in (("_popcount", _popcount_fn), ("_epilogue", _epilogue_fn), ("_act_range", _act_range_fn),
                     ("_act_codes", _act_codes_fn), ("_split_range", _split_range_fn), ("_glu", _glu_fn),
                     ("_round_to", _round_to_fn)):
        key = (name, interp)
        if key not in _JIT:
            _JIT[key] = triton.jit(fn)
        globals()[name] = _JIT[key]


def _jitted(name: str):
    interp = interpret_mode()
    _set_helpers(interp)
    key = (name, interp)
    if key not in _JIT:
        _JIT[key] = triton.jit(globals()[_KERNELS[name]])
    return _JIT[key]


#: the path and configuration of the last launch-2 kernel call (:func:`pop_launch_config`)
_LAST_LAUNCH: dict = {}


def pop_launch_config() -> str:
    """``"gemv BLOCK_N=32 GPI=1 NUM_STAGES=1 SPLIT_K=4 num_warps=2 (autotuned)"``: the path and configuration of the
    last GEMV / GEMM launch of this module since the previous call, "" when there was none; cleared. The benchmark
    records it beside each measured time, so that a time names the configuration that produced it."""
    last = _LAST_LAUNCH.pop("config", None)
    if last is None:
        return ""
    path, config, nw, how = last  # formatted here, not on every launch (an eager decode step launches per linear)
    if how == "autotuned":
        config, nw = config.kwargs, config.num_warps
    return f"{path} " + " ".join(f"{k}={v}" for k, v in sorted({**config, "num_warps": nw}.items())) + f" ({how})"


def _tuned(kind: str, G: int, split_k: bool):
    """``triton.autotune``-wrapped kernel, one per (kind, G, split-K allowed); compiled mode only. ``kind`` is the path
    with its variants (``bitplane_tiled``, ``bitplane_glu``, ...): each tuned on its own in this process, and the
    bit-serial kernel's tuning key names the constexprs that make the variants read different amounts (``QUANT_IN``,
    ``TILED``, ``GLU``, ``ABITS``) besides ``N``, ``K``, the group ``G`` and the batch: Triton's on-disk tuning cache
    is keyed by the kernel's source, the tuning key and the configurations only, so without them a variant (or
    another group size at the same shape) would reuse another's timings."""
    key = (kind, G, split_k)
    base = kind.split("_")[0]
    if key not in _TUNED:
        cfgs = {"gemv": gemv_configs, "bitplane": bitplane_configs}.get(base, lambda g: gemm_configs(g, split_k))(G)
        cfgs = [c for c in cfgs if split_k or c["SPLIT_K"] == 1]  # no workspace: no split-K
        configs = []
        for c in cfgs:
            c = dict(c)
            nw = c.pop("num_warps")
            configs.append(triton.Config(c, num_warps=nw, num_stages=1))
        _set_helpers(False)
        fn = globals()[_KERNELS[base]]
        tkey = ["N", "K", "B_KEY", "G"] + (["ABITS", "QUANT_IN", "TILED", "GLU"] if base == "bitplane" else [])
        _TUNED[key] = triton.autotune(configs=configs, key=tkey, cache_results=True,
                                      prune_configs_by={"early_config_prune": _early_prune})(triton.jit(fn))
    return _TUNED[key]


# ----------------------------------------------------------------------------------------------- buffers
_WORKSPACE: dict = {}
_HADAMARD: dict = {}


def _workspace(device: torch.device, N: int, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed fp32 ``[bucket * N]`` partial-sum buffer and int32 tile counters, cached per (device, N, bucket) and
    never freed (kernels leave them zeroed; CUDA graphs keep their addresses)."""
    key = (str(device), N, bucket)
    if key not in _WORKSPACE:
        _WORKSPACE[key] = (torch.zeros(bucket * N, dtype=torch.float32, device=device),
                           torch.zeros(triton.cdiv(N, 8) * bucket, dtype=torch.int32, device=device))
    return _WORKSPACE[key]


@functools.lru_cache(maxsize=128)
def _hadamard_split(hb: int) -> tuple[int, int] | None:
    """``(C, m)`` of the pre-kernel's transform of order ``hb`` (module docstring): ``H_hb = kron(H_m', H_C)`` with
    ``C = min(P, 128)`` for ``hb = base · P`` (:func:`rcp_lib.rotation.hadamard.hadamard_factors`, ``P`` a power of
    two) and ``m = hb / C`` rows mixed by ``H_m = hadamard_int(m)``; None when no such order is built or ``P < 16``."""
    from ..rotation.hadamard import hadamard_factors

    try:
        _, P = hadamard_factors(hb)
    except ValueError:
        return None
    if P < 16:
        return None
    C = min(P, 128)
    return C, hb // C


#: the most rows (padded to a power of two, ``RP``) that the pre-kernel's row mixing takes: its operand is
#: ``[RP, RP]`` fp32. 32 lowers to sm_90 (tests/kernels/test_fused.py); LLaMA-2-7B's 11008 = 172 · 64 would need 256
#: (``H_172`` on rows of 64), and ptxas had not finished that kernel after 7 minutes and 4.5 GB on this project's CPU;
#: 64 to 256 are untested. Such orders and blocks keep the torch transform (or a power-of-two ``r4_block`` <= 128,
#: which mixes no rows)
MAX_MIX_ROWS = 32


def hadamard_supported(K: int, block: int | None) -> bool:
    """Whether the pre-kernel applies ``OnlineHadamard(K, block)`` itself: a Hadamard block ``HB = block or K`` that
    divides ``K <= MAX_ROW``, of order ``base · P`` with a power of two ``P >= 16`` (``base`` 1: a power of two), whose
    ``K / C`` rows of ``C = min(P, 128)`` columns fit :data:`MAX_MIX_ROWS` when rows are mixed at all (``HB > C``;
    e.g. SmolLM2's MLP width 1536 = 12 · 128: its 12 rows are mixed by ``H_12`` in the pre-kernel's second
    ``tl.dot``; a full 4096 mixes 32 rows). Other orders and blocks, LLaMA-2-7B's 11008 = 172 · 64 among them, keep
    the torch transform (:func:`rcp_lib.rotation.hadamard.apply_hadamard`) before the pre-kernel."""
    hb = block or K
    split = _hadamard_split(hb) if K <= MAX_ROW and K % hb == 0 else None
    if split is None:
        return False
    C, m = split
    return m == 1 or triton.next_power_of_2(K // C) <= MAX_MIX_ROWS


def _hadamard_operands(K: int, hb: int, device: torch.device):
    """(``H_C`` ±1 fp32 ``[C, C]``, ``L`` ±1/0 fp32 ``[RP, RP]`` or None, C, RP), built once per device.

    The row ``x [K]`` viewed as ``X [K / C, C]`` (row-major) gives ``x @ kron(I, H_hb) = L (X H_C)`` with
    ``L = kron(I_{K / hb}, H_m)ᵀ`` (``H_hb = kron(H_m, H_C)``, :func:`_hadamard_split`), zero-padded to ``RP``: the
    transpose matters for the non-symmetric base orders (Sylvester's are symmetric)."""
    key = (str(device), K, hb)
    if key not in _HADAMARD:
        from ..rotation.hadamard import hadamard_int

        C, m = _hadamard_split(hb)
        R = K // C
        RP = max(16, triton.next_power_of_2(R))
        hc = hadamard_int(C).to(torch.float32)
        hl = None
        if m > 1:
            full = torch.zeros(RP, RP, dtype=torch.float32)
            full[:R, :R] = torch.kron(torch.eye(R // m), hadamard_int(m).to(torch.float32)).T
            hl = full.to(device)
        _HADAMARD[key] = (hc.to(device).contiguous(), hl, C, RP)
    return _HADAMARD[key]


def _round_code(dtype: torch.dtype) -> int:
    """:func:`_glu_fn`'s ``ROUND`` for activations of ``dtype`` (what torch rounds each op of the product to)."""
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    if dtype not in codes:
        raise ValueError(f"glu needs fp16 / bf16 / fp32 activations, got {dtype}")
    return codes[dtype]


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not interpret_mode():
        raise RuntimeError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")


# ----------------------------------------------------------------------------------------------- launchers
def quantize_activations_triton(x: torch.Tensor, bits: int, clip_ratio: float, G: int | None,
                                hadamard_block: int | None = None, apply_hadamard: bool = False,
                                num_warps: int | None = None, planes: bool = False, glu: bool = False,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch 1: (optional Hadamard +) per-token asymmetric quantization of ``x [B, K]``.

    Args:
        x: ``[B, K]`` fp16 / bf16 / fp32 activations; with ``glu``, ``[B, 2K]`` = ``[gate | up]`` (a merged gate / up
            projection's output), and the quantized input is ``silu(gate) * up`` computed here as torch computes
            the MLP's product in ``x.dtype`` (:func:`_glu_fn`): the SiLU and the product of a gated MLP fused into
            ``down_proj``'s activation quantizer (no torch launch, no ``[B, K]`` round trip).
        bits: activation bits (1..8). clip_ratio: in ``(0, 1]``.
        G: weight group size: codes are written in the order of :func:`.layout.activation_permutation` for it
            (None: natural order, what :func:`rcp_lib.quant.activations.quantize_per_token` returns).
        hadamard_block, apply_hadamard: apply ``x @ kron(I, H_hb)`` first (``hb = hadamard_block or K``), the
            ``OnlineHadamard(K, hadamard_block)`` of R4; needs :func:`hadamard_supported`.
        planes: write the codes as bit planes, ``int32 [B, bits, K / 32]`` (:func:`.layout.activation_bitplanes` of
            the natural-order codes; ``K % 32 == 0``; ``G`` is ignored), the operand of
            :func:`w2a4_bitplane_matmul_triton`.
    Returns:
        ``(codes, scale float32 [B], zero float32 [B])``: ``x_hat = (codes - zero) * scale``; codes are uint8
        ``[B, K]`` (or the planes).
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [B, K], got {tuple(x.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    _check_device(x)
    B, K = x.shape
    if glu:
        if K % 2:
            raise ValueError(f"glu needs x = [gate | up] of an even width, got {K}")
        K //= 2
    if K > MAX_ROW:
        raise ValueError(f"the pre-kernel holds one row in registers: K <= {MAX_ROW}, got {K}")
    if planes:
        if K % 32:
            raise ValueError(f"bit planes need K % 32 == 0, got K={K}")
        G = None
    if G is not None and not fused_layout_supported(K, G):
        raise ValueError(f"permuted codes need G % 16 == 0 and K % G == 0, got K={K}, G={G}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    dev = x.device
    if planes:
        codes = torch.empty((B, bits, K // 32), dtype=torch.int32, device=dev)
    else:
        codes = torch.empty((B, K), dtype=torch.uint8, device=dev)
    s = torch.empty(B, dtype=torch.float32, device=dev)
    z = torch.empty(B, dtype=torch.float32, device=dev)
    if B == 0:
        return codes, s, z
    hb = (hadamard_block or K) if apply_hadamard else None
    if hb is not None:
        if not hadamard_supported(K, hadamard_block):
            raise ValueError(f"the pre-kernel's Hadamard needs a block dividing K of order 2^k or base * 2^k with "
                             f"2^k >= 16, got {hb} (K={K})")
        hc, hl, C, RP = _hadamard_operands(K, hb, dev)
        KP = 16
    else:
        hc = hl = None
        C, RP, KP = 16, 16, triton.next_power_of_2(K)
    interp = interpret_mode()
    if num_warps is None:
        num_warps = 4 if K <= 4096 else (8 if K <= 16384 else 16)
    _jitted("act")[(B,)](
        x, codes, s, z, hc if hc is not None else s, hl if hl is not None else s,
        K, x.stride(0), codes.stride(0), codes.stride(1) if planes else 0, float(clip_ratio),
        1.0 / math.sqrt(hb) if hb else 1.0,
        LEVELS=1 << bits, G=G or 16, PERMUTE=G is not None, HADAMARD=hb is not None, MIX_ROWS=hl is not None,
        KP=KP, C=C, RP=RP, PLANES=planes, ABITS=bits, INTERPRET=interp, GLU=glu, ROUND=_round_code(x.dtype) if glu else 0,
        num_warps=num_warps, **QUANT_LAUNCH_OPTIONS,
    )  # fmt: skip
    return codes, s, z


def w2a4_matmul_triton(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, packed_w: torch.Tensor,
                       lut: torch.Tensor, wsum: torch.Tensor, K: int, G: int, bias: torch.Tensor | None = None,
                       out_dtype: torch.dtype = torch.float32, path: str | None = None,
                       config: dict | None = None) -> torch.Tensor:
    """Launch 2: ``y [B, N] = scale * (codes @ W_hat^T - zero * wsum) (+ bias)`` in ``out_dtype``.

    Args:
        codes: ``[B, K]`` uint8 activation codes in the permuted order of :func:`.layout.activation_permutation`
            (what :func:`quantize_activations_triton` writes with ``G``); the GEMV path also takes float
            activations (with scale 1, zero 0), the GEMM path only codes or fp16.
        scale, zero: float32 ``[B]``. packed_w: int32 ``[N, K / 16]`` (:func:`.bitpack.pack_codes`, unchanged).
        lut: ``[N, K / G, 4]`` fp16 or fp32. wsum: float32 ``[N]``, :func:`.layout.weight_row_sums`.
        K, G: input features and group size (:func:`.layout.fused_layout_supported`). bias: ``[N]`` or None.
        path: "gemv", "gemm" or None (GEMV for ``B <= GEMV_MAX_BATCH``).
        config: a fixed configuration (keys of :func:`gemv_configs` / :func:`gemm_configs`) instead of autotuning;
            the interpreter always runs a fixed one.
    Returns:
        ``[B, N]`` in ``out_dtype``.
    """
    if not fused_layout_supported(K, G):
        raise ValueError(f"the fused kernel needs G % 16 == 0 and K % G == 0, got K={K}, G={G}")
    if codes.dim() != 2 or codes.shape[1] != K:
        raise ValueError(f"codes must be [B, K={K}], got {tuple(codes.shape)}")
    B, N = codes.shape[0], packed_w.shape[0]
    if packed_w.dtype != torch.int32 or tuple(packed_w.shape) != (N, K // 16):
        raise ValueError(f"packed_w must be int32 [N, {K // 16}], got {packed_w.dtype} {tuple(packed_w.shape)}")
    _check_operands(B, N, K, G, lut, wsum)
    path = path or ("gemv" if B <= GEMV_MAX_BATCH else "gemm")
    if path not in ("gemv", "gemm"):
        raise ValueError(f"path must be 'gemv' or 'gemm', got {path!r}")
    if path == "gemm" and codes.dtype not in (torch.uint8, torch.float16):
        raise ValueError("the GEMM path takes uint8 codes or fp16 activations (exact in fp16)")
    codes = codes if codes.stride(-1) == 1 else codes.contiguous()
    return _launch(path, codes, scale, zero, packed_w.contiguous(), lut, wsum, bias, out_dtype, G, config,
                   (codes.stride(0), packed_w.stride(0)))


def w2a4_bitplane_matmul_triton(aplanes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                                wplanes: torch.Tensor, lut: torch.Tensor, wsum: torch.Tensor, K: int, G: int,
                                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                                config: dict | None = None) -> torch.Tensor:
    """Launch 2, bit-serial: ``y [B, N] = scale * (sum_k a_k W_hat[n, k] - zero * wsum) (+ bias)`` from bit planes.

    Args:
        aplanes: int32 ``[B, A, K / 32]`` activation planes (:func:`quantize_activations_triton` with ``planes=True``,
            or :func:`.layout.activation_bitplanes`), ``A`` = activation bits.
        scale, zero: float32 ``[B]``. wplanes: int32 ``[N, 2, K / 32]`` (:func:`.layout.weight_bitplanes`), or the
            planes and levels as tiles, int32 ``[N, ceil(K / G / 2) * R]`` (:func:`.layout.weight_tiles` of these
            planes and ``lut``, ``R`` words per record of two groups; the kernel then reads the levels from the
            tiles).
        lut: ``[N, K / G, 4]`` fp16 or fp32. wsum: float32 ``[N]``. K, G: :func:`.layout.bitplane_layout_supported`.
        bias: ``[N]`` or None. config: keys of :func:`bitplane_configs` instead of autotuning (the interpreter
            always runs a fixed one).
    Returns:
        ``[B, N]`` in ``out_dtype``. Any batch is accepted; it is meant for decode (a few tokens): each token costs
        the 12 popcounts per 32 weights again, where the GEMM path shares its dequantized tile.
    """
    N = _check_wplanes(wplanes, K, G, lut.dtype)
    if aplanes.dim() != 3 or aplanes.shape[2] != K // 32 or aplanes.dtype != torch.int32 or not 1 <= aplanes.shape[1] <= 8:
        raise ValueError(f"aplanes must be int32 [B, bits (1..8), {K // 32}], got {aplanes.dtype} {tuple(aplanes.shape)}")
    _check_operands(aplanes.shape[0], N, K, G, lut, wsum)
    aplanes, wplanes = aplanes.contiguous(), wplanes.contiguous()
    lut, tiled = _tile_operands(wplanes, lut, G)
    return _launch("bitplane", aplanes, scale, zero, wplanes, lut, wsum, bias, out_dtype, G, config,
                   (aplanes.stride(0), aplanes.stride(1), wplanes.stride(0), wplanes.stride(-2) if not tiled else 0),
                   abits=aplanes.shape[1], tiled=tiled)


def w2a4_bitplane_linear_triton(x: torch.Tensor, wplanes: torch.Tensor, lut: torch.Tensor, wsum: torch.Tensor, K: int,
                                G: int, act_bits: int = 4, act_clip_ratio: float = 1.0,
                                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                                config: dict | None = None, glu: bool = False) -> torch.Tensor:
    """The whole W2A4 linear in **one** launch for decode: the bit-serial kernel quantizes ``x [B, K]`` itself
    (``quantize_per_token``'s formula with ``act_clip_ratio``, the same helpers as the pre-kernel: bit-identical
    codes), each program its own chunks after reading its tokens' rows for min / max. No online Hadamard (a layer with
    one uses the pre-kernel, :func:`w2a4_linear_triton`). ``-> [B, N]`` in ``out_dtype`` (default ``x.dtype``).

    Args: as :func:`w2a4_bitplane_matmul_triton`, with ``x`` fp16 / bf16 / fp32 activations instead of the planes
    and ``act_bits`` in 1..8, ``act_clip_ratio`` in ``(0, 1]``; with ``glu``, ``x`` is ``[B, 2K]`` = ``[gate | up]``
    and the layer's input is ``silu(gate) * up`` (:func:`quantize_activations_triton`'s ``glu``).
    """
    N = _check_wplanes(wplanes, K, G, lut.dtype)
    width = 2 * K if glu else K
    if x.dim() != 2 or x.shape[1] != width or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16 / bf16 / fp32 [B, {'2K=' if glu else 'K='}{width}], got {x.dtype} "
                         f"{tuple(x.shape)}")
    if not 1 <= act_bits <= 8:
        raise ValueError(f"act_bits must be in 1..8, got {act_bits}")
    if not 0 < act_clip_ratio <= 1:
        raise ValueError(f"act_clip_ratio must be in (0, 1], got {act_clip_ratio}")
    _check_operands(x.shape[0], N, K, G, lut, wsum)
    x = x if x.stride(-1) == 1 else x.contiguous()
    wplanes = wplanes.contiguous()
    lut, tiled = _tile_operands(wplanes, lut, G)
    return _launch("bitplane", x, wsum, wsum, wplanes, lut, wsum, bias, out_dtype or x.dtype, G, config,
                   (x.stride(0), 0, wplanes.stride(0), wplanes.stride(-2) if not tiled else 0), abits=act_bits,
                   clip=act_clip_ratio, quant_in=True, tiled=tiled, glu=glu)


def _check_wplanes(wplanes: torch.Tensor, K: int, G: int, lut_dtype: torch.dtype = torch.float16) -> int:
    """Validate the bit-serial kernel's shape and weight operand (planes ``[N, 2, K / 32]`` or tiles
    ``[N, ceil(K / G / 2) * R]``, :func:`.layout.weight_tiles`); returns ``N``."""
    from .layout import bitplane_layout_supported, tile_record_words

    if not bitplane_layout_supported(K, G):
        raise ValueError(f"the bit-serial kernel needs G % 32 == 0 and K % G == 0, got K={K}, G={G}")
    N = wplanes.shape[0]
    if wplanes.dim() == 2:
        want = (N, -(-(K // G) // 2) * tile_record_words(G, lut_dtype))
        if wplanes.dtype != torch.int32 or tuple(wplanes.shape) != want:
            raise ValueError(f"weight tiles must be int32 [N, {want[1]}], got {wplanes.dtype} {tuple(wplanes.shape)}")
    elif wplanes.dtype != torch.int32 or tuple(wplanes.shape) != (N, 2, K // 32):
        raise ValueError(f"wplanes must be int32 [N, 2, {K // 32}], got {wplanes.dtype} {tuple(wplanes.shape)}")
    return N


def _tile_operands(w: torch.Tensor, lut: torch.Tensor, G: int) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """For tiles (a 2-D ``w``): the levels operand the kernel reads (``w`` viewed in the LUT's dtype) and
    ``(REC, LREC, LOFF, ALIGN)``: words per record (two groups), elements of that view per record, the levels' offset
    in a record in elements, and the words every group's chunks start at a multiple of; for planes: ``(lut, None)``."""
    if w.dim() != 2:
        return lut, None
    from .layout import tile_record_words

    rec, per_word, ch = tile_record_words(G, lut.dtype), 4 // lut.element_size(), G // 32
    return w.view(lut.dtype), (rec, rec * per_word, 4 * ch * per_word, math.gcd(rec, 2 * ch))


def _check_operands(B: int, N: int, K: int, G: int, lut: torch.Tensor, wsum: torch.Tensor) -> None:
    if tuple(lut.shape) != (N, K // G, 4) or lut.dtype not in (torch.float16, torch.float32):
        raise ValueError(f"lut must be fp16/fp32 [N={N}, {K // G}, 4], got {lut.dtype} {tuple(lut.shape)}")
    if tuple(wsum.shape) != (N,):
        raise ValueError(f"wsum must be [N={N}], got {tuple(wsum.shape)}")


def _launch(path: str, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, w: torch.Tensor, lut: torch.Tensor,
            wsum: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype, G: int, config: dict | None,
            strides: tuple[int, ...], abits: int = 4, clip: float = 1.0, quant_in: bool = False,
            tiled: tuple[int, int, int] | None = None, glu: bool = False) -> torch.Tensor:
    """The launch shared by the three launch-2 kernels: operands to the device layout, the split-K workspace, a fixed
    configuration (interpreter, ``AUTOTUNE`` off, or given) or the autotuned kernel. ``tiled``: the bit-serial
    kernel on tiles, ``(REC, LREC, LOFF)`` of :func:`_tile_operands` (autotuned on its own); ``glu``: its
    activations are ``[gate | up]`` (with ``quant_in``)."""
    _check_device(x)
    _set_helpers(interpret_mode())
    dev = x.device
    B, N, K = x.shape[0], w.shape[0], (x.shape[-1] * 32 if path == "bitplane" and not quant_in else x.shape[1])
    if glu:
        if not quant_in:
            raise ValueError("glu: only a kernel that quantizes its activations reads [gate | up]")
        K //= 2
    lut = lut.contiguous()
    wsum = wsum.to(device=dev, dtype=torch.float32).contiguous()
    if quant_in:  # the kernel computes scale and zero itself: any fp32 pointer (no allocation, no launch)
        scale = zero = wsum
    else:
        scale = scale.reshape(B).to(device=dev, dtype=torch.float32).contiguous()
        zero = zero.reshape(B).to(device=dev, dtype=torch.float32).contiguous()
    y = torch.empty((B, N), dtype=out_dtype, device=dev)
    if B == 0 or N == 0:
        return y
    bucket = triton.next_power_of_2(B)
    split_ok = bucket <= _SPLITK_MAX_BUCKET
    ws, cnt = _workspace(dev, N, bucket) if split_ok else (scale, scale.new_zeros(1, dtype=torch.int32))
    has_bias = bias is not None
    args = (x, scale, zero, w, lut, wsum, bias if has_bias else wsum, y, ws, cnt,
            B, N, K, *strides, lut.stride(0), y.stride(0), min(bucket, 4096))
    opts = {}
    if path == "bitplane":
        args += (float(clip),)
        opts = QUANT_LAUNCH_OPTIONS
    interp = interpret_mode()
    center = CODE_CENTER if x.dtype == torch.uint8 else 0.0  # float activations (scale 1, zero 0): not centred
    if path == "gemm":
        consts = dict(G=G, HAS_BIAS=has_bias, DOT_F32=lut.dtype == torch.float32, INTERPRET=interp, CENTER=center)
    else:
        block_b = min(triton.next_power_of_2(B), GEMV_MAX_BATCH)
        consts = dict(G=G, HAS_BIAS=has_bias, BLOCK_B=block_b, INTERPRET=interp)
        if path == "bitplane":
            # centred on the middle of the activation codes (7.5 at 4 bits), as the select kernels
            consts.update(ABITS=abits, QUANT_IN=quant_in, RB=min(triton.next_power_of_2(K), 1024),
                          CENTER=((1 << abits) - 1) / 2)
            rec, lrec, loff, align = tiled or (0, 0, 0, 1)
            consts.update(TILED=tiled is not None, REC=rec, LREC=lrec, LOFF=loff, ALIGN=align, GLU=glu,
                          ROUND=_round_code(x.dtype) if glu else 0)  # ROUND acts on the GLU product only
        else:
            consts.update(CENTER=center)
    kind = path + ("_tiled" if tiled else "") + ("_glu" if glu else "")  # the variant: its label and its tuning
    if config is None and not interp and not AUTOTUNE:
        config = default_config(path, G)
        if not split_ok:
            config["SPLIT_K"] = 1
    if config is None and interp:
        config = dict(_DEFAULT_INTERP[path])
        if path == "gemm":
            config["GPI"] = max(1, -(-16 // (G // 16)))
    if config is not None:
        cfg = dict(config)
        nw = cfg.pop("num_warps", 4)
        if not split_ok and cfg.get("SPLIT_K", 1) > 1:
            raise ValueError(f"split-K needs a batch of at most {_SPLITK_MAX_BUCKET} tokens")
        if path == "gemm" and cfg["GPI"] * (G // 16) < 16:
            raise ValueError("tl.dot needs GPI * G / 16 >= 16")
        if cfg["BLOCK_N"] < 8:
            raise ValueError("BLOCK_N must be >= 8 (the split-K counters are sized for it)")
        bb = consts.get("BLOCK_B", cfg.get("BLOCK_B"))
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"], triton.cdiv(B, bb))
        _jitted(path)[grid](*args, **consts, **cfg, num_warps=nw, **opts)
        _LAST_LAUNCH["config"] = (kind, cfg, nw, "fixed")
    else:
        kern = _tuned(kind, G, split_ok)

        def grid(meta):
            bb = meta["BLOCK_B"]
            return (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"], triton.cdiv(B, bb))

        kern[grid](*args, **consts, **opts)
        best = getattr(kern, "best_config", None)  # the autotuner's choice for this call's key
        if best is None:  # no choice to name: an earlier launch's configuration must not stand for this one
            _LAST_LAUNCH.pop("config", None)
        else:
            _LAST_LAUNCH["config"] = (kind, best, None, "autotuned")
    return y


def w2a4_linear_triton(x: torch.Tensor, packed_w: torch.Tensor, lut: torch.Tensor, wsum: torch.Tensor, K: int,
                       G: int, act_bits: int = 4, act_clip_ratio: float = 1.0, bias: torch.Tensor | None = None,
                       hadamard_block: int | None = None, apply_hadamard: bool = False,
                       out_dtype: torch.dtype | None = None, config: dict | None = None,
                       wplanes: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """The whole W2A4 linear in two launches: :func:`quantize_activations_triton` then :func:`w2a4_matmul_triton`.
    ``x [B, K]`` -> ``[B, N]`` in ``out_dtype`` (default ``x.dtype``). With ``wplanes`` (int32 ``[N, 2, K / 32]`` or tiles,
    :func:`.layout.weight_bitplanes` of ``packed_w``), a decode batch (``B <= GEMV_MAX_BATCH``) runs the bit-serial
    kernel instead, in one launch (:func:`w2a4_bitplane_linear_triton`) unless the pre-kernel applies a Hadamard
    (then pre-kernel planes + :func:`w2a4_bitplane_matmul_triton`); larger batches the GEMM on ``packed_w`` either
    way. ``glu``: ``x`` is ``[B, 2K]`` = ``[gate | up]`` and the layer's input is ``silu(gate) * up``, computed by
    whichever kernel quantizes the activations (:func:`quantize_activations_triton`)."""
    if wplanes is not None and x.shape[0] <= GEMV_MAX_BATCH:
        if not apply_hadamard:  # one launch: the kernel quantizes its own chunks
            return w2a4_bitplane_linear_triton(x, wplanes, lut, wsum, K, G, act_bits, act_clip_ratio, bias,
                                               out_dtype or x.dtype, config=config, glu=glu)
        planes, s, z = quantize_activations_triton(x, act_bits, act_clip_ratio, G, hadamard_block, apply_hadamard,
                                                   planes=True, glu=glu)
        return w2a4_bitplane_matmul_triton(planes, s, z, wplanes, lut, wsum, K, G, bias, out_dtype or x.dtype,
                                           config=config)
    codes, s, z = quantize_activations_triton(x, act_bits, act_clip_ratio, G, hadamard_block, apply_hadamard, glu=glu)
    return w2a4_matmul_triton(codes, s, z, packed_w, lut, wsum, K, G, bias, out_dtype or x.dtype, config=config)
