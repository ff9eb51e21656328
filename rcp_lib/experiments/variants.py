"""Variants of the selected QAT recipe at (about) equal CPU time, each against the default at the same seeds.

    python -m rcp_lib.experiments.variants --profile cpu --seeds 0,1,2                 # every variant
    python -m rcp_lib.experiments.variants --profile cpu --only default,block-ap --seeds 0,1,2
    python -m rcp_lib.experiments.variants --list

The questions of the issue "a recipe under which Clip and Partition actually learn" that the sweep's grid
(``rcp_lib/experiments/sweep.py``) does not ask: does a Block-AP pre-stage beat plain end-to-end QAT at equal CPU time
(item 5), does a GPTQ start on the quantizer's grid with a static range help (item 2), does training at the evaluation
length help at equal tokens (item 6). Every variant is the sweep's selected point (:data:`POINT`: its learning rates
and gradient clip are the ``cpu`` profile's) with the profile overrides and step count of :data:`VARIANTS`, trained and
scored exactly as a sweep point (:func:`~rcp_lib.experiments.sweep.score_point`: validation perplexity on the held-out tail of the
TRAIN split, never the test split). ``default`` is the point with the start the sweep selected it with
(:data:`SEARCHED_START`; same key as the sweep's rows of that code). ``gptq-static`` beat it (Welch p < 0.05 over 3 seeds)
and has been the profile's start since, so every variant pins its start explicitly.

Equal time: Block-AP's cost was measured on this machine before choosing its step counts (16 calibration windows and
16 steps per block: about 86 s, the time of about 19 end-to-end steps of 4.6 s), so its end-to-end stage is cut from
40 to 21 steps; the ``seconds`` column (GPTQ + Block-AP + training, without evaluations) shows what each variant
actually took. The GPTQ start adds its GPTQ pass on top of the 40 steps (its seconds say by how much); seqlen 512
trains 20 steps of 512 tokens: the default's tokens. The static range's lo / hi are absolute weight values: at the
quantizer learning rate of 1e-2 (made for logits) a first run's loss rose from 2.3 to 18 in 9 steps, so they train at
``lr_range`` 1e-4 (EfficientQAT's Block-AP quantizer rate), the LDP logits at 1e-2 as in the default.

Writes ``results/<profile>/recipe_variants.csv``: one row per (variant, seed) with the variant's ``n_seeds``,
``val_ppl_mean``, ``val_ppl_sem`` and ``vs_default`` (:func:`rcp_lib.experiments.ablation.separation`: an order only
from Welch's t-test on log perplexity (p < 0.05), else "not separable at this budget"). Resumable (rows cached like the
sweep's), refused from a dirty tree unless ``--allow-dirty``. Run it alone: two torch jobs on 2 cores slow each other
more than 10x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .sweep import (
    GRID,
    SEEDS_SCANNED,
    check_same_code,
    group_stats,
    parse_seeds,
    points,
    score_point,
    sweep_key,
    sweep_row_path,
    with_recipe,
)

#: the sweep's selected point (its index in ``python -m rcp_lib.experiments.sweep --list``): its learning rates and gradient clip are the
#: cpu profile's
POINT = 35

#: the start the sweep selected its point with (the searched clip and Lloyd-Max levels, LWC relative to the latent
#: weight, no GPTQ), as profile overrides (``qat_overrides`` over the profile's QAT recipe): pinned in every variant,
#: so that a variant's recipe does not follow the profile's default start
SEARCHED_START = {"qat_overrides": {"qat": {"gptq_start": False, "lr_range": None},
                                    "quant": {"weight": {"clip_init": "mse", "ldp_init": "lloyd",
                                                         "range_mode": "relative", "range_param": "absolute"}}}}


def _start(qat: dict | None = None, weight: dict | None = None) -> dict:
    """:data:`SEARCHED_START` with these QATConfig / start fields on top."""
    return {"qat_overrides": with_recipe(SEARCHED_START["qat_overrides"], qat, weight)}


#: name -> (profile overrides, end-to-end QAT steps or None for the profile's qat_steps, what it tests). "default" is
#: the sweep's point as selected (the cpu profile's recipe when these variants were first run); "gptq-static" won
#: and became the cpu profile's recipe, then with range_param "log" (tests/test_recipe_variants.py checks both).
VARIANTS: dict[str, tuple[dict, int | None, str]] = {
    "default": (_start(), None, "the sweep's point: searched start, 40 end-to-end steps of 256 tokens"),
    "block-ap": (_start({"block_ap_steps": 16, "block_ap_samples": 16, "block_ap_lr_quant": 1e-2}), 21,
                 "Block-AP (16 steps per block on 16 windows, quantizer lr 1e-2 as end to end) + 21 end-to-end steps"),
    "block-ap-effqat-lr": (_start({"block_ap_steps": 16, "block_ap_samples": 16}), 21,
                           "the same with EfficientQAT's Block-AP learning rates (weights 2e-5, quantizer 1e-4)"),
    "gptq-static": (_start({"gptq_start": True, "lr_range": 1e-4}, {"range_mode": "static"}), None,
                    "GPTQ on the searched LDP grid, then 40 end-to-end steps with a static (learnable lo/hi) range, "
                    "lo/hi at lr 1e-4"),
    "seqlen-512": ({**_start(), "qat_seqlen": 512}, 20,
                   "QAT at the evaluation length: 20 steps of 512 tokens (equal tokens)"),
}


def variant_profile(P, over: dict):
    """``P`` with a variant's overrides; its ``qat_overrides`` (the pinned start) go on top of ``P``'s own, in their
    layout (:func:`~rcp_lib.experiments.sweep.with_recipe`), so that a ``--set qat_overrides=...`` of the run is kept
    where the variant does not pin the field."""
    over = dict(over)
    if "qat_overrides" in over and P.qat_overrides:
        v = over["qat_overrides"]
        over["qat_overrides"] = with_recipe(P.qat_overrides, v.get("qat"), (v.get("quant") or {}).get("weight"))
    return P.with_overrides(**over)


def variant_key(P, name: str, seed: int):
    """``(profile of the variant at this seed, cache key of its row, its QAT steps)`` (:func:`~.sweep.sweep_key` of the
    selected point under the variant's overrides)."""
    over, steps, _ = VARIANTS[name]
    Pv = variant_profile(P, over)
    return sweep_key(Pv, points(GRID)[POINT], seed, steps or P.qat_steps) + (steps or P.qat_steps,)


def parse_variants(spec: str | None) -> list[str]:
    """``"default,block-ap"`` -> those names (validated); None -> every variant."""
    if not spec:
        return list(VARIANTS)
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))  # each once: rows are per (name, seed)
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; known: {', '.join(VARIANTS)}")
    return names


