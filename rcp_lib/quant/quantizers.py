"""Weight fake-quantizers: uniform RTN, learnable weight clipping (LWC) and Learnable Direct Partitioning (LDP).

All quantizers act on a weight ``w`` of shape ``[out, in]`` (an ``nn.Linear`` weight) and work per *group*:
``group_size`` consecutive input elements of one output row (``group_size=-1``: the whole row is one group).
A weight is viewed as ``[out, n_groups, group_size]``; every range / level tensor below is per group,
``lo, hi: [out, n_groups]`` and ``levels: [out, n_groups, L]`` with ``L = 2**bits``.
Fake quantization returns a tensor of the shape and dtype of ``w`` whose values lie on the per-group grid, with
straight-through gradients, so the latent (full-precision) weight can be trained (QAT).

Clipping range of a group (``lo <= hi``)
----------------------------------------
* min-max (``lwc=False``): ``hi = clip_ratio * max(w_g)``, ``lo = clip_ratio * min(w_g)`` (QuaRot's ``w_clip``
  multiplies both ends by the ratio; ``clip_ratio=1`` is plain min-max). :func:`mse_clip_range` (``clip_search=
  "mse"``) picks the ratio per group that minimises QuaRot's ``|Q(w) - w|^2.4`` weight error.
* LWC (OmniQuant's learnable weight clipping, ``lwc=True``): ``hi = sigmoid(gamma) * max(w_g)``,
  ``lo = sigmoid(beta) * min(w_g)`` with learnable ``gamma, beta: [out, n_groups]``, initialised to ``lwc_init``
  (4.0 as in OmniQuant, i.e. a ratio of 0.982). ``sigmoid -> 1`` recovers min-max. The group min / max are
  treated as statistics of the weight (no gradient flows into ``w`` through them).

* Static range (``range_mode="static"``, with ``lwc=True``): ``lo, hi: [out, n_groups]`` are themselves the learnable
  parameters, set once by :meth:`WeightQuantizer.init_from` (or :meth:`WeightQuantizer.init_from_levels`, e.g. from a
  GPTQ level table) and never recomputed from the latent weight (EfficientQAT learns its scale / zero point, ParetoQ its
  range, the same way). A GPTQ-rounded start then stays on its grid. Our reading, not the paper's.
  ``range_param`` says what is learned: ``"absolute"`` (``lo, hi`` themselves, in weight units: one learning rate
  means a different relative step in every layer, a large one for tiny weights, a negligible one for large ranges) or
  ``"log"`` (scale-free: ``lo0, hi0`` are the start's range, kept as buffers, and the learnable log-multipliers
  ``log_lo, log_hi: [out, n_groups]`` (init 0) stretch each end away from the start's centre ``c = (lo0 + hi0) / 2``:
  ``lo = c - (c - lo0) * exp(log_lo)``, ``hi = c + (hi0 - c) * exp(log_hi)``; a step of ``lr`` changes an end's
  distance from the centre by the factor ``exp(±lr)`` in every layer alike).
* Clip initialisation (``clip_init``): ``"const"`` (the default: logits ``lwc_init``) or ``"mse"``: the per-group ratio
  of :func:`mse_clip_range` (the search of the uniform baselines, QuaRot's ``|e|^2.4`` on the ``bits``-bit uniform
  grid), capped at ``sigmoid(lwc_init)`` so that a group the search leaves unclipped (ratio 1, logit +inf) starts where
  the constant initialisation starts (with LWC logits, a larger logit would make the clip too flat to learn).

Uniform asymmetric grid (method ``"rtn"``)
------------------------------------------
``s = (hi - lo) / (L - 1)``, codes ``k = clamp(round((w - lo) / s), 0, L - 1)``, value ``lo + s * k``. By default
the zero point is *not* rounded to an integer (``round_zero=False``), so the grid is exactly the ``L`` evenly spaced
levels from ``lo`` to ``hi`` - the grid LDP reduces to at ``theta = 0``. ``round_zero=True`` gives the integer
zero-point variant of GPTQ/QuaRot (``z = round(-lo / s)``, value ``(k - z) * s``). Gradients: straight-through
rounding (identity) for weights inside ``[lo, hi]`` and zero outside; ``lo``/``hi`` (hence LWC's ``gamma``/``beta``)
receive the LSQ/OmniQuant-style gradient of the formula with straight-through rounding.

LDP - Learnable Direct Partitioning (method ``"ldp"``). OUR RECONSTRUCTION, not a quote of the paper.
---------------------------------------------------------------------------------------------------------
Only the abstract of RCP (arXiv 2502.15779) is available to us. Our reading of it: LDP is a learnable non-uniform
``b``-bit quantizer whose ``L = 2**b`` levels partition the (clipped) range of each group, trained jointly with the
weights. We parametrise it as follows (every choice is a :class:`WeightQuantConfig` field):

    q_0 = lo,    q_k = lo + (hi - lo) * sum_{j<k} softmax(theta)_j,   k = 1 .. L-1     (so q_{L-1} = hi)

with ``theta in R^{L-1}`` learnable per group (``ldp_granularity="group"``) or shared by all the groups of an output
row (``"row"``; the levels then still scale with each group's own ``[lo, hi]``). ``[lo, hi]`` comes from LWC when
``lwc=True`` (RCP's quantizer: rotation + clipping + partitioning) or from min-max/``clip_ratio`` when ``lwc=False``
(the "no clip" ablation). Each weight goes to its nearest level (thresholds at the midpoints between consecutive
levels). Since ``softmax > 0`` the levels are ordered by construction, and ``theta = 0`` gives exactly the uniform
grid of method ``"rtn"``.

Gradients (our choice): the output value is ``levels[code]``; ``d out / d w = 1`` for ``w`` inside ``[lo, hi]`` and 0
outside (clipped weights get no gradient, as in LWC/PACT); ``d out / d q_k = 1`` for the elements assigned to level
``k``, so ``theta``, ``lo`` and ``hi`` (hence ``gamma``, ``beta``) get the exact gradient of the level formula for the
current assignment.

Initialisation (``ldp_init``): ``"uniform"`` (``theta = 0``) or ``"lloyd"``: the MSE-optimal levels of each group
(1-D k-means / Lloyd-Max) with the two end levels pinned at ``lo`` and ``hi`` (the parametrisation fixes them), then
``theta = log`` of the normalised gaps. For ``"row"`` granularity one set of normalised levels is fitted to the
pooled, range-normalised weights of the row (weighted by the squared group range, i.e. the real MSE).

Export: :meth:`WeightQuantizer.export` returns ``codes`` (uint8 ``[out, in]``, values ``0..L-1``) and ``levels``
(float32 ``[out, n_groups, L]``) with ``levels.gather(codes)`` equal to the fake-quantized weight (bit-exact for
float32 weights) - the layout a 2-bit kernel with a 4-entry LUT per group consumes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..config import JsonConfig
from ..memory import PAPER_GROUP

METHODS = ("rtn", "lwc", "ldp")
LDP_GRANULARITIES = ("group", "row")
LDP_INITS = ("uniform", "lloyd")
CLIP_INITS = ("const", "mse")
RANGE_MODES = ("relative", "static")
RANGE_PARAMS = ("absolute", "log")
_EPS = 1e-10  # smallest group range (constant groups quantize to themselves)


# --------------------------------------------------------------------------------------------------
# validation and grouping
# --------------------------------------------------------------------------------------------------


def check_weight_bits(bits: int) -> int:
    """Validate a weight bit width (integer in 1..8). 16 ("off") is handled by callers, not here."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"weight bits must be an integer in 1..8, got {bits!r} (16 = 'off' is handled by the caller)")
    return bits


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    """Raise ``ValueError`` if ``w`` has NaN or inf entries.

    Fast path: one reduction. A NaN or inf entry makes the float sum non-finite, so a finite sum proves that every
    entry is finite; only a non-finite sum (a bad entry, or a sum that overflowed) pays for the element-wise check.
    """
    if w.is_floating_point() and bool(torch.isfinite(w.detach().sum(dtype=torch.promote_types(w.dtype, torch.float32)))):
        return
    if not torch.isfinite(w).all():
        n_bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"{name} has {n_bad} NaN/inf values (shape {tuple(w.shape)}); cannot quantize")


