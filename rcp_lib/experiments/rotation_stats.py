"""Rotation-impact analysis: weight statistics and 2-bit quantization error before/after rotation.

The analysis behind RCP's motivation (a rotation makes weights bell-shaped, so a uniform 2-bit grid fits them
badly and a non-uniform one is needed) and GSR's claim (sequency-ordered small Walsh blocks lower the error).
For every projection of every decoder layer, with its preceding RMSNorm weight folded in as the fused model has
it, we compare the weight as it is with the weight as seen after the residual rotation R1 (input side of
q/k/v/gate/up: ``W R1``; output side of o/down: ``R1ᵀ W``; plus R4, a Hadamard on the down_proj input, when any
rotation is applied). R1 comes from :func:`rcp_lib.rotation.fuse.r1_matrix`, the one builder the fused models use.

Statistics per weight matrix:

* kurtosis (Pearson; 3 for a Gaussian, 1.8 for a uniform distribution) and max|w|/std,
* normalised MSE ``||W - Q(W)||² / ||W||²`` of 2-bit per-group quantization with four quantizers that separate
  what the *range* does from what the *shape* of the levels does:

  ``err_uniform``
      uniform asymmetric min-max grid (RTN),
  ``err_uniform_clip``
      uniform asymmetric grid on the MSE-optimal clipped range ``[r·min, r·max]`` per group (grid search of
      ``r`` over :data:`CLIP_RATIOS`; OmniQuant's LWC range ``lo = σ(β)·min, hi = σ(γ)·max`` with ``β = γ``),
  ``err_nonuniform_pinned``
      non-uniform levels with the two end levels pinned at ``lo = r·min`` and ``hi = r·max`` (``0.30 <= r <= 1``)
      and the interior levels free (Lloyd iterations for the interior levels; values outside the range go to the
      ends): what LDP's learnable levels inside an LWC range with ``β = γ`` can represent. (With LWC's two ends
      independent, any level set whose lowest level is negative and highest positive fits, so the pinned set
      would contain Lloyd-Max's solution for nearly every group; the shared ``r`` is the stricter reading.)
  ``err_nonuniform``
      the unconstrained 4-level grid per group (Lloyd-Max = 1-D k-means).

  ``err_uniform / err_uniform_clip`` is the gain of the range, ``err_uniform_clip / err_nonuniform_pinned`` the
  gain of non-uniform levels beyond the range (:func:`summarize`).

Per group the four quantizers are nested, and each search also starts from the previous one's solution, so the
four errors are ordered by construction. The searches are heuristic: ``err_uniform_clip`` is a coarse-to-fine
grid search over :data:`CLIP_RATIOS` (exact whenever the error is unimodal in ``r``); the two non-uniform errors
come from multi-start Lloyd iterations, which stop in local optima, so they are upper bounds of the true optima
(the tests measure the gap against exact dynamic programming on Gaussian groups: about one percent at 64 values
per group, more for small groups and heavy tails).

All quantizers of a group assign each value to its nearest level; they are computed from the sorted group and its
prefix sums (a quantizer with sorted levels cuts the sorted group into contiguous cells at the midpoints), so a
grid search over ``r`` costs a few binary searches per group and ratio instead of a pass over the weights.
"""

from __future__ import annotations

import torch

from .. import models as M
from ..memory import PAPER_GROUP
from ..quant.quantizers import group_view, minmax_range, quantize_uniform
from ..rotation.fuse import BLOCK_KINDS, r1_matrix
from ..rotation.hadamard import hadamard

#: shrink ratios ``r`` of the per-group range ``[r·min, r·max]`` searched by the clipped quantizers
CLIP_RATIOS: tuple[float, ...] = tuple(k / 100 for k in range(30, 101))
#: error columns of :func:`layer_statistics`, from the most constrained quantizer to the least
ERROR_COLUMNS = ("err_uniform", "err_uniform_clip", "err_nonuniform_pinned", "err_nonuniform")
_CHUNK = 1 << 14  # groups per chunk of the vectorised grid search (bounds memory: chunk · ratios · levels)


