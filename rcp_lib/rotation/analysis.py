"""Rotation-impact analysis: weight statistics and 2-bit quantization error before/after rotation.

The analysis behind RCP's motivation (a random rotation makes weights bell-shaped, so a uniform 2-bit grid
fits them badly and a non-uniform one is needed) and GSR's claim (sequency ordering and small blocks lower
the error). For every projection of every decoder layer, with its preceding RMSNorm weight folded in as the
fused model has it, we compare the weight as it is with the weight as seen after the residual rotation R1
(input side of q/k/v/gate/up: ``W R1``; output side of o/down: ``R1ᵀ W``; plus R4, a Hadamard on the
down_proj input, when any rotation is applied):

* kurtosis (Pearson; 3 for a Gaussian, 1.8 for a uniform distribution) and max|w|/std,
* normalised MSE ``||W - Q(W)||² / ||W||²`` of 2-bit per-group quantization with (a) the uniform asymmetric
  min-max grid (RTN) and (b) the MSE-optimal 4-level grid per group (Lloyd-Max = 1-D k-means).
"""

from __future__ import annotations

import torch

from .. import models as M
from .hadamard import hadamard, random_hadamard, random_orthogonal
from .walsh import gsr, largest_pow2_divisor

ROTATIONS = ("none", "hadamard", "random_hadamard", "walsh", "gsr", "random_orthogonal")


def kurtosis(w: torch.Tensor) -> float:
    """Pearson kurtosis ``E[(w-μ)^4] / σ^4`` of all elements (normal = 3)."""
    x = w.double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def max_over_std(w: torch.Tensor) -> float:
    x = w.double().flatten()
    return float(x.abs().max() / x.std())


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, n = w.shape
    g = n if group_size == -1 else group_size
    if n % g:
        raise ValueError(f"group_size {group_size} does not divide the input size {n} (weight {tuple(w.shape)})")
    return w.double().reshape(out * (n // g), g)


def uniform_quant_error(w: torch.Tensor, bits: int = 2, group_size: int = 128) -> float:
    """Normalised MSE of asymmetric min-max RTN per group of ``group_size`` inputs of each row (-1: per row)."""
    wg = _groups(w, group_size)
    lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    q = lo + s * torch.round((wg - lo) / s).clamp(0, 2**bits - 1)
    return float(((wg - q) ** 2).sum() / (wg**2).sum())


def lloyd_max_levels(wg: torch.Tensor, bits: int = 2, iters: int = 25) -> torch.Tensor:
    """MSE-optimal ``2^bits`` levels per row of ``wg [G, g]`` (1-D k-means, quantile init). Sorted ``[G, L]``."""
    L = 2**bits
    x = wg.double()
    qs = (torch.arange(L, dtype=torch.float64) + 0.5) / L
    c = torch.quantile(x, qs.to(x.device), dim=1).T.contiguous()  # [G, L]
    for _ in range(iters):
        idx = (x[:, :, None] - c[:, None, :]).abs().argmin(-1)
        onehot = torch.nn.functional.one_hot(idx, L).to(x.dtype)
        cnt = onehot.sum(1)
        new = (onehot * x[:, :, None]).sum(1) / cnt.clamp_min(1)
        c = torch.where(cnt > 0, new, c)
    return c.sort(-1).values


def nonuniform_quant_error(w: torch.Tensor, bits: int = 2, group_size: int = 128, iters: int = 25) -> float:
    """Normalised MSE of the per-group Lloyd-Max ``2^bits``-level quantizer."""
    wg = _groups(w, group_size)
    c = lloyd_max_levels(wg, bits, iters)
    q = torch.gather(c, 1, (wg[:, :, None] - c[:, None, :]).abs().argmin(-1))
    return float(((wg - q) ** 2).sum() / (wg**2).sum())


def rotated_weight(weight: torch.Tensor, rot_in: torch.Tensor | None = None, rot_out: torch.Tensor | None = None) -> torch.Tensor:
    """``rot_outᵀ @ W @ rot_in`` in float64 (either rotation may be None). ``W`` is ``[out, in]``."""
    W = weight.double()
    if rot_in is not None:
        W = W @ rot_in.double()
    if rot_out is not None:
        W = rot_out.double().T @ W
    return W


def residual_rotation(kind: str, n: int, block: int | None = None, seed: int = 0) -> tuple[torch.Tensor | None, int | None]:
    """R1 of a kind for size ``n`` and the block size used (for walsh/gsr on non-power-of-two sizes)."""
    if kind == "none":
        return None, None
    if kind == "hadamard":
        return hadamard(n), None
    if kind == "random_hadamard":
        return random_hadamard(n, seed), None
    if kind == "random_orthogonal":
        return random_orthogonal(n, seed), None
    if kind == "walsh":  # full-size sequency Walsh; a non-power-of-two size gets the largest Walsh block
        b = n if n & (n - 1) == 0 else largest_pow2_divisor(n)
        return gsr(n, b), b
    if kind == "gsr":
        b = block or largest_pow2_divisor(n)
        return gsr(n, b), b
    raise ValueError(f"unknown rotation {kind!r}; choose one of {ROTATIONS}")


def layer_statistics(model, rotation: str = "none", block: int | None = None, seed: int = 0, group_size: int = 64,
                     bits: int = 2, layers: list[int] | None = None, iters: int = 25):
    """Per-layer, per-projection weight statistics after rotation ``rotation`` (see module docstring).

    Returns:
        ``pandas.DataFrame`` with columns layer, proj, rotation, block, kurtosis, max_std, err_uniform,
        err_nonuniform, group_size, bits.
    """
    import pandas as pd

    d = M.dims(model)
    R1, used_block = residual_rotation(rotation, d.hidden, block if rotation == "gsr" else None, seed)
    R4 = hadamard(d.intermediate) if rotation != "none" else None
    rows = []
    all_layers = M.decoder_layers(model)
    for li in (layers if layers is not None else range(len(all_layers))):
        layer = all_layers[li]
        g_in = M.input_norm(layer).weight.detach().double()
        g_post = M.post_attention_norm(layer).weight.detach().double()
        for name, lin in M.layer_linears(layer).items():
            W = lin.weight.detach().double()
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
                         "kurtosis": kurtosis(W), "max_std": max_over_std(W),
                         "err_uniform": uniform_quant_error(W, bits, group_size),
                         "err_nonuniform": nonuniform_quant_error(W, bits, group_size, iters),
                         "group_size": group_size, "bits": bits})
    return pd.DataFrame(rows)


def summarize(df):
    """Mean statistics per rotation (and per rotation and projection with ``by_proj``)."""
    cols = ["kurtosis", "max_std", "err_uniform", "err_nonuniform"]
    out = df.groupby("rotation", sort=False)[cols].mean().reset_index()
    out["nonuniform_gain"] = out["err_uniform"] / out["err_nonuniform"]
    return out
