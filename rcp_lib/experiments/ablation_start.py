"""Where each ablation row's quantizer starts and ends, measured against the rotated FP weights and the uniform grid.

    python -m rcp_lib.experiments.ablation_start --profile ablation

Why: a QAT row's ``clip_ratio_init`` / ``clip_ratio_final`` (:mod:`rcp_lib.movement`) divide the quantizer's range by
the min-max of the *latent* weight of that moment. With the GPTQ start, the latent weights are GPTQ's output, rounded
onto the grid, so they lie inside ``[lo, hi]`` by construction and the ratio is 1 for every row: it cannot show what the
clip search did. Here the same per-group ratio ``(hi - lo) / (max(w) - min(w))``
(:meth:`~rcp_lib.quant.quantizers.WeightQuantizer.clip_ratio`) is taken against the rotated FP weight ``w`` of the
layer, which neither GPTQ nor QAT touched:

* ``clip_ratio_start``: the quantizer as built for the row, before GPTQ (the MSE clip search of RCP, min-max for
  "w/o Clip"); GPTQ keeps this grid and QAT starts from it;
* ``clip_ratio_trained``: the trained student's range (its cached ``student.pt``; trained first if not cached);
* ``clip_shift``: mean over groups of ``|trained - start|`` per group (the signed changes of the groups cancel in the
  difference of the means);
* ``level_offset_start`` / ``level_offset_trained``: mean ``|c_k - k / (L - 1)|`` over the interior normalised level
  positions of every group (:meth:`~rcp_lib.quant.quantizers.WeightQuantizer.level_fractions`): how far the grid is
  from the uniform one (0 for "w/o Partition"; Lloyd-Max levels for RCP), at the start and after QAT.

Means over every group of every quantized projection. One row per (seed of ``ablation_seeds``, ablation method),
written to ``results/<profile>/ablation_start.csv`` from a clean tree (``--allow-dirty`` to override). Takes the
trained students from the cache of this code (the ``ablation`` table trains them); run it alone on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from dataclasses import replace

import torch
from torch import nn


def clip_ratios(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per learnable weight quantizer of ``model`` (module name -> float64 ``[out, n_groups]``): its clip ratio against
    ``weights[name]`` (``[out, in]``, e.g. the rotated FP weight of that layer), not against the module's own weight.

    Raises:
        KeyError: a quantized layer of ``model`` has no entry in ``weights``.
    """
    from ..quant.quantizers import WeightQuantizer

    out = {}
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if isinstance(wq, WeightQuantizer):
            if name not in weights:
                raise KeyError(f"no reference weight for the quantized layer {name!r}")
            out[name] = wq.clip_ratio(weights[name].to(mod.weight.device)).cpu()
    return out


def level_offsets(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per learnable weight quantizer of ``model`` (module name -> float64 ``[out, n_groups or 1, L - 2]``): the
    interior normalised level positions minus the uniform grid's (``k / (L - 1)``); empty last dim for 2 levels."""
    from ..quant.quantizers import WeightQuantizer

    out = {}
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if isinstance(wq, WeightQuantizer):
            c = wq.level_fractions(mod.weight).cpu()
            u = torch.linspace(0, 1, c.shape[-1], dtype=torch.float64)
            out[name] = (c - u)[..., 1:-1]
    return out


def mean_abs(offsets: dict[str, torch.Tensor]) -> float:
    """Mean ``|offset|`` over every entry of :func:`level_offsets` (0.0 when there is none)."""
    flat = [o.reshape(-1).abs() for o in offsets.values() if o.numel()]
    return float(torch.cat(flat).mean()) if flat else 0.0


def compare(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor]) -> dict[str, float]:
    """``clip_ratio_start`` / ``clip_ratio_trained`` (means over all groups of all layers), ``clip_shift`` (mean per-group
    ``|trained - start|``) and ``groups`` (their number) from two :func:`clip_ratios` of the same layers.

    Raises:
        ValueError: empty, or not the same layers / shapes.
    """
    if not start or set(start) != set(trained):
        raise ValueError(f"clip ratios of different layers: {sorted(set(start) ^ set(trained))[:4]}")
    if any(start[n].shape != trained[n].shape for n in start):
        raise ValueError("clip ratios of different shapes")
    r0 = torch.cat([start[n].reshape(-1) for n in sorted(start)]).double()
    r1 = torch.cat([trained[n].reshape(-1) for n in sorted(start)]).double()
    return {"clip_ratio_start": float(r0.mean()), "clip_ratio_trained": float(r1.mean()),
            "clip_shift": float((r1 - r0).abs().mean()), "groups": int(r0.numel())}


