"""How far QAT moved each part of the quantized model (issue "Clip and Partition actually learn", item 4).

:func:`snapshot` records, for every learnable weight quantizer of a model, the per-group clip ratio, the normalised
LDP level positions and a copy of the latent weight; :func:`movement` compares two snapshots (before and after
training) and gives the columns every QAT row carries:

* ``clip_ratio_init`` / ``clip_ratio_final``: mean over all groups of all layers of ``(hi - lo) / (max - min)`` of the
  group (:meth:`~rcp_lib.quant.quantizers.WeightQuantizer.clip_ratio`; 1 = min-max, the same definition for LWC,
  static and fixed ranges);
* ``clip_shift``: mean over all groups of ``|ratio_final - ratio_init|``. The mean ratio alone can hide movement: from
  the searched (MSE-optimal) start, groups move both ways and the signed changes cancel (measured on the embedded
  model: mean ratio changed by 3e-5 while the mean per-group change was 3e-3 after 10 steps);
* ``range_shift``: mean over all groups of ``|(hi - lo)_final / (hi - lo)_init - 1|``, the relative change of the
  quantizer's own range (:meth:`~rcp_lib.quant.quantizers.WeightQuantizer.clip_ratio_and_span`). ``clip_shift`` divides by the
  latent group's min-max, which moves with the weights: a frozen static range has ``range_shift`` 0 but a non-zero
  ``clip_shift`` (on the embedded model, 0.001 of RCP's 0.0025); for LWC's relative range both move with the weights;
* ``level_shift``: mean ``|c_final - c_init|`` over the *interior* normalised level positions ``c_1 .. c_{L-2}`` of
  every group (the end positions are 0 and 1 by construction); 0 for a uniform grid;
* ``weight_shift``: relative Frobenius change of the latent weights, ``sqrt(sum ||W1 - W0||^2) / sqrt(sum ||W0||^2)``
  over all quantized layers;
* ``code_flips``: the fraction of all quantized weights whose code (the level it is assigned to) differs between the
  two snapshots. After a GPTQ start every latent weight sits on a level, so a latent-weight step smaller than the
  half-gap to the next level changes no code: ``weight_shift`` can be non-zero while ``code_flips`` is 0.

:func:`movement` is a pure function of the two snapshots (tested on a hand-built example).
"""

from __future__ import annotations

import math

import torch
from torch import nn

Snapshot = dict[str, dict[str, torch.Tensor]]


@torch.no_grad()
def snapshot(model: nn.Module, weights: bool = True) -> Snapshot:
    """Per quantized layer (name -> dict): ``clip_ratio`` and ``span`` (``hi - lo``) float64 ``[out, n_groups]``,
    ``fractions`` float64
    ``[out, n_groups or 1, L]``, ``codes`` uint8 ``[out, in]`` (:meth:`~rcp_lib.quant.quantizers.WeightQuantizer.export`)
    and (``weights=True``) ``weight``, a float32 copy of the latent weight ``[out, in]``.

    Only layers with a learnable :class:`~rcp_lib.quant.quantizers.WeightQuantizer` are recorded (frozen or
    full-precision layers have nothing to move)."""
    from .quant.quantizers import WeightQuantizer

    out: Snapshot = {}
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if not isinstance(wq, WeightQuantizer):
            continue
        w = mod.weight.detach()
        ratio, width = wq.clip_ratio_and_span(w)
        rec = {"clip_ratio": ratio.cpu(), "span": width.cpu(), "fractions": wq.level_fractions(w).cpu(),
               "codes": wq.export(w)[0].cpu()}
        if weights:
            rec["weight"] = w.to(device="cpu", dtype=torch.float32, copy=True)
        out[name] = rec
    return out


def movement(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Movement columns between two snapshots of the same model (see module docstring).

    Returns:
        ``{"clip_ratio_init", "clip_ratio_final", "clip_shift", "range_shift", "level_shift", "weight_shift",
        "code_flips"}`` as floats (``weight_shift`` is NaN when the snapshots hold no weights, ``code_flips`` when they
        hold no codes, ``range_shift`` when they hold no spans; a group whose initial span is 0 counts as moved by
        ``|span_final|``).
    Raises:
        ValueError: the snapshots are empty or name different layers / shapes.
    """
    if not before:
        raise ValueError("empty snapshot: the model has no learnable weight quantizer")
    if set(before) != set(after):
        raise ValueError(f"snapshots of different models: {sorted(set(before) ^ set(after))[:4]} ...")
    r0 = torch.cat([before[n]["clip_ratio"].reshape(-1) for n in before]).double()
    r1 = torch.cat([after[n]["clip_ratio"].reshape(-1) for n in before]).double()
    shifts, dw2, w2, flips, n_codes = [], 0.0, 0.0, 0, 0
    have_w = all("weight" in before[n] and "weight" in after[n] for n in before)
    have_c = all("codes" in before[n] and "codes" in after[n] for n in before)
    for n in before:
        c0, c1 = before[n]["fractions"].double(), after[n]["fractions"].double()
        if c0.shape != c1.shape:
            raise ValueError(f"{n}: level fractions of different shapes {tuple(c0.shape)} and {tuple(c1.shape)}")
        if c0.shape[-1] > 2:
            shifts.append((c1[..., 1:-1] - c0[..., 1:-1]).abs().reshape(-1))
        if have_c:
            k0, k1 = before[n]["codes"], after[n]["codes"]
            if k0.shape != k1.shape:
                raise ValueError(f"{n}: codes of different shapes {tuple(k0.shape)} and {tuple(k1.shape)}")
            flips += int((k0 != k1).sum())
            n_codes += k0.numel()
        if have_w:
            w0, w1 = before[n]["weight"].double(), after[n]["weight"].double()
            dw2 += float(((w1 - w0) ** 2).sum())
            w2 += float((w0 ** 2).sum())
    level = float(torch.cat(shifts).mean()) if shifts else 0.0
    rng = float("nan")
    if all("span" in before[n] and "span" in after[n] for n in before):
        s0 = torch.cat([before[n]["span"].reshape(-1) for n in before]).double()
        s1 = torch.cat([after[n]["span"].reshape(-1) for n in before]).double()
        rng = float(torch.where(s0 != 0, s1 / torch.where(s0 != 0, s0, 1.0) - 1, s1).abs().mean())
    return {"clip_ratio_init": float(r0.mean()), "clip_ratio_final": float(r1.mean()),
            "clip_shift": float((r1 - r0).abs().mean()), "range_shift": rng, "level_shift": level,
            "weight_shift": math.sqrt(dw2 / w2) if have_w and w2 > 0 else float("nan"),
            "code_flips": flips / n_codes if have_c and n_codes else float("nan")}