def summarize(rows: list[dict]) -> list[dict]:
    """Per-variant statistics over seeds on rows with ``variant``, ``seed`` and ``val_ppl``: adds ``n_seeds``,
    ``val_ppl_mean``, ``val_ppl_sem`` (NaN for one seed), ``seconds_mean`` and ``vs_default`` (the separation from
    the ``default`` rows; empty on them, and when no default row exists). Returns the rows (modified in place)."""
    from .ablation import separation

    stats = group_stats(rows, "variant")
    secs: dict[str, list[float]] = {}
    for r in rows:
        secs.setdefault(r["variant"], []).append(float(r["seconds"]))
    base = stats.get("default")
    for r in rows:
        s = stats[r["variant"]]
        r.update(n_seeds=s["n"], val_ppl_mean=s["ppl_mean"], val_ppl_sem=s["ppl_sem"],
                 seconds_mean=sum(secs[r["variant"]]) / len(secs[r["variant"]]),
                 vs_default="" if base is None or s is base else separation(base, s))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rcp_lib.experiments.variants", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--only", help="comma-separated variant names (default: all; see --list)")
    ap.add_argument("--seeds", help="seeds, e.g. 0,1,2 (default: the profile's seed)")
    ap.add_argument("--list", action="store_true", help="print the variants and the seeds cached for each")
    ap.add_argument("--allow-dirty", action="store_true", help="write results from a tree with uncommitted changes")
    ap.add_argument("--set", nargs="*", default=[], help="profile overrides KEY=VALUE (JSON values)")
    ap.add_argument("--replace", action="store_true",
                    help="write results/<profile>/recipe_variants.csv with exactly this run's variants and seeds "
                         "(rows of other code in it are dropped): the regeneration of 07_recipe_search.ipynb")
    args = ap.parse_args(argv)
    if args.allow_dirty:
        os.environ["RCP_ALLOW_DIRTY"] = "1"

    from . import base_model, tokens, write_rows
    from .rows import cached_row
    from ..io import code_fingerprint, require_clean_tree
    from ..paths import results_dir
    from ..profiles import get_profile, parse_set_items

    P = get_profile(args.profile, **parse_set_items(args.set))
    pt = points(GRID)[POINT]
    todo = parse_variants(args.only)
    seeds = parse_seeds(args.seeds, P.seed)

    if args.list:
        for name, (over, steps, what) in VARIANTS.items():
            have = [s for s in SEEDS_SCANNED if sweep_row_path(variant_key(P, name, s)[1]).exists()]
            print(f"{name:20s} {what}; cached at seeds {','.join(map(str, have)) or '-'}")
        return 0
    require_clean_tree()  # fail before hours of training, not after
    out_csv = results_dir(P) / "recipe_variants.csv"
    if not args.replace:
        check_same_code(out_csv, code_fingerprint())
    fp = base_model(P)[0]
    train_ids = tokens(P, "train")

    def write():
        rows = []
        # --replace: exactly this run's variants and seeds; else every variant and seed cached at this code
        for name in (todo if args.replace else VARIANTS):
            for s in (seeds if args.replace else SEEDS_SCANNED):
                path = sweep_row_path(variant_key(P, name, s)[1])
                if path.exists():
                    rows.append({"variant": name, "point": POINT, "overrides_variant": json.dumps(VARIANTS[name][0]),
                                 **json.loads(path.read_text())})
        if not rows:
            return None
        summarize(rows)
        first = ["variant", "seed", "val_ppl", "n_seeds", "val_ppl_mean", "val_ppl_sem", "vs_default", "seconds",
                 "seconds_mean", "step0_val_ppl", "steps", "qat_seqlen", "tokens", "gptq_seconds",
                 "block_ap_mse_ratio", "clip_ratio_init", "clip_ratio_final", "clip_shift", "level_shift",
                 "weight_shift"]
        rows = [{**{k: r[k] for k in first if k in r}, **{k: v for k, v in r.items() if k not in first}} for r in rows]
        return write_rows(rows, P, "recipe_variants")

    t_all = time.perf_counter()
    runs = [(n, s) for n in todo for s in seeds]
    for i, (name, seed) in enumerate(runs):
        Pp, key, steps = variant_key(P, name, seed)
        t0 = time.perf_counter()
        row = cached_row("sweep", key, lambda: score_point(fp, train_ids, pt, Pp, steps))
        print(f"[variants {i + 1}/{len(runs)}] {name} seed {seed}: val ppl {row['val_ppl']:.2f} (step 0 "
              f"{row['step0_val_ppl']:.1f}), {row['seconds']:.0f} s of training [{time.perf_counter() - t0:.0f} s, "
              f"total {time.perf_counter() - t_all:.0f} s]", flush=True)
        if not args.replace:  # rows add up after every run; a regeneration replaces the table once, at the end
            write()
    path = write()
    if path:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