def resolve_group_size(in_features: int, group_size: int, name: str = "weight") -> int:
    """The effective group size (``-1`` -> ``in_features``); ``ValueError`` if it does not divide ``in_features``."""
    if group_size == -1:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or -1 (per output row), got {group_size!r} for {name}")
    if in_features % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the input size {in_features} of {name}; use a divisor "
            f"(e.g. {math.gcd(in_features, group_size)}) or -1 (per output row)"
        )
    return group_size


def group_view(w: torch.Tensor, group_size: int, name: str = "weight") -> torch.Tensor:
    """View ``w [out, in]`` as ``[out, n_groups, group_size]`` (``group_size=-1``: one group per row)."""
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(w.shape)}")
    gs = resolve_group_size(w.shape[1], group_size, f"{name} {tuple(w.shape)}")
    return w.reshape(w.shape[0], w.shape[1] // gs, gs)


def _compute_dtype(*ts: torch.Tensor) -> torch.dtype:
    dt = torch.float32
    for t in ts:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def minmax_range(wg: torch.Tensor, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(lo, hi)`` = ``clip_ratio * (min, max)`` of ``wg [..., gs]`` -> two ``[...]`` tensors (no grad)."""
    wd = wg.detach()
    return clip_ratio * wd.amin(-1), clip_ratio * wd.amax(-1)


def lwc_range(wg: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OmniQuant LWC range: ``hi = sigmoid(gamma) * max``, ``lo = sigmoid(beta) * min`` over the last dim of ``wg``.

    Args:
        wg: ``[out, n_groups, gs]`` grouped weight (min / max are taken without gradient).
        gamma, beta: ``[out, n_groups]`` (or broadcastable) learnable logits.
    Returns:
        ``(lo, hi)``, each ``[out, n_groups]``, differentiable w.r.t. ``gamma`` and ``beta`` (``hi`` is raised to
        ``lo`` in the degenerate case of a one-signed group with ``hi < lo``).
    """
    wd = wg.detach()
    lo, hi = torch.sigmoid(beta) * wd.amin(-1), torch.sigmoid(gamma) * wd.amax(-1)
    return lo, torch.maximum(hi, lo)  # a group of one sign could otherwise get hi < lo


# --------------------------------------------------------------------------------------------------
# uniform grid
# --------------------------------------------------------------------------------------------------


class _RoundSTE(torch.autograd.Function):
    """``torch.round`` forward, identity backward (exact forward values, unlike ``x + (round(x) - x).detach()``)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through (identity) gradient. Same shape/dtype as ``x``."""
    return _RoundSTE.apply(x)


def uniform_levels(lo: torch.Tensor, hi: torch.Tensor, bits: int, round_zero: bool = False) -> torch.Tensor:
    """The ``L = 2**bits`` levels of the uniform asymmetric grid of each group.

    Args:
        lo, hi: ``[...]`` group ranges.
    Returns:
        ``[..., L]`` levels, in the dtype of ``lo``; computed with the same floating-point operations as
        :func:`quantize_uniform`, so ``levels.gather(codes)`` equals its output bit for bit.
    """
    L = 2 ** check_weight_bits(bits)
    s = ((hi - lo) / (L - 1)).clamp_min(_EPS).unsqueeze(-1)
    k = torch.arange(L, dtype=lo.dtype, device=lo.device)
    if round_zero:
        z = torch.round(-lo.unsqueeze(-1) / s)
        return (k - z) * s
    return lo.unsqueeze(-1) + s * k


def quantize_uniform(
    wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, round_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform asymmetric fake quantization of grouped weights with straight-through rounding.

    Args:
        wg: ``[out, n_groups, gs]`` weights.
        lo, hi: ``[out, n_groups]`` ranges (may carry gradients, e.g. from LWC).
        bits: 1..8.
        round_zero: integer zero point (GPTQ/QuaRot) instead of the exact ``lo`` (default).
    Returns:
        ``(wq, codes)``: ``wq [out, n_groups, gs]`` (dtype of ``wg`` promoted with ``lo``) and ``codes`` (int64, same
        shape, ``0..L-1``). Gradient w.r.t. ``wg``: 1 inside ``[lo, hi]``, 0 outside.
    """
    L = 2 ** check_weight_bits(bits)
    s = ((hi - lo) / (L - 1)).clamp_min(_EPS).unsqueeze(-1)
    lo_ = lo.unsqueeze(-1)
    if round_zero:
        z = round_ste(-lo_ / s)
        q = round_ste(torch.clamp(wg / s + z, 0, L - 1))
        wq = (q - z) * s
    else:
        q = round_ste(torch.clamp((wg - lo_) / s, 0, L - 1))
        wq = lo_ + s * q
    return wq, q.detach().long()


def fake_quant_uniform(
    w: torch.Tensor, bits: int, group_size: int = PAPER_GROUP, clip_ratio: float = 1.0, round_zero: bool = False,
    name: str = "weight",
) -> torch.Tensor:
    """Uniform asymmetric min-max round-to-nearest fake quantization of a weight, with STE gradients.

    Args:
        w: ``[out, in]`` float weight.
        bits: 1..8.
        group_size: consecutive input elements per group (must divide ``in``), or -1 for one group per row.
        clip_ratio: range ``clip_ratio * [min, max]`` of each group (QuaRot's ``w_clip``), in ``(0, 1]``.
        round_zero: integer zero point instead of the exact group minimum.
    Returns:
        ``[out, in]`` tensor, dtype of ``w``.
    """
    check_weight_bits(bits)
    check_finite(w, name)
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    cdt = _compute_dtype(w)
    wg = group_view(w, group_size, name).to(cdt)
    lo, hi = minmax_range(wg, clip_ratio)
    wq, _ = quantize_uniform(wg, lo, hi, bits, round_zero)
    return wq.reshape(w.shape).to(w.dtype)


# --------------------------------------------------------------------------------------------------
# LDP
# --------------------------------------------------------------------------------------------------


def ldp_fractions(theta: torch.Tensor) -> torch.Tensor:
    """Normalised level positions ``c_k = sum_{j<k} softmax(theta)_j`` in ``[0, 1]``.

    Args:
        theta: ``[..., L-1]``.
    Returns:
        ``[..., L]`` with ``c_0 = 0`` and ``c_{L-1} = 1`` exactly, non-decreasing.
    """
    p = torch.softmax(theta, dim=-1)
    zeros = torch.zeros_like(p[..., :1])
    inner = torch.cumsum(p[..., :-1], dim=-1).clamp(max=1.0)
    return torch.cat([zeros, inner, torch.ones_like(zeros)], dim=-1)


def ldp_levels(theta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """LDP levels ``q_k = lo + (hi - lo) * c_k`` (see module docstring).

    Args:
        theta: ``[out, n_groups or 1, L-1]`` partition logits.
        lo, hi: ``[out, n_groups]``.
    Returns:
        ``[out, n_groups, L]`` levels (ordered), differentiable w.r.t. all three inputs.
    """
    c = ldp_fractions(theta)
    # lo * (1 - c) + hi * c == lo + (hi - lo) * c, written so that q_0 == lo and q_{L-1} == hi exactly
    return lo.unsqueeze(-1) * (1 - c) + hi.unsqueeze(-1) * c


_FAST_CODES_MAX_LEVELS = 16  # up to this many levels, codes are counted by comparisons instead of searchsorted


def _codes_by_comparison(w: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """uint8 ``sum_k [w > mid_k]`` = number of thresholds strictly below ``w`` (same as searchsorted, side left).

    ``w [..., gs]``, ``mid [..., L-1]`` (float, same dtype). For the 2-bit case (3 thresholds) this is 3 vectorised
    compares, about 7x faster than ``torch.searchsorted`` on CPU for the QAT weight shapes.
    """
    codes = (w > mid[..., 0:1]).view(torch.uint8)  # bool is stored as one byte 0/1: reinterpret, no copy
    for k in range(1, mid.shape[-1]):
        codes += (w > mid[..., k:k + 1]).view(torch.uint8)
    return codes


def _nearest_codes(wg: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Codes of the nearest level (ties to the lower one), no grad: uint8 for L <= 16 levels, else int64."""
    lv = levels.detach()
    mid = ((lv[..., 1:] + lv[..., :-1]) * 0.5).contiguous()
    w = wg.detach().to(mid.dtype)
    if lv.shape[-1] <= _FAST_CODES_MAX_LEVELS:
        return _codes_by_comparison(w, mid)
    return torch.searchsorted(mid, w.contiguous())


def nearest_level_codes(wg: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level for every element (ties go to the lower level).

    Args:
        wg: ``[out, n_groups, gs]``.
        levels: ``[out, n_groups, L]`` ordered levels.
    Returns:
        int64 codes ``[out, n_groups, gs]`` in ``0..L-1``.
    """
    return _as_index(_nearest_codes(wg, levels))


def _as_index(codes: torch.Tensor) -> torch.Tensor:
    """int64 copy of uint8 codes (< 128) for gather/scatter; through an int8 view, which PyTorch's CPU
    conversion vectorises (uint8 -> int64 directly is several times slower)."""
    return codes.view(torch.int8).long() if codes.dtype == torch.uint8 else codes.long()


class _LevelQuantize(torch.autograd.Function):
    """``wq = levels[code(w)]`` with LDP's gradients, in one autograd node. Returns ``(wq, codes)``, codes uint8
    (or int64 for more than 16 levels) and not differentiable.

    Forward saves only the codes and the bool clip mask (2 bytes per weight). Backward:
    ``d wq / d w = [lo <= w <= hi]`` (straight through inside the clipping range), and
    ``d wq / d levels_k = 1`` for the elements assigned to level ``k`` (a scatter-add of the incoming gradient).
    """

    @staticmethod
    def forward(ctx, wg, levels, lo, hi):  # type: ignore[override]
        codes = _nearest_codes(wg, levels)
        wq = torch.gather(levels, -1, _as_index(codes))
        inside = (wg >= lo.unsqueeze(-1)) & (wg <= hi.unsqueeze(-1))
        ctx.save_for_backward(codes, inside)
        ctx.wg_dtype, ctx.levels_shape = wg.dtype, levels.shape
        ctx.mark_non_differentiable(codes)
        ctx.set_materialize_grads(False)  # no zero gradient tensor for the codes output
        return wq, codes

    @staticmethod
    def backward(ctx, g, _g_codes):  # type: ignore[override]
        if g is None:
            return None, None, None, None
        codes, inside = ctx.saved_tensors
        grad_w = grad_levels = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.where(inside, g, 0.0).to(ctx.wg_dtype)
        if ctx.needs_input_grad[1]:
            grad_levels = torch.zeros(ctx.levels_shape, dtype=g.dtype, device=g.device).scatter_add_(-1, _as_index(codes), g)
        return grad_w, grad_levels, None, None


def _level_quantize(
    wg: torch.Tensor, levels: torch.Tensor, lo: torch.Tensor | None, hi: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    lo_ = (levels[..., 0] if lo is None else lo).detach().to(wg.dtype)
    hi_ = (levels[..., -1] if hi is None else hi).detach().to(wg.dtype)
    return _LevelQuantize.apply(wg, levels, lo_, hi_)


def quantize_to_levels(
    wg: torch.Tensor, levels: torch.Tensor, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-level fake quantization with LDP's gradients.

    Args:
        wg: ``[out, n_groups, gs]`` weights.
        levels: ``[out, n_groups, L]`` ordered levels (may carry gradients).
        lo, hi: ``[out, n_groups]`` clipping range for the straight-through mask (default: first / last level).
    Returns:
        ``(wq, codes)``: ``wq = levels[code]`` (``[out, n_groups, gs]``, dtype of ``levels``) with ``d wq / d w = 1``
        inside ``[lo, hi]`` and 0 outside, ``d wq / d levels_k = 1`` for the elements assigned to level ``k``;
        int64 ``codes``.
    """
    wq, codes = _level_quantize(wg, levels, lo, hi)
    return wq, _as_index(codes)


def lloyd_fractions(
    u: torch.Tensor, L: int, weights: torch.Tensor | None = None, iters: int = 50
) -> torch.Tensor:
    """Weighted 1-D Lloyd-Max / k-means levels in ``[0, 1]`` with the end levels pinned at 0 and 1.

    Args:
        u: ``[S, M]`` values in ``[0, 1]`` (S independent sets).
        L: number of levels (>= 2).
        weights: ``[S, M]`` non-negative sample weights (default 1).
        iters: Lloyd iterations (assignment to the nearest level, interior levels -> weighted cell means; an
            empty cell keeps its level).
    Returns:
        ``[S, L]`` ordered levels, ``[:, 0] = 0``, ``[:, -1] = 1``.
    """
    S = u.shape[0]
    lv = torch.linspace(0, 1, L, dtype=u.dtype, device=u.device).expand(S, L).clone()
    wt = torch.ones_like(u) if weights is None else weights.to(u.dtype)
    for _ in range(iters):
        mid = ((lv[:, 1:] + lv[:, :-1]) * 0.5).contiguous()
        codes = torch.searchsorted(mid, u.contiguous())
        sums = torch.zeros_like(lv).scatter_add_(1, codes, u * wt)
        cnt = torch.zeros_like(lv).scatter_add_(1, codes, wt)
        new = torch.where(cnt > 0, sums / cnt.clamp_min(1e-30), lv)
        new[:, 0], new[:, -1] = 0.0, 1.0
        new = torch.sort(new, dim=-1).values
        if torch.equal(new, lv):
            break
        lv = new
    return lv


def fractions_to_theta(c: torch.Tensor, min_gap: float = 1e-6) -> torch.Tensor:
    """Inverse of :func:`ldp_fractions`: ``theta = log(gaps)`` with gaps floored at ``min_gap``. ``[..., L] -> [..., L-1]``."""
    gaps = (c[..., 1:] - c[..., :-1]).clamp_min(min_gap)
    return torch.log(gaps / gaps.sum(-1, keepdim=True))


# --------------------------------------------------------------------------------------------------
# clip-ratio search (QuaRot's --w_clip, on the weight error)
# --------------------------------------------------------------------------------------------------


CLIP_SEARCHES = ("none", "mse")
MSE_CLIP_NORM = 2.4  # QuaRot's / GPTQ's error norm in the weight clip search


def mse_clip_grid() -> torch.Tensor:
    """The ratios QuaRot's ``--w_clip`` search tries: ``1.00, 0.99, ..., 0.20`` (grid 100, max shrink 0.8), float64."""
    return torch.arange(100, 19, -1, dtype=torch.float64) / 100


@torch.no_grad()
def mse_clip_range(
    wg: torch.Tensor, bits: int, round_zero: bool = False, grid: Sequence[float] | torch.Tensor | None = None,
    norm: float = MSE_CLIP_NORM,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weight clip search of QuaRot (``--w_clip``) / GPTQ (``mse=True``), per group and output row.

    For each group (last dim of ``wg``) the shrink ratio ``r`` of the min-max range that minimises
    ``Σ |Q_r(w) - w|^norm`` (``Q_r``: uniform asymmetric ``bits``-bit grid on ``[r·min, r·max]``) is picked from
    ``grid`` (default :func:`mse_clip_grid`); ties keep the larger ratio (the search starts at 1.0).

    Args:
        wg: ``[..., gs]`` weights (one group per leading index; e.g. ``[out, n_groups, gs]``).
        bits, round_zero: the uniform quantizer.
        grid: candidate ratios in ``(0, 1]``.
        norm: error exponent, > 0 (2.4 in QuaRot and GPTQ; 2 gives the MSE).
    Returns:
        ``(lo, hi, ratio)``, each ``[...]`` in the dtype of ``wg``. A 16-bit ``wg`` is searched in float32 (its error
        sums would otherwise round away the differences between ratios).
    """
    check_weight_bits(bits)
    if not norm > 0:
        raise ValueError(f"clip search error exponent norm must be > 0, got {norm}")
    grid_t = mse_clip_grid() if grid is None else torch.as_tensor(grid, dtype=torch.float64).flatten()
    if len(grid_t) == 0 or bool(((grid_t <= 0) | (grid_t > 1)).any()):
        raise ValueError("clip search grid ratios must be in (0, 1] and non-empty")
    if wg.dtype in (torch.float16, torch.bfloat16):
        return tuple(t.to(wg.dtype) for t in mse_clip_range(wg.detach().float(), bits, round_zero, grid_t, norm))
    wd = wg.detach()
    lo0, hi0 = wd.amin(-1), wd.amax(-1)
    best = torch.full_like(lo0, float("inf"))
    best_r = torch.ones_like(lo0)
    qmax = 2 ** bits - 1
    buf = torch.empty_like(wd)
    for r in grid_t.tolist():
        # quantize_uniform(wd, r*lo0, r*hi0) with the same floating-point operations (bit for bit), without the
        # autograd function, the integer codes and the temporaries: this loop is the cost of the search
        lo, hi = r * lo0, r * hi0
        s = ((hi - lo) / qmax).clamp_min(_EPS).unsqueeze(-1)
        lo_ = lo.unsqueeze(-1)
        if round_zero:
            z = torch.round(-lo_ / s)
            torch.div(wd, s, out=buf).add_(z).clamp_(0, qmax).round_().sub_(z).mul_(s)
        else:
            torch.sub(wd, lo_, out=buf).div_(s).clamp_(0, qmax).round_().mul_(s).add_(lo_)
        # |e|^norm as exp(norm * log|e|) (log 0 = -inf gives 0): 5x faster than pow_ on CPU, the search's main cost
        err = buf.sub_(wd).abs_().log_().mul_(norm).exp_().sum(-1)
        better = err < best
        best = torch.where(better, err, best)
        best_r = torch.where(better, torch.full_like(best_r, r), best_r)
    return best_r * lo0, best_r * hi0, best_r


# --------------------------------------------------------------------------------------------------
# config + module
# --------------------------------------------------------------------------------------------------


@dataclass
class WeightQuantConfig(JsonConfig):
    """Settings of a :class:`WeightQuantizer` (JSON round-trip with :meth:`to_dict` / :meth:`from_dict`).

    Attributes:
        bits: 1..8.
        group_size: input elements per group (must divide the layer's ``in``), -1 = one group per output row.
        method: ``"rtn"`` (uniform grid) or ``"ldp"`` (learnable direct partitioning). ``"lwc"`` is accepted as
            a spelling of ``method="rtn", lwc=True`` (uniform grid with learnable clipping) and stored in that form,
            so one setting has one dict (and one cache key).
        lwc: learnable clipping (OmniQuant LWC). ``ldp`` + ``lwc`` is RCP's quantizer; ``rtn`` + ``lwc`` the
            "uniform" ablation; ``ldp`` without ``lwc`` the "no clip" ablation.
        lwc_init: initial value of the LWC logits ``gamma`` and ``beta`` (4.0: ratio 0.982).
        clip_ratio: fixed clip ratio of the min-max range when LWC is off.
        clip_search: ``"none"`` or ``"mse"``: without LWC, each group's range is ``r·[min, max]`` with ``r`` from
            :func:`mse_clip_range` (QuaRot's ``--w_clip`` search, per output row and group; GPTQ searches it again
            on the updated weights when a group starts). Uniform grid (``method="rtn"``) only.
        ldp_granularity: ``"group"`` (theta per group) or ``"row"`` (theta shared by a row's groups).
        ldp_init: ``"uniform"`` (theta = 0) or ``"lloyd"`` (pinned-end Lloyd-Max fit in :meth:`WeightQuantizer.init_from`).
        round_zero: integer zero point for the uniform grid (GPTQ/QuaRot style) instead of the exact minimum.
        lloyd_iters: Lloyd iterations for ``ldp_init="lloyd"``.
        clip_init: ``"const"`` (LWC logits = ``lwc_init``, the default) or ``"mse"`` (per-group ratio from
            :func:`mse_clip_range`, capped at ``sigmoid(lwc_init)``); needs ``lwc=True``. With ``ldp_init="lloyd"`` the
            Lloyd-Max levels are then fitted inside the searched range.
        range_mode: ``"relative"`` (LWC: the range is ``sigmoid(logit) * min/max`` of the current latent weight, the
            default) or ``"static"`` (``lo``/``hi`` set once by :meth:`WeightQuantizer.init_from` or
            :meth:`~WeightQuantizer.init_from_levels`: learnable parameters with ``lwc=True``; without LWC fixed
            buffers at the min-max (``clip_ratio``) range of the start, the range a GPTQ start of a "w/o Clip" row
            keeps).
        range_param: what a learnable static range learns (``range_mode="static"`` with ``lwc=True`` only):
            ``"absolute"`` (``lo``/``hi`` in weight units) or ``"log"`` (scale-free log-multipliers of the start's range
            around its centre; see the module docstring); either trains at ``QATConfig.lr_range`` when that is set,
            else at ``lr_quant``.
    """

    bits: int = 2
    group_size: int = PAPER_GROUP
    method: str = "ldp"
    lwc: bool = True
    lwc_init: float = 4.0
    clip_ratio: float = 1.0
    clip_search: str = "none"
    ldp_granularity: str = "group"
    ldp_init: str = "uniform"
    round_zero: bool = False
    lloyd_iters: int = 50
    clip_init: str = "const"
    range_mode: str = "relative"
    range_param: str = "absolute"

    def __post_init__(self) -> None:
        if self.method == "lwc":  # the one stored spelling of "uniform grid + learnable clipping"
            self.method, self.lwc = "rtn", True
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` on an invalid setting (a group that does not divide a layer is checked per layer,
        by :func:`resolve_group_size`)."""
        check_weight_bits(self.bits)
        if self.group_size != -1 and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size <= 0):
            raise ValueError(f"group_size must be a positive integer or -1 (per output row), got {self.group_size!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.ldp_granularity not in LDP_GRANULARITIES:
            raise ValueError(f"ldp_granularity must be one of {LDP_GRANULARITIES}, got {self.ldp_granularity!r}")
        if self.ldp_init not in LDP_INITS:
            raise ValueError(f"ldp_init must be one of {LDP_INITS}, got {self.ldp_init!r}")
        if not 0 < self.clip_ratio <= 1:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")
        if self.clip_search not in CLIP_SEARCHES:
            raise ValueError(f"clip_search must be one of {CLIP_SEARCHES}, got {self.clip_search!r}")
        if self.clip_search != "none" and (self.method != "rtn" or self.lwc):
            raise ValueError("clip_search applies to the fixed uniform grid (method='rtn', lwc=False); LWC learns its "
                             "clip and LDP sets its range from LWC")
        if not math.isfinite(self.lwc_init):
            raise ValueError(f"lwc_init must be finite, got {self.lwc_init}")
        if self.lloyd_iters < 1:
            raise ValueError(f"lloyd_iters must be >= 1, got {self.lloyd_iters}")
        if self.clip_init not in CLIP_INITS:
            raise ValueError(f"clip_init must be one of {CLIP_INITS}, got {self.clip_init!r}")
        if self.range_mode not in RANGE_MODES:
            raise ValueError(f"range_mode must be one of {RANGE_MODES}, got {self.range_mode!r}")
        if self.range_param not in RANGE_PARAMS:
            raise ValueError(f"range_param must be one of {RANGE_PARAMS}, got {self.range_param!r}")
        if self.range_param != "absolute" and (self.range_mode != "static" or not self.lwc):
            raise ValueError(f"range_param={self.range_param!r} parametrises a learnable static range: it needs "
                             "range_mode='static' and lwc=True")
        if self.clip_init != "const" and not self.lwc:
            raise ValueError(f"clip_init={self.clip_init!r} initialises a learnable clip: it needs lwc=True (without "
                             "LWC the range is min-max or clip_ratio)")

    @property
    def learn_clip(self) -> bool:
        """Whether LWC parameters are used (``lwc=True``; ``method="lwc"`` is stored as ``rtn`` + ``lwc``)."""
        return self.lwc

    @property
    def levels_count(self) -> int:
        return 2 ** self.bits




class WeightQuantizer(nn.Module):
    """Fake-quantizer of one ``[out, in]`` weight: holds only the quantizer parameters (LWC ``gamma``/``beta``,
    LDP ``theta``); the latent weight lives outside (e.g. in :class:`~rcp_lib.quant.linear.QuantLinear`).

    Parameters (float32, created according to the config):
        gamma, beta: ``[out, n_groups]`` LWC logits (if ``config.learn_clip`` and ``range_mode="relative"``).
        lo, hi: ``[out, n_groups]`` the range itself (``range_mode="static"``; set by :meth:`init_from`): parameters
            with LWC, buffers (fixed) without; with ``range_param="log"`` buffers holding the start's range.
        log_lo, log_hi: ``[out, n_groups]`` the log-multipliers of the start's range (``range_param="log"``).
        theta: ``[out, n_groups, L-1]`` (``"group"``) or ``[out, 1, L-1]`` (``"row"``) LDP logits (if method ``"ldp"``).
    """

    def __init__(self, shape: Sequence[int] | torch.Size, config: WeightQuantConfig | None = None, name: str = "weight"):
        super().__init__()
        cfg = config or WeightQuantConfig()
        cfg.validate()
        if len(shape) != 2:
            raise ValueError(f"WeightQuantizer needs a 2-D shape [out, in], got {tuple(shape)} for {name}")
        self.config = cfg
        self.name = name
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        self.group_size = resolve_group_size(self.in_features, cfg.group_size, f"{name} {tuple(shape)}")
        self.n_groups = self.in_features // self.group_size
        L = cfg.levels_count
        self.gamma = self.beta = None
        if cfg.range_mode == "static":
            shape = (self.out_features, self.n_groups)
            if cfg.learn_clip and cfg.range_param == "absolute":
                self.lo, self.hi = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(shape))
            else:  # a fixed range (no clip to learn), or the start's range that log_lo / log_hi stretch
                self.register_buffer("lo", torch.zeros(shape))
                self.register_buffer("hi", torch.zeros(shape))
        else:
            self.lo = self.hi = None
        self.log_lo = self.log_hi = None
        if cfg.range_param == "log":
            shape = (self.out_features, self.n_groups)
            self.log_lo, self.log_hi = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(shape))
        if cfg.learn_clip and cfg.range_mode != "static":
            self.gamma = nn.Parameter(torch.full((self.out_features, self.n_groups), float(cfg.lwc_init)))
            self.beta = nn.Parameter(torch.full((self.out_features, self.n_groups), float(cfg.lwc_init)))
        if cfg.method == "ldp":
            ng = self.n_groups if cfg.ldp_granularity == "group" else 1
            self.theta = nn.Parameter(torch.zeros(self.out_features, ng, L - 1))
        else:
            self.theta = None
        self.check_finite = True

    # -- pieces ---------------------------------------------------------------------------------
    def _grouped(self, weight: torch.Tensor) -> torch.Tensor:
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{self.name}: expected weight of shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}")
        if self.check_finite:
            check_finite(weight, self.name)
        params = [p for p in (self.gamma, self.lo, self.log_lo, self.theta) if p is not None]
        cdt = _compute_dtype(weight, *params)
        return weight.to(cdt).reshape(self.out_features, self.n_groups, self.group_size)

    def clip_range(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group ``(lo, hi)``, each ``[out, n_groups]`` (LWC if enabled, else ``clip_ratio`` * min-max)."""
        return self._range(self._grouped(weight))

    def _range(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.log_lo is not None:  # static, scale-free: the start's range stretched around its centre
            lo0, hi0 = self.lo.to(wg.dtype), self.hi.to(wg.dtype)
            c = 0.5 * (lo0 + hi0)  # lo0 + (lo0 - c) expm1(s) = c - (c - lo0) e^s, exactly lo0 at s = 0
            return (lo0 + (lo0 - c) * torch.expm1(self.log_lo.to(wg.dtype)),
                    hi0 + (hi0 - c) * torch.expm1(self.log_hi.to(wg.dtype)))
        if self.lo is not None:  # static: the parameters are the range (hi raised to lo if training crossed them)
            lo = self.lo.to(wg.dtype)
            return lo, torch.maximum(self.hi.to(wg.dtype), lo)
        return self._weight_range(wg)

    def _weight_range(self, wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The range computed from the grouped weight (LWC, the MSE search or ``clip_ratio`` * min-max)."""
        if self.gamma is not None:
            return lwc_range(wg, self.gamma, self.beta)
        if self.config.clip_search == "mse":
            lo, hi, _ = mse_clip_range(wg, self.config.bits, self.config.round_zero)
            return lo, hi
        return minmax_range(wg, self.config.clip_ratio)

    def _levels(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        if self.theta is not None:
            return ldp_levels(self.theta, lo, hi)
        return uniform_levels(lo, hi, self.config.bits, self.config.round_zero)

    def _quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        wg = self._grouped(weight)
        lo, hi = self._range(wg)
        if self.theta is not None:
            levels = ldp_levels(self.theta, lo, hi)
            wq, codes = _level_quantize(wg, levels, lo, hi)  # uint8 codes (forward discards them)
        else:
            wq, codes = quantize_uniform(wg, lo, hi, self.config.bits, self.config.round_zero)
            levels = uniform_levels(lo.detach(), hi.detach(), self.config.bits, self.config.round_zero)
        return wq, codes, levels

    # -- public API -----------------------------------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight ``[out, in]`` (dtype of ``weight``), with the gradients described in the module doc."""
        wq, _, _ = self._quantize(weight)
        return wq.reshape(weight.shape).to(weight.dtype)

    @torch.no_grad()
    def levels(self, weight: torch.Tensor) -> torch.Tensor:
        """Current quantization levels of every group, ``[out, n_groups, L]`` (compute dtype, no grad)."""
        wg = self._grouped(weight)
        lo, hi = self._range(wg)
        return self._levels(lo, hi)

    @torch.no_grad()
    def export(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and level table of the quantized weight.

        Returns:
            ``codes`` uint8 ``[out, in]`` in ``0..L-1`` and ``levels`` float32 ``[out, n_groups, L]`` such that
            ``levels.gather(-1, codes.view(out, n_groups, gs).long()).view(out, in)`` equals ``forward(weight)``
            (bit-exact for float32 weights).
        """
        _, codes, levels = self._quantize(weight)
        return codes.reshape(weight.shape).to(torch.uint8), levels.to(torch.float32).contiguous()

    def quant_parameters(self) -> Iterator[nn.Parameter]:
        """The quantizer's learnable parameters (theta, gamma, beta, the static lo, hi or their log-multipliers) - not
        the latent weight."""
        for p in (self.theta, self.gamma, self.beta, self.lo, self.hi, self.log_lo, self.log_hi):
            if isinstance(p, nn.Parameter):
                yield p

    def level_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters of the level positions inside the range (LDP's ``theta``), else nothing; the other
        :meth:`quant_parameters` are the clip."""
        if isinstance(self.theta, nn.Parameter):
            yield self.theta

    def range_parameters(self) -> Iterator[nn.Parameter]:
        """The learnable static range: ``lo, hi`` (``range_param="absolute"``: weight units) or ``log_lo, log_hi``
        (``"log"``: log-multipliers, the same relative step in every layer), trained at
        :attr:`rcp_lib.qat.QATConfig.lr_range` when that is set (else at ``lr_quant``); else nothing."""
        for p in (self.lo, self.hi, self.log_lo, self.log_hi):
            if isinstance(p, nn.Parameter):
                yield p

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor) -> "WeightQuantizer":
        """Initialise the quantizer parameters from a weight ``[out, in]``.

        The clip: LWC logits = ``lwc_init`` (``clip_init="const"``) or the logit of the per-group ratio of
        :func:`mse_clip_range` capped at ``sigmoid(lwc_init)`` (``"mse"``); in ``range_mode="static"`` the parameters
        ``lo, hi`` are set to that ratio times the group min / max (without LWC: the fixed range of
        :meth:`clip_range`'s relative form, ``clip_ratio`` * min-max). LDP ``theta``: 0 (``ldp_init="uniform"``) or the
        pinned-end Lloyd-Max levels of the weights inside that range (``"lloyd"``). Returns ``self``.
        """
        wg = self._grouped(weight)
        if self.lo is not None and not self.config.learn_clip:
            lo, hi = self._weight_range(wg.detach())
            self.lo.copy_(lo.to(self.lo.dtype))
            self.hi.copy_(hi.to(self.hi.dtype))
        elif self.gamma is not None or self.lo is not None:
            cap = 1.0 / (1.0 + math.exp(-float(self.config.lwc_init)))
            if self.config.clip_init == "mse":
                # float32: the search is most of the start's cost, float64 halves its speed for ratios on a 0.01 grid
                _, _, r = mse_clip_range(wg.detach().to(torch.float32), self.config.bits, self.config.round_zero)
                r = r.to(torch.float64).clamp(max=cap)
            else:
                r = torch.full(wg.shape[:2], cap, dtype=torch.float64, device=wg.device)
            if self.gamma is not None:
                logit = float(self.config.lwc_init) if self.config.clip_init == "const" else torch.logit(r)
                for p in (self.gamma, self.beta):
                    if isinstance(logit, float):
                        p.fill_(logit)
                    else:
                        p.copy_(logit.to(p.dtype))
            else:
                wd = wg.detach().to(torch.float64)
                self.lo.copy_((r * wd.amin(-1)).to(self.lo.dtype))
                self.hi.copy_((r * wd.amax(-1)).to(self.hi.dtype))
                for p in (self.log_lo, self.log_hi):
                    if p is not None:
                        p.zero_()
        if self.theta is None:
            return self
        if self.config.ldp_init == "uniform":
            self.theta.zero_()
            return self
        wg = wg.detach().to(torch.float32)  # Lloyd-Max in float32 (its levels are stored as float32 logits anyway)
        lo, hi = self._range(wg)
        lo, hi = lo.to(torch.float32), hi.to(torch.float32)
        rng = (hi - lo).clamp_min(_EPS).unsqueeze(-1)
        u = ((wg - lo.unsqueeze(-1)) / rng).clamp(0, 1)  # [out, ng, gs]
        L = self.config.levels_count
        if self.config.ldp_granularity == "group":
            c = lloyd_fractions(u.reshape(-1, self.group_size), L, iters=self.config.lloyd_iters)
            c = c.reshape(self.out_features, self.n_groups, L)
        else:
            wt = (rng ** 2).expand_as(u).reshape(self.out_features, -1)
            c = lloyd_fractions(u.reshape(self.out_features, -1), L, weights=wt, iters=self.config.lloyd_iters)
            c = c.unsqueeze(1)
        self.theta.copy_(fractions_to_theta(c).to(self.theta.dtype))
        return self

    @torch.no_grad()
    def init_from_levels(self, levels: torch.Tensor) -> "WeightQuantizer":
        """Set a static-range quantizer to a given level table ``[out, n_groups, L]`` (e.g. GPTQ's on this quantizer's
        own grid): ``lo, hi`` = the first / last level and, for LDP, ``theta`` from the normalised level positions
        (gaps floored as in :func:`fractions_to_theta`). A weight equal to one of the levels then quantizes to itself,
        so "GPTQ, then QAT" starts exactly at the GPTQ model. Needs ``range_mode="static"`` (and ``"group"``
        granularity for LDP); a uniform grid needs uniformly spaced levels. Returns ``self``."""
        if self.lo is None:
            raise ValueError(f"{self.name}: init_from_levels needs range_mode='static' (an LWC range is recomputed "
                             "from the latent weight at every step and would not hold the given grid)")
        L = self.config.levels_count
        if tuple(levels.shape) != (self.out_features, self.n_groups, L):
            raise ValueError(f"{self.name}: levels must be {[self.out_features, self.n_groups, L]}, got {list(levels.shape)}")
        lv = levels.to(torch.float64)
        self.lo.copy_(lv[..., 0].to(self.lo.dtype))
        self.hi.copy_(lv[..., -1].to(self.hi.dtype))
        for p in (self.log_lo, self.log_hi):
            if p is not None:
                p.zero_()
        if self.theta is not None:
            if self.config.ldp_granularity != "group":
                raise ValueError(f"{self.name}: init_from_levels sets one level table per group: use ldp_granularity='group'")
            c = (lv - lv[..., :1]) / (lv[..., -1:] - lv[..., :1]).clamp_min(_EPS)
            self.theta.copy_(fractions_to_theta(c).to(self.theta.dtype))
        return self

    @torch.no_grad()
    def clip_ratio(self, weight: torch.Tensor) -> torch.Tensor:
        """Per-group clip ratio ``(hi - lo) / (max(w_g) - min(w_g))``, float64 ``[out, n_groups]`` (1 = min-max; a
        constant group counts as 1). The same definition for LWC, static and fixed ranges."""
        return self.clip_ratio_and_span(weight)[0]

    @torch.no_grad()
    def clip_ratio_and_span(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`clip_ratio` and the range's own width ``hi - lo``, both float64 ``[out, n_groups]``, from one
        evaluation of the range (an MSE clip search runs once)."""
        wg = self._grouped(weight).to(torch.float64)
        lo, hi = self._range(wg)
        width = hi.to(torch.float64) - lo.to(torch.float64)
        span = wg.amax(-1) - wg.amin(-1)
        ratio = width / span.clamp_min(_EPS)
        return torch.where(span > _EPS, ratio, torch.ones_like(ratio)), width

    @torch.no_grad()
    def level_fractions(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised level positions ``(q_k - lo) / (hi - lo)``, float64 ``[out, n_groups or 1, L]``: LDP's
        :func:`ldp_fractions` of ``theta``, or the evenly spaced grid of a uniform quantizer (``weight`` unused)."""
        L = self.config.levels_count
        if self.theta is not None:
            return ldp_fractions(self.theta.detach().to(torch.float64))
        return torch.linspace(0, 1, L, dtype=torch.float64).expand(self.out_features, 1, L).clone()

    def extra_repr(self) -> str:
        c = self.config
        s = f"shape=({self.out_features}, {self.in_features}), bits={c.bits}, group_size={c.group_size}, method={c.method}, lwc={c.learn_clip}"
        if c.method == "ldp":
            s += f", ldp_granularity={c.ldp_granularity}, ldp_init={c.ldp_init}"
        elif not c.learn_clip and c.clip_ratio != 1.0:
            s += f", clip_ratio={c.clip_ratio}"
        if c.clip_search != "none":
            s += f", clip_search={c.clip_search}"
        if c.clip_init != "const":
            s += f", clip_init={c.clip_init}"
        if c.range_mode != "relative":
            s += f", range_mode={c.range_mode}"
        if c.range_param != "absolute":
            s += f", range_param={c.range_param}"
        return s


class FrozenLevelsQuantizer(nn.Module):
    """The frozen form of a weight quantizer (:meth:`rcp_lib.quant.linear.QuantLinear.freeze`, GPTQ, the PTQ cache,
    :func:`rcp_lib.deploy.load_quantized`): fixed codes and level table, no parameters.

    Buffers:
        codes: uint8 ``[out, in]``, values ``0 .. L-1``.
        level_table: float32 ``[out, n_groups, L]``.

    ``forward(weight) = level_table.gather(codes)`` as ``[out, in]`` in ``weight.dtype`` (the weight's values are not
    read): bit-identical to the :class:`WeightQuantizer` it was exported from (see :meth:`WeightQuantizer.export`).
    """

    def __init__(self, codes: torch.Tensor, levels: torch.Tensor, config: WeightQuantConfig | None = None):
        super().__init__()
        if codes.dim() != 2 or levels.dim() != 3 or levels.shape[0] != codes.shape[0] or codes.shape[1] % levels.shape[1]:
            raise ValueError(f"codes [out, in] and levels [out, n_groups, L] do not match: {tuple(codes.shape)}, "
                             f"{tuple(levels.shape)}")
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("level_table", levels.float())
        self.config = config
        self.group_size = codes.shape[1] // levels.shape[1]

    @property
    def bits(self) -> int:
        """Code width: ``ceil(log2(L))``."""
        return max(1, math.ceil(math.log2(self.level_table.shape[-1])))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_hat [out, in]`` in ``weight.dtype``."""
        out, n = self.codes.shape
        idx = self.codes.long().view(out, self.level_table.shape[1], self.group_size)
        w = torch.gather(self.level_table, 2, idx).view(out, n)
        return w.to(weight.dtype)

    def levels(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The level table, float32 ``[out, n_groups, L]``."""
        return self.level_table

    def export(self, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes uint8 [out, in], levels float32 [out, n_groups, L])`` (copies)."""
        return self.codes.clone(), self.level_table.clone()

    def quant_parameters(self) -> Iterator[nn.Parameter]:
        """None: a frozen quantizer does not train."""
        return iter(())

    def extra_repr(self) -> str:
        out, n = self.codes.shape
        return f"frozen, shape=({out}, {n}), levels={self.level_table.shape[-1]}, group_size={self.group_size}"
