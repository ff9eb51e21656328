"""GPTQ (Frantar et al., 2022) for a uniform per-group grid or a fixed non-uniform per-group level table.

Written for this project from the published algorithm: with ``H = 2/N sum x x^T`` of the layer inputs, columns are
quantized one at a time and the quantization error of each column is spread over the not-yet-quantized columns
through the upper Cholesky factor ``U`` of ``H^{-1}`` (``H^{-1} = U^T U``); updates are applied lazily per block of
``block_size`` columns. ``percdamp`` of the mean diagonal is added to ``H``; inputs never seen (``H_jj = 0``) get
``H_jj = 1`` and a zero weight column. ``act_order`` processes columns by decreasing ``H_jj`` and undoes the
permutation at the end.

Grids:

* uniform (``bits=b``): asymmetric min-max grid of :func:`~rcp_lib.quant.quantizers.quantize_uniform` per group of
  ``group_size`` consecutive input channels. As in GPTQ with groups, a group's ``lo``/``hi`` are computed from the
  *current* (error-updated) weights when the first column of the group is reached. With ``act_order`` the groups stay
  the contiguous groups of the original column order (so the result can be exported with one table per group); a
  group's parameters are fixed when the first of its columns comes up in the permuted order.
* fixed levels (``levels=[out, n_groups, L]``, e.g. LDP or Lloyd-Max levels): nearest-level rounding, table unchanged.

Both return codes and a level table with ``levels.gather(codes)`` equal to the quantized weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..memory import PAPER_GROUP
from .quantizers import (
    check_finite,
    check_weight_bits,
    minmax_range,
    mse_clip_range,
    quantize_uniform,
    resolve_group_size,
    uniform_levels,
)


class HessianAccumulator:
    """Running ``H = 2/N sum_n x_n x_n^T`` over calibration activations (GPTQ's Hessian of the layer loss).

    Args:
        in_features: size of the last dimension of the inputs.
        dtype: accumulation dtype (float32 as in the reference GPTQ; float64 doubles the cost on CPU).
        device: where ``H`` lives (default: the device of the first batch).
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.in_features = in_features
        self.dtype = dtype
        self.nsamples = 0
        self._H: torch.Tensor | None = None if device is None else torch.zeros(in_features, in_features, dtype=dtype, device=device)

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add activations ``x [..., in]`` (every vector along the last dimension is one sample)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dim {self.in_features}, got shape {tuple(x.shape)}")
        check_finite(x, "calibration activations")
        x = x.reshape(-1, self.in_features)
        m = x.shape[0]
        if m == 0:
            return
        if self._H is None:
            self._H = torch.zeros(self.in_features, self.in_features, dtype=self.dtype, device=x.device)
        x = x.to(device=self._H.device, dtype=self.dtype)
        n = self.nsamples
        self._H.mul_(n / (n + m))
        self.nsamples = n + m
        x = x * (2.0 / self.nsamples) ** 0.5
        self._H.addmm_(x.T, x)

    @property
    def H(self) -> torch.Tensor:
        """``[in, in]`` Hessian (``2/N X^T X``)."""
        if self._H is None:
            raise ValueError("HessianAccumulator has no samples yet; call add_batch first")
        return self._H


@dataclass
class GPTQResult:
    """Output of :func:`gptq_quantize`.

    Attributes:
        weight: quantized weight ``[out, in]`` (dtype of the input weight).
        codes: uint8 ``[out, in]`` level indices.
        levels: float32 ``[out, n_groups, L]`` level table (``levels.gather(codes)`` == ``weight`` in float32).
        perm: the act-order permutation (int64 ``[in]``) or None.
        loss: GPTQ's accumulated objective ``sum_j ||err_j||^2 / (2 [H^-1 chol]_jj^2)`` (float).
    """

    weight: torch.Tensor
    codes: torch.Tensor
    levels: torch.Tensor
    perm: torch.Tensor | None
    loss: float


@torch.no_grad()
def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int | None = None,
    group_size: int = PAPER_GROUP,
    levels: torch.Tensor | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    clip_ratio: float = 1.0,
    round_zero: bool = False,
    static_groups: bool = False,
    clip_search: str = "none",
    dtype: torch.dtype = torch.float32,
) -> GPTQResult:
    """Quantize ``W`` with GPTQ.

    Args:
        W: ``[out, in]`` weight.
        H: ``[in, in]`` Hessian from :class:`HessianAccumulator` (any positive multiple of ``X^T X`` works).
        bits: 1..8 for the uniform per-group grid (exclusive with ``levels``).
        group_size: input channels per group, -1 for one group per row. Must divide ``in``.
        levels: fixed level table ``[out, n_groups, L]`` (ordered along the last dim) for non-uniform grids.
        block_size: columns per lazy batch update.
        percdamp: damping, as a fraction of the mean of ``diag(H)``.
        act_order: process columns by decreasing ``diag(H)`` (permutation undone at the end).
        clip_ratio: min-max shrink of the uniform grid's range (``(0, 1]``).
        clip_search: ``"mse"``: each group's range is searched with
            :func:`~rcp_lib.quant.quantizers.mse_clip_range` on the group's current (updated) weights when the group
            starts, as QuaRot's GPTQ does with ``--w_clip`` (``clip_ratio`` is then ignored); ``"none"``: min-max ×
            ``clip_ratio``.
        round_zero: integer zero point for the uniform grid.
        static_groups: uniform grid only: take every group's ``lo``/``hi`` from the *original* weight before any
            update (AutoGPTQ's ``static_groups``) instead of from the updated weights when the group starts (GPTQ's
            default, used when False). At 2 bits the error feedback can widen later groups' ranges a lot; static
            ranges avoid that.
        dtype: working precision (float32 like GPTQ, or float64).
    Returns:
        :class:`GPTQResult`.
    """
    if clip_search not in ("none", "mse"):
        raise ValueError(f"clip_search must be 'none' or 'mse', got {clip_search!r}")
    if (bits is None) == (levels is None):
        raise ValueError("give exactly one of bits (uniform grid) or levels (fixed per-group level table)")
    check_finite(W, "weight")
    check_finite(H, "Hessian")
    out_f, in_f = W.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"H must be [{in_f}, {in_f}] for a weight of shape {tuple(W.shape)}, got {tuple(H.shape)}")
    gs = resolve_group_size(in_f, group_size, f"weight {tuple(W.shape)}")
    ng = in_f // gs
    if bits is not None:
        check_weight_bits(bits)
        L = 2**bits
        if not 0 < clip_ratio <= 1:
            raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
        table = torch.zeros(out_f, ng, L, dtype=dtype, device=W.device)
        have = torch.zeros(ng, dtype=torch.bool)
        lo_t = torch.zeros(out_f, ng, dtype=dtype, device=W.device)
        hi_t = torch.zeros(out_f, ng, dtype=dtype, device=W.device)
    else:
        if levels.shape[:2] != (out_f, ng) or levels.dim() != 3:
            raise ValueError(f"levels must be [{out_f}, {ng}, L], got {tuple(levels.shape)}")
        check_finite(levels, "levels")
        table = levels.to(device=W.device, dtype=dtype)
        L = table.shape[-1]
        if bool((table[..., 1:] < table[..., :-1]).any()):
            raise ValueError("levels must be sorted (non-decreasing) along the last dimension")
        mids = ((table[..., 1:] + table[..., :-1]) * 0.5).permute(1, 0, 2).contiguous()  # [ng, out, L-1]

    Wk = W.detach().to(dtype).clone()
    Hk = H.detach().to(device=W.device, dtype=dtype).clone()
    dead = torch.diag(Hk) == 0
    Hk[dead, dead] = 1
    Wk[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(Hk), descending=True)
        Wk = Wk[:, perm]
        Hk = Hk[perm][:, perm]
    col_of = perm if perm is not None else torch.arange(in_f, device=W.device)  # processed position -> original column
    pos_of = torch.argsort(col_of)  # original column -> processed position
    damp = percdamp * torch.mean(torch.diag(Hk))
    Hk.diagonal().add_(damp)
    Lc = torch.linalg.cholesky(Hk)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(Lc), upper=True)

    if bits is not None and static_groups:
        W0 = W.detach().to(dtype).reshape(out_f, ng, gs)
        lo0, hi0 = mse_clip_range(W0, bits, round_zero)[:2] if clip_search == "mse" else minmax_range(W0, clip_ratio)
        lo_t.copy_(lo0)
        hi_t.copy_(hi0)
        table.copy_(uniform_levels(lo0, hi0, bits, round_zero))
        have[:] = True
    Q = torch.zeros_like(Wk)
    codes = torch.zeros(out_f, in_f, dtype=torch.long, device=W.device)
    loss = torch.zeros((), dtype=dtype, device=W.device)
    col_cpu = col_of.cpu()
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = Wk[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            g = int(col_cpu[i1 + i]) // gs
            if bits is not None:
                if not have[g]:
                    pos = pos_of[g * gs:(g + 1) * gs]
                    # current values of the group's columns: inside the block from W1; beyond it from Wk plus the
                    # updates of this block's columns so far that the lazy batch update has not applied yet
                    beyond = Wk[:, pos] - E1[:, :i] @ Hinv[i1:i1 + i][:, pos]
                    cur = torch.where(((pos >= i1) & (pos < i2)).unsqueeze(0), W1[:, (pos - i1).clamp(0, i2 - i1 - 1)], beyond)
                    if clip_search == "mse":
                        lo, hi, _ = mse_clip_range(cur, bits, round_zero)
                    else:
                        lo, hi = minmax_range(cur, clip_ratio)
                    lo_t[:, g], hi_t[:, g] = lo, hi
                    table[:, g] = uniform_levels(lo, hi, bits, round_zero)
                    have[g] = True
                qv, cv = quantize_uniform(w.view(out_f, 1, 1), lo_t[:, g:g + 1], hi_t[:, g:g + 1], bits, round_zero)
                q, c = qv.view(out_f), cv.view(out_f)
            else:
                c = torch.searchsorted(mids[g], w.unsqueeze(-1).contiguous()).squeeze(-1)
                q = torch.gather(table[:, g], 1, c.unsqueeze(-1)).squeeze(-1)
            Q1[:, i] = q
            codes[:, i1 + i] = c
            err = (w - q) / d
            loss += ((w - q) ** 2).sum() / d**2 / 2
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            E1[:, i] = err
        Q[:, i1:i2] = Q1
        Wk[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, pos_of]
        codes = codes[:, pos_of]
    levels_out = table.to(torch.float32)
    return GPTQResult(Q.to(W.dtype), codes.to(torch.uint8), levels_out.contiguous(), perm, float(loss))