def kurtosis(w: torch.Tensor) -> float:
    """Pearson kurtosis ``E[(w-μ)^4] / σ^4`` of all elements (normal = 3)."""
    x = w.detach().double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def max_over_std(w: torch.Tensor) -> float:
    x = w.detach().double().flatten()
    return float(x.abs().max() / x.std())


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """The groups of ``w [out, in]`` (or ``[in]``) as rows ``[out · in/group_size, group_size]`` in float64
    (:func:`~rcp_lib.quant.quantizers.group_view`; ``group_size`` -1: one group per row)."""
    w = w.detach().double()
    wg = group_view(w[None, :] if w.dim() == 1 else w, group_size)
    return wg.reshape(-1, wg.shape[-1])


def uniform_quant_error(w: torch.Tensor, bits: int = 2, group_size: int = PAPER_GROUP) -> float:
    """Normalised MSE of asymmetric min-max RTN per group of ``group_size`` inputs of each row (-1: per row): the
    library's quantizer (:func:`~rcp_lib.quant.quantizers.quantize_uniform` on the min-max range)."""
    wg = _groups(w, group_size)
    q, _ = quantize_uniform(wg, *minmax_range(wg), bits)
    return float(((wg - q) ** 2).sum() / (wg**2).sum())


# ---------------------------------------------------------------------------------------------------
# nearest-level quantizers on sorted groups
# ---------------------------------------------------------------------------------------------------


class _Sorted:
    """Sorted groups ``xs [G, g]`` with the prefix sums of ``x`` ``[G, g+1]`` and the totals of ``x²`` ``[G]``.

    Levels are passed as one tensor ``[G, K, L]`` (``K`` candidate quantizers per group, ``L`` sorted levels).
    With ``t_k`` the midpoint of levels ``k, k+1``, ``b_k = #{x <= t_k}`` and ``C_k = Σ_{x <= t_k} x`` (one binary
    search and one prefix-sum lookup), the error telescopes to
    ``SSE = Σ (x - q_{L-1})² + 2 Σ_k (q_k - q_{k+1}) (b_k t_k - C_k)``.
    """

    def __init__(self, wg: torch.Tensor):
        self.xs = wg.double().sort(1).values.contiguous()
        self.p1 = torch.cat([self.xs.new_zeros(self.xs.shape[0], 1), self.xs.cumsum(1)], 1)
        self.s2 = (self.xs * self.xs).sum(1)

    def bounds(self, q: torch.Tensor):
        """Midpoints ``t``, counts ``b`` (float) and prefix sums ``C`` at the midpoints, each ``[G, K, L-1]``."""
        G, K, L = q.shape
        t = 0.5 * (q[..., 1:] + q[..., :-1])
        # values equal to a midpoint go to the lower level (as argmin over |x - level| picks the first)
        b = torch.searchsorted(self.xs, t.reshape(G, -1), right=True)
        c = self.p1.gather(1, b).reshape(G, K, L - 1)
        return t, b.reshape(G, K, L - 1), c

    def sse(self, q: torch.Tensor, tbc=None) -> torch.Tensor:
        """Sum of squared errors ``[G, K]`` of nearest-level quantization with sorted levels ``q [G, K, L]``."""
        t, b, c = self.bounds(q) if tbc is None else tbc
        g = self.xs.shape[1]
        top = q[..., -1]
        base = self.s2[:, None] - 2 * top * self.p1[:, -1:] + g * top * top
        return (base + 2 * ((q[..., :-1] - q[..., 1:]) * (b * t - c)).sum(-1)).clamp_min(0)