def start_model(method, profile) -> nn.Module:
    """The row's quantized model before GPTQ and QAT: a float32 copy of the FP model, rotated and quantized by the
    method's recipe (what :func:`rcp_lib.experiments.build.build` does before its GPTQ / QAT stage)."""
    from .build import base_model
    from ..quant.apply import quantize_model
    from ..rotation.fuse import rotate_model

    recipe = method.recipe(profile)
    if recipe.quant is None or recipe.qat is None:
        raise ValueError(f"{method.name}: not a QAT row with a quantizer")
    model = copy.deepcopy(base_model(profile)[0]).float()
    if recipe.rotation is not None:
        rotate_model(model, recipe.rotation)
    quantize_model(model, recipe.quant)
    return model


def row(method, profile, progress: bool = True) -> dict:
    """One row: :func:`compare` of the start model's ratios and the trained student's, both against the start model's
    (rotated FP) weights. The student is loaded from the QAT cache into the start model (strict, as ``build`` does),
    or trained by ``build`` first."""
    from .build import build
    from .rows import qat_key
    from ..paths import cache_dir

    model = start_model(method, profile)
    fp_w = {n: m.weight.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_quantizer")}
    start, lv0 = clip_ratios(model, fp_w), mean_abs(level_offsets(model))
    path = cache_dir() / "qat" / qat_key(method, profile) / "student.pt"
    cached = path.exists()
    if cached:
        print(f"[ablation_start] student of {method.name} seed {profile.seed}: cached", file=sys.stderr, flush=True)
        model.load_state_dict(torch.load(path, map_location=profile.device), strict=True)
    else:
        print(f"[ablation_start] student of {method.name} seed {profile.seed}: not cached, training it", file=sys.stderr,
              flush=True)
        model = build(method, profile, progress=progress)
    return {"method": method.name, "setting": method.setting, "seed": int(profile.seed),
            **compare(start, clip_ratios(model, fp_w)), "level_offset_start": lv0,
            "level_offset_trained": mean_abs(level_offsets(model)), "student_cached": cached}


def rows(profile, progress: bool = True) -> list[dict]:
    """:func:`row` for every seed of ``profile.ablation_seeds`` and every ablation method."""
    from .ablation import ablation_methods

    if not profile.ablation_seeds:
        raise ValueError("profile.ablation_seeds is empty")
    out = []
    for seed in profile.ablation_seeds:
        p = replace(profile, seed=int(seed))
        for m in (m for m in ablation_methods(profile) if m.qat):  # the PTQ rows have no quantizer start
            out.append(row(m, p, progress))
            r = out[-1]
            print(f"{r['method']:<34} seed {seed}: clip ratio vs FP {r['clip_ratio_start']:.4f} -> "
                  f"{r['clip_ratio_trained']:.4f} (mean |change| {r['clip_shift']:.4f}); levels off uniform "
                  f"{r['level_offset_start']:.4f} -> {r['level_offset_trained']:.4f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rcp_lib.experiments.ablation_start", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="ablation")
    ap.add_argument("--set", nargs="*", default=[], help="profile overrides KEY=VALUE (JSON values)")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args(argv)
    if args.allow_dirty:
        os.environ["RCP_ALLOW_DIRTY"] = "1"
    from ..profiles import parse_set_items
    from . import write_rows
    from ..io import require_clean_tree
    from ..profiles import get_profile

    P = get_profile(args.profile, **parse_set_items(args.set))
    require_clean_tree()  # before computing, not after
    out = rows(P)
    for name in dict.fromkeys(r["method"] for r in out):
        vals = [r for r in out if r["method"] == name]
        print(f"{name:<34} mean over {len(vals)} seeds: {statistics.fmean(r['clip_ratio_start'] for r in vals):.4f} "
              f"-> {statistics.fmean(r['clip_ratio_trained'] for r in vals):.4f}")
    print(write_rows(out, P, "ablation_start"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