def _cells(sg: _Sorted, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and sums ``[G, K, L]`` of the cells from the midpoint counts/prefix sums ``[G, K, L-1]``."""
    G, K, _ = b.shape
    z = b.new_zeros(G, K, 1)
    bb = torch.cat([z, b, z + sg.xs.shape[1]], -1)
    cc = torch.cat([c.new_zeros(G, K, 1), c, sg.p1[:, -1:, None].expand(G, K, 1)], -1)
    return bb[..., 1:] - bb[..., :-1], cc[..., 1:] - cc[..., :-1]


def _lloyd(sg: _Sorted, q: torch.Tensor, free: slice, iters: int) -> torch.Tensor:
    """Lloyd iterations on levels ``q [G, K, L]`` updating only ``q[..., free]`` to their cell means (empty cells
    keep their level); ``free`` is ``slice(0, L)`` or the interior ``slice(1, L-1)``. Stops early once no partition
    changes (a fixed point). The levels stay sorted (a cell mean lies between its cell's bounds)."""
    q = q.clone()
    prev = None
    for _ in range(iters):
        _, b, c = sg.bounds(q)
        if prev is not None and torch.equal(b, prev):
            break
        prev = b
        if free.start == 1 and free.stop == q.shape[-1] - 1:  # interior cells only: no outer bounds needed
            n, s1 = b[..., 1:] - b[..., :-1], c[..., 1:] - c[..., :-1]
        else:
            n, s1 = _cells(sg, b, c)
            n, s1 = n[..., free], s1[..., free]
        q[..., free] = torch.where(n > 0, s1 / n.clamp_min(1), q[..., free])
    return q


def _ratios(ratios) -> torch.Tensor:
    r = torch.as_tensor(CLIP_RATIOS if ratios is None else ratios, dtype=torch.float64).flatten()
    if r.numel() == 0 or (r <= 0).any() or (r > 1).any():
        raise ValueError(f"clip ratios must lie in (0, 1], got {r.tolist()}")
    return r.sort().values


def _uniform_levels(xs: torch.Tensor, r: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform levels ``[G, K, 2^bits]`` on ``[r·min, r·max]``; ``r`` is ``[K]`` or ``[G, K]``."""
    r = r if r.dim() == 2 else r[None, :]
    lo, hi = xs[:, :1] * r, xs[:, -1:] * r
    k = torch.arange(2**bits, dtype=xs.dtype) / (2**bits - 1)
    return lo[..., None] + (hi - lo)[..., None] * k


def _chunks(wg: torch.Tensor):
    for i in range(0, wg.shape[0], _CHUNK):
        yield _Sorted(wg[i : i + _CHUNK])


def _grid_min(sg: _Sorted, r: torch.Tensor, err, stride: int):
    """Minimum over the ratio grid ``r [K]`` of ``err(sg, ratios [G, K']) -> [G, K']`` per group and its ratio.

    ``stride`` 1 evaluates every ratio; ``stride`` s > 1 evaluates every s-th ratio (and the last), then all
    ratios within s-1 steps of the best of those (the exact grid minimum whenever the error is unimodal in r)."""
    G, K = sg.xs.shape[0], r.numel()
    if stride <= 1 or K <= 2 * stride:
        e = err(sg, r[None, :].expand(G, K))
        m, i = e.min(1)
        return m, r[i]
    coarse = torch.unique(torch.cat([torch.arange(0, K, stride), torch.tensor([K - 1])]))
    e = err(sg, r[coarse][None, :].expand(G, -1))
    c = coarse[e.argmin(1)]  # [G] index into r
    idx = (c[:, None] + torch.arange(-(stride - 1), stride)[None, :]).clamp(0, K - 1)  # [G, 2s-1]
    e = err(sg, r[idx])
    m, j = e.min(1)
    return m, r[idx.gather(1, j[:, None])[:, 0]]


def _uniform_clip(sg: _Sorted, r: torch.Tensor, bits: int, stride: int):
    return _grid_min(sg, r, lambda s, rr: s.sse(_uniform_levels(s.xs, rr, bits)), stride)


def _pin_levels(xs: torch.Tensor, r: torch.Tensor, interior: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Levels ``[G, K, L]`` with ends ``r·min``, ``r·max`` and interior levels from the uniform grid (``interior``
    None) or from ``interior [G, 1, L-2]`` clamped into the range."""
    q = _uniform_levels(xs, r, bits)
    if interior is not None:
        q[..., 1:-1] = torch.minimum(torch.maximum(interior.expand_as(q[..., 1:-1]), q[..., :1]), q[..., -1:])
    return q


def _pinned(sg: _Sorted, r: torch.Tensor, bits: int, iters: int, stride: int, method: str, r_uniform=None,
            lloyd_max=None):
    """Pinned-end quantizer per group: (SSE ``[G]``, ratio ``[G]``, levels ``[G, L]``)."""
    L = 2**bits
    free = slice(1, L - 1)
    if method == "grid":  # interior Lloyd at every ratio of the grid, from the uniform grid there
        err = lambda s, rr: s.sse(_lloyd(s, _pin_levels(s.xs, rr, None, bits), free, iters))  # noqa: E731
        e, rb = _grid_min(sg, r, err, stride)
        return e, rb, _lloyd(sg, _pin_levels(sg.xs, rb[:, None], None, bits), free, iters)[:, 0]
    if method != "candidates":
        raise ValueError(f"unknown pinned method {method!r}; choose 'candidates' or 'grid'")
    if r_uniform is None:
        r_uniform = _uniform_clip(sg, r, bits, stride)[1]
    if lloyd_max is None:
        lloyd_max = _lloyd_max(sg, bits, iters)
    m, M = sg.xs[:, :1], sg.xs[:, -1:]
    # ratios that put an end on the Lloyd-Max end level (the other end follows), and their mean
    ra = torch.where(m < 0, lloyd_max[:, :, 0] / m.clamp_max(-1e-300), torch.ones_like(m))
    rb = torch.where(M > 0, lloyd_max[:, :, -1] / M.clamp_min(1e-300), torch.ones_like(M))
    cand = torch.cat([r_uniform[:, None], ra, rb, 0.5 * (ra + rb)], 1).clamp(float(r[0]), float(r[-1]))
    # starts: the uniform grid at the best uniform ratio (so never worse than it); the Lloyd-Max interior at the others
    q = torch.cat([_pin_levels(sg.xs, cand[:, :1], None, bits), _pin_levels(sg.xs, cand[:, 1:], lloyd_max[:, :, 1:-1], bits)], 1)
    q = _lloyd(sg, q, free, iters)
    e, i = sg.sse(q).min(1)
    return e, cand.gather(1, i[:, None])[:, 0], q[torch.arange(q.shape[0]), i]


def _lloyd_max(sg: _Sorted, bits: int, iters: int) -> torch.Tensor:
    """Lloyd-Max levels ``[G, 1, L]`` from the quantile start (``torch.quantile``'s linear interpolation)."""
    L, g = 2**bits, sg.xs.shape[1]
    pos = ((torch.arange(L, dtype=torch.float64) + 0.5) / L) * (g - 1)
    i0 = pos.floor().long().clamp(max=g - 1)
    i1 = (i0 + 1).clamp(max=g - 1)
    q = sg.xs[:, i0] + (pos - i0)[None, :].to(sg.xs.dtype) * (sg.xs[:, i1] - sg.xs[:, i0])
    return _lloyd(sg, q[:, None, :], slice(0, L), iters)


def uniform_clip_group_errors(wg: torch.Tensor, bits: int = 2, ratios=None, stride: int = 1
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``wg [G, g]``: the smallest SSE of the uniform grid on ``[r·min, r·max]`` over ``ratios`` and
    the ratio that reaches it (``[G]`` each). ``stride``: see :func:`_grid_min` (1: exhaustive)."""
    r = _ratios(ratios)
    out = [_uniform_clip(sg, r, bits, stride) for sg in _chunks(wg)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def pinned_group_errors(wg: torch.Tensor, bits: int = 2, ratios=None, iters: int = 30, stride: int = 1,
                        method: str = "candidates") -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``wg [G, g]``: the smallest SSE found of non-uniform levels with the ends pinned at ``r·min``
    and ``r·max`` (``r`` within the range of ``ratios``) and free interior levels, and its ``r`` (``[G]`` each).

    Lloyd iterations move only the interior levels (values outside the range go to the ends); Lloyd finds local
    optima, so the start matters. ``method="grid"``: at every ratio of the grid (coarse-to-fine with ``stride``),
    start from the uniform grid; the minimum over the grid. ``method="candidates"`` (cheaper, and better on
    heavy-tailed groups): four ratios - the best uniform one, started from its uniform grid, and the two that put an
    end on the Lloyd-Max end level and their mean, started from the Lloyd-Max interior levels; the best of the
    four. Both are never worse than :func:`uniform_clip_group_errors` (the uniform grid at its best ratio is a
    start)."""
    r = _ratios(ratios)
    out = [_pinned(sg, r, bits, iters, stride, method)[:2] for sg in _chunks(wg)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def lloyd_max_levels(wg: torch.Tensor, bits: int = 2, iters: int = 25) -> torch.Tensor:
    """MSE-optimal ``2^bits`` levels per row of ``wg [G, g]`` (1-D k-means, quantile init). Sorted ``[G, L]``."""
    x = wg.double()
    if x.dim() == 1:
        x = x[None, :]
    return torch.cat([_lloyd_max(sg, bits, iters)[:, 0] for sg in _chunks(x)])


def _normalised(sse: torch.Tensor, wg: torch.Tensor) -> float:
    return float(sse.sum() / (wg.double() ** 2).sum())


def uniform_clip_quant_error(w: torch.Tensor, bits: int = 2, group_size: int = PAPER_GROUP, ratios=None, stride: int = 1) -> float:
    """Normalised MSE of the uniform asymmetric grid with the MSE-optimal clip ratio per group."""
    wg = _groups(w, group_size)
    return _normalised(uniform_clip_group_errors(wg, bits, ratios, stride)[0], wg)


def nonuniform_pinned_quant_error(w: torch.Tensor, bits: int = 2, group_size: int = PAPER_GROUP, ratios=None,
                                  iters: int = 30, stride: int = 1, method: str = "candidates") -> float:
    """Normalised MSE of non-uniform levels with ends pinned inside the LWC range (LDP's representable set)."""
    wg = _groups(w, group_size)
    return _normalised(pinned_group_errors(wg, bits, ratios, iters, stride, method)[0], wg)


def nonuniform_quant_error(w: torch.Tensor, bits: int = 2, group_size: int = PAPER_GROUP, iters: int = 25) -> float:
    """Normalised MSE of the per-group Lloyd-Max ``2^bits``-level quantizer."""
    wg = _groups(w, group_size)
    return _normalised(torch.cat([sg.sse(_lloyd_max(sg, bits, iters))[:, 0] for sg in _chunks(wg)]), wg)


#: search settings of :func:`layer_statistics` (part of the analysis cache key): coarse-to-fine stride of the
#: uniform clip search over :data:`CLIP_RATIOS`, the pinned quantizer's method and iterations, Lloyd-Max iterations
SEARCH = {"stride": 5, "pinned_method": "candidates", "pinned_iters": 6, "lloyd_iters": 12}


def _nested(sg: _Sorted, bits: int, r: torch.Tensor, iters: int, stride: int, pinned_iters: int,
            pinned_method: str) -> dict:
    """The four quantizers of each group of ``sg``: per name (min-max "uniform", "uniform_clip", "pinned",
    "lloyd") its SSE ``[G]`` and levels ``[G, L]``, and the chosen ratios of the clipped two."""
    L = 2**bits
    one = torch.ones(1, dtype=torch.float64)
    q_mm = _uniform_levels(sg.xs, one, bits)
    e_clip, rc = _uniform_clip(sg, r, bits, stride)
    lm = _lloyd_max(sg, bits, iters)
    e_pin, rp, q_pin = _pinned(sg, r, bits, pinned_iters, stride, pinned_method, r_uniform=rc, lloyd_max=lm)
    lm = torch.cat([lm, _lloyd(sg, q_pin[:, None, :], slice(0, L), iters)], 1)  # also start from the pinned levels
    e_lm, i = sg.sse(lm).min(1)
    return {"uniform": (sg.sse(q_mm)[:, 0], q_mm[:, 0]),
            "uniform_clip": (e_clip, _uniform_levels(sg.xs, rc[:, None], bits)[:, 0]),
            "pinned": (e_pin, q_pin), "lloyd": (e_lm, lm[torch.arange(lm.shape[0]), i]),
            "ratio_uniform_clip": rc, "ratio_pinned": rp}


def quant_errors(w: torch.Tensor, bits: int = 2, group_size: int = PAPER_GROUP, ratios=None, iters: int = 25,
                 stride: int = 1, pinned_iters: int = 30, pinned_method: str = "candidates") -> dict:
    """All four normalised errors of ``w`` (:data:`ERROR_COLUMNS`) and the mean chosen clip ratios (one sort of
    each group serves all quantizers).

    Per group the four quantizers are nested (each is a special case of the next), and each search also starts
    from the previous quantizer's solution, so ``err_uniform >= err_uniform_clip >= err_nonuniform_pinned >=
    err_nonuniform`` holds per group by construction (Lloyd-Max here is the better of Lloyd from the quantile start
    and Lloyd from the pinned solution, so it can be lower than :func:`nonuniform_quant_error`)."""
    wg = _groups(w, group_size)
    r = _ratios(ratios)
    parts = [_nested(sg, bits, r, iters, stride, pinned_iters, pinned_method) for sg in _chunks(wg)]
    cat = lambda k, j=None: torch.cat([p[k] if j is None else p[k][j] for p in parts])  # noqa: E731
    return {"err_uniform": _normalised(cat("uniform", 0), wg), "err_uniform_clip": _normalised(cat("uniform_clip", 0), wg),
            "err_nonuniform_pinned": _normalised(cat("pinned", 0), wg), "err_nonuniform": _normalised(cat("lloyd", 0), wg),
            "clip_ratio_uniform": float(cat("ratio_uniform_clip").mean()),
            "clip_ratio_pinned": float(cat("ratio_pinned").mean())}


def group_levels(wg: torch.Tensor, bits: int = 2, ratios=None) -> dict[str, torch.Tensor]:
    """The ``2^bits`` levels ``[G, L]`` of each quantizer for the groups ``wg [G, g]`` (for plots): keys
    "uniform" (min-max), "uniform_clip", "pinned", "lloyd", as in :func:`quant_errors` with :data:`SEARCH`."""
    sg = _Sorted(wg if wg.dim() == 2 else wg[None, :])
    d = _nested(sg, bits, _ratios(ratios), SEARCH["lloyd_iters"], SEARCH["stride"], SEARCH["pinned_iters"],
                SEARCH["pinned_method"])
    return {k: d[k][1] for k in ("uniform", "uniform_clip", "pinned", "lloyd")}


# ---------------------------------------------------------------------------------------------------
# rotated weights of a model
# ---------------------------------------------------------------------------------------------------


def rotated_weight(weight: torch.Tensor, rot_in: torch.Tensor | None = None, rot_out: torch.Tensor | None = None) -> torch.Tensor:
    """``rot_outᵀ @ W @ rot_in`` in float64 on ``weight``'s device (either rotation may be None). ``W`` is ``[out, in]``."""
    W = weight.double()
    if rot_in is not None:
        W = W @ rot_in.to(device=W.device, dtype=torch.float64)
    if rot_out is not None:
        W = rot_out.to(device=W.device, dtype=torch.float64).T @ W
    return W


def analysis_r1(kind: str, n: int, block: int | None = None, group_size: int = PAPER_GROUP, seed: int = 0
                ) -> tuple[torch.Tensor | None, int | None]:
    """R1 of the analysis (:func:`~rcp_lib.rotation.fuse.r1_matrix`) and the block it used.

    For the block kinds ("gsr", "block_hadamard") a missing ``block`` means the weight group size (GSR's blocks
    match the quantization group); other kinds use no block (None).
    """
    if kind in BLOCK_KINDS:
        block = block or group_size
    elif block is not None:
        raise ValueError(f"rotation {kind!r} takes no block (block kinds: {BLOCK_KINDS})")
    return r1_matrix(kind, n, block, random_signs=False, seed=seed), block


def layer_statistics(model, rotation: str = "none", block: int | None = None, seed: int = 0, group_size: int = PAPER_GROUP,
                     bits: int = 2, layers: list[int] | None = None, iters: int = SEARCH["lloyd_iters"], ratios=None,
                     stride: int = SEARCH["stride"], pinned_iters: int = SEARCH["pinned_iters"],
                     pinned_method: str = SEARCH["pinned_method"]):
    """Per-layer, per-projection weight statistics after rotation ``rotation`` (see module docstring).

    Args:
        rotation: an R1 kind of :data:`rcp_lib.rotation.fuse.R1_KINDS`; ``block`` is its block for "gsr"/"block_hadamard" (None: the
            group size).
        ratios: clip ratios searched by ``err_uniform_clip`` / ``err_nonuniform_pinned`` (None: :data:`CLIP_RATIOS`).
        stride: coarse-to-fine search over ``ratios`` (see :func:`_grid_min`; 1: exhaustive).
        iters, pinned_iters: Lloyd iterations of ``err_nonuniform`` / ``err_nonuniform_pinned`` (both stop early
            at a fixed point); pinned_method: see :func:`pinned_group_errors`.

    Returns:
        ``pandas.DataFrame`` with columns layer, proj, rotation, block, group_size, bits, kurtosis, max_std, the
        :data:`ERROR_COLUMNS`, clip_ratio_uniform and clip_ratio_pinned (mean chosen ratio over groups).
    """
    import pandas as pd

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: extra intra-op threads only spin (10x slower on a busy 2-core box)
    try:
        return pd.DataFrame(_layer_rows(model, rotation, block, seed, group_size, bits, layers, iters, ratios, stride,
                                        pinned_iters, pinned_method))
    finally:
        torch.set_num_threads(threads)


def _layer_rows(model, rotation, block, seed, group_size, bits, layers, iters, ratios, stride, pinned_iters,
                pinned_method) -> list[dict]:
    d = M.dims(model)
    R1, used_block = analysis_r1(rotation, d.hidden, block, group_size, seed)
    R4 = hadamard(d.intermediate) if rotation != "none" else None
    rows = []
    all_layers = M.decoder_layers(model)
    for li in (layers if layers is not None else range(len(all_layers))):
        layer = all_layers[li]
        g_in = M.input_norm(layer).weight.detach().double().cpu()  # the statistics are computed on the CPU
        g_post = M.post_attention_norm(layer).weight.detach().double().cpu()
        for name, lin in M.layer_linears(layer).items():
            W = lin.weight.detach().double().cpu()
            proj = name.split(".")[-1]
            if proj in ("q_proj", "k_proj", "v_proj"):
                W = rotated_weight(W * g_in[None, :], rot_in=R1)
            elif proj in ("gate_proj", "up_proj"):
                W = rotated_weight(W * g_post[None, :], rot_in=R1)
            elif proj == "down_proj":
                W = rotated_weight(W, rot_in=R4, rot_out=R1)
            else:  # o_proj
                W = rotated_weight(W, rot_out=R1)
            rows.append({"layer": li, "proj": proj, "rotation": rotation, "block": used_block,
                         "group_size": group_size, "bits": bits, "kurtosis": kurtosis(W), "max_std": max_over_std(W),
                         **quant_errors(W, bits, group_size, ratios, iters, stride, pinned_iters, pinned_method)})
    return rows


def summarize(df, by: tuple[str, ...] = ("rotation",)):
    """Mean statistics per rotation (or per ``by`` columns, e.g. ``("rotation", "proj")``) and the error ratios.

    Ratios are of the means (ratios of total error over the layers, each layer weighted equally):
    ``range_gain = err_uniform / err_uniform_clip`` (what the MSE-optimal range alone gains over min-max),
    ``shape_gain = err_uniform_clip / err_nonuniform_pinned`` (what non-uniform levels gain beyond that range, with
    the ends pinned as LDP has them), ``pin_cost = err_nonuniform_pinned / err_nonuniform`` (what pinning the ends
    costs against unconstrained Lloyd-Max) and ``nonuniform_gain = err_uniform / err_nonuniform`` (the whole gap
    between min-max RTN and Lloyd-Max, range and shape together).
    """
    by = list(by)
    cols = [c for c in ("kurtosis", "max_std", *ERROR_COLUMNS, "clip_ratio_uniform", "clip_ratio_pinned") if c in df]
    out = df.groupby(by, sort=False)[cols].mean().reset_index()
    keep = [c for c in ("block", "group_size") if c in df and c not in by]
    if keep:
        first = df.groupby(by, sort=False)[keep].first().reset_index()
        out = first.merge(out, on=by, sort=False)
    if "err_uniform_clip" in out:
        out["range_gain"] = out["err_uniform"] / out["err_uniform_clip"]
    if "err_nonuniform_pinned" in out:
        out["shape_gain"] = out["err_uniform_clip"] / out["err_nonuniform_pinned"]
        out["pin_cost"] = out["err_nonuniform_pinned"] / out["err_nonuniform"]
    out["nonuniform_gain"] = out["err_uniform"] / out["err_nonuniform"]
    return out
