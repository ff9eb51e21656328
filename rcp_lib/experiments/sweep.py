"""QAT recipe sweep: RCP W2A4KV4 over a grid of learning rates, gradient clip and clip initialisation at a fixed token
budget, selected by validation perplexity on the held-out tail of the TRAIN split (never the test split).

    python -m rcp_lib.experiments.sweep --profile cpu                      # the whole grid (48 points)
    python -m rcp_lib.experiments.sweep --profile cpu --list               # print the grid with indices
    python -m rcp_lib.experiments.sweep --profile cpu --only 0-5,12        # a part of it (indices of --list)
    python -m rcp_lib.experiments.sweep --profile cpu --grid lr_quant=1e-2,3e-3 init=search --steps 80
    python -m rcp_lib.experiments.sweep --profile cpu --only 35,41,43 --seeds 0,1,2   # the same points at 3 seeds

Grid (issue "a recipe under which Clip and Partition actually learn", item 3): ``lr_quant`` in {1e-3, 3e-3, 1e-2},
``lr_weights`` in {2e-5, 5e-5, 1e-4, 2e-4}, ``grad_clip`` in {1.0, 0.3}, ``lr_range`` in {None} (the learnable range's
rate, issue 35: a log-multiplier of the start's range with ``range_param: log``; None: the profile's QAT recipe's), ``init`` in {const, search} (``search``: the
searched per-group clip and Lloyd-Max levels inside it, ``{"clip_init": "mse", "ldp_init": "lloyd"}``; ``const``: the
constant start, ``{"clip_init": "const", "ldp_init": "uniform"}``: the clip logit ``lwc_init`` and uniform levels;
either merged over the other start fields of the profile's QAT recipe). A point is the profile with these fields in
``qat_overrides`` (on top of its QAT recipe file, ``Profile.qat_recipe``); everything else is the profile's recipe
(``--set`` overrides profile fields, e.g. ``--set qat_seqlen=512``), its start included: since
``rcp_lib/experiments/variants.py`` that is a GPTQ start with a static range, while the committed
``results/cpu/recipe_sweep.csv`` ran before, under the searched start without GPTQ (each row's ``config`` says which);
``--set 'qat_overrides={"qat": {"gptq_start": false}, "quant": {"weight": {"range_mode": "relative", "range_param":
"absolute"}}}'`` trains that start again (``lr_range`` then has nothing to train, but stays in the config: such rows get
new cache keys). The GPTQ start of a seed is computed once and cached (:func:`rcp_lib.experiments.gptq_start`), so the
points of a seed share it. Every point trains from the same rotated, quantized start for ``--steps``
steps (default ``qat_steps``; tokens = steps x qat_seqlen x batch) and is scored before the first step and after the
last on ``sweep_val_windows`` windows of ``seqlen`` tokens, evenly spread over the held-out tail
(``QATConfig.holdout_fraction``) of the train split, which the training never sees.

Resumable: each point's row is cached (``cache_dir()/rows/sweep-<hash>.json``, keyed by the recipe, budget, validation
windows and code), and after every point ``results/<profile>/recipe_sweep.csv`` is rewritten atomically with every
point of the grid that has a cached row (so sub-grids run in several sessions add up), its provenance, and
``best = True`` on the rows of the selected point. With ``--replace`` (a regeneration, ``07_recipe_search.ipynb``) it
is written once, when every run is done, with exactly this run's points and seeds.

Seeds (``--seeds``; default: the profile's ``seed``) set the R1 signs and the QAT data order of a point. One row per
(point, seed); every row carries its point's ``n_seeds``, ``val_ppl_mean`` and ``val_ppl_sem`` (standard error of the
mean) over the seeds cached for it (seeds 0..9 are looked up), and ``vs_best``: its order against the selected point
only from Welch's t-test on log perplexity, p < 0.05 (:func:`rcp_lib.experiments.ablation.separation`), else "not
separable at this budget". The selected point has the lowest mean among the points run at the most seeds, so a point
run once cannot win on one lucky seed. Results are refused from a dirty tree unless ``--allow-dirty``. Run it alone:
two torch jobs on 2 cores slow each other more than 10x.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time

GRID: dict[str, list] = {"lr_quant": [1e-3, 3e-3, 1e-2], "lr_weights": [2e-5, 5e-5, 1e-4, 2e-4],
                         "grad_clip": [1.0, 0.3], "init": ["const", "search"], "lr_range": [None]}
SEARCH_INIT = {"clip_init": "mse", "ldp_init": "lloyd"}
# explicit: since the profiles default to the searched start, "the profile's own start" would be SEARCH_INIT too
# (a first version did that, and every const point reused its search twin's cached row)
CONST_INIT = {"clip_init": "const", "ldp_init": "uniform"}


def parse_grid(items: list[str] | None) -> dict[str, list]:
    """``["lr_quant=1e-3,1e-2", "init=search"]`` -> the default grid with those axes replaced."""
    grid = {k: list(v) for k, v in GRID.items()}
    for item in items or []:
        key, sep, vals = item.partition("=")
        if not sep or key not in GRID:
            raise SystemExit(f"--grid expects AXIS=v1,v2 with AXIS in {sorted(GRID)}, got {item!r}")
        if key == "init":
            bad = set(vals.split(",")) - {"const", "search"}
            if bad:
                raise SystemExit(f"init values are const/search, got {sorted(bad)}")
            grid[key] = vals.split(",")
        else:  # "none" (lr_range): the recipe's own value
            grid[key] = [None if v.lower() == "none" else float(v) for v in vals.split(",")]
    return grid


def points(grid: dict[str, list]) -> list[dict]:
    """The grid's points in a fixed order (lr_quant, lr_weights, grad_clip, init, lr_range)."""
    keys = list(GRID)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def parse_only(spec: str | None, n: int) -> list[int]:
    """``"0-5,12"`` -> [0, 1, 2, 3, 4, 5, 12] (validated against ``n`` points)."""
    if not spec:
        return list(range(n))
    out: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        lo, hi = int(a), int(b) if b else int(a)
        out += list(range(lo, hi + 1))
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise SystemExit(f"--only indices {bad} are outside the grid (0..{n - 1}); see --list")
    return out


def check_same_code(csv_path, code: str) -> None:
    """Refuse to run when ``csv_path`` holds points of another code version: the CSV is rewritten from the points
    cached at *this* code, so those points would silently disappear from it. Exits with a one-line message."""
    import csv

    if not csv_path.exists():
        return
    with open(csv_path, newline="") as f:
        other = sorted({r.get("code_fingerprint", "?") for r in csv.DictReader(f)} - {code})
    if other:
        raise SystemExit(f"{csv_path} holds sweep points computed with code {', '.join(other)} (this checkout: {code}); "
                         f"rewriting it would drop them: write this sweep elsewhere with --name, or move that file "
                         f"away first to start the sweep over at this code")


#: seeds whose cached rows a rewrite of the CSV looks up (``--seeds`` may run any of them)
SEEDS_SCANNED = range(10)


def parse_seeds(spec: str | None, default: int) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; None -> ``[default]`` (the profile's seed). Seeds must lie in :data:`SEEDS_SCANNED`."""
    if not spec:
        return [default]
    try:
        out = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise SystemExit(f"--seeds expects comma-separated integers, got {spec!r}") from None
    bad = [x for x in out if x not in SEEDS_SCANNED]
    if bad:
        raise SystemExit(f"--seeds {bad} outside {SEEDS_SCANNED.start}..{SEEDS_SCANNED.stop - 1}")
    return out


def group_stats(rows: list[dict], key: str, label=str) -> dict:
    """Validation perplexity over seeds per value of ``rows[i][key]``: ``{value: {"method": label(value), "vals",
    "n", "ppl_mean", "ppl_sem"}}`` (standard error of the mean, NaN for one seed): the summary rows that
    :func:`rcp_lib.experiments.ablation.separation` compares."""
    import math

    stats: dict = {}
    for r in rows:
        stats.setdefault(r[key], {"method": label(r[key]), "vals": []})["vals"].append(float(r["val_ppl"]))
    for s in stats.values():
        v, n = s["vals"], len(s["vals"])
        s["n"], s["ppl_mean"] = n, sum(v) / n
        s["ppl_sem"] = math.sqrt(sum((x - s["ppl_mean"]) ** 2 for x in v) / (n - 1) / n) if n > 1 else math.nan
    return stats


def select(rows: list[dict]) -> list[dict]:
    """Per-point statistics over seeds and the selection, on rows with ``point``, ``seed`` and ``val_ppl``: adds
    ``n_seeds``, ``val_ppl_mean``, ``val_ppl_sem`` (NaN for one seed), ``best`` (the lowest mean among the points
    with the most seeds) and ``vs_best`` (:func:`rcp_lib.experiments.ablation.separation` against the best point;
    empty on the best point's rows). Returns the rows (modified in place)."""
    from .ablation import separation

    stats = group_stats(rows, "point", lambda p: f"point {p}")
    most = max(s["n"] for s in stats.values())
    best = min((p for p, s in stats.items() if s["n"] == most), key=lambda p: stats[p]["ppl_mean"])
    for r in rows:
        s = stats[r["point"]]
        r.update(n_seeds=s["n"], val_ppl_mean=s["ppl_mean"], val_ppl_sem=s["ppl_sem"], best=r["point"] == best,
                 vs_best="" if r["point"] == best else separation(stats[best], s))
    return rows


def with_recipe(over: dict, qat: dict | None = None, weight: dict | None = None) -> dict:
    """``qat_overrides`` (``{"qat": {...}, "quant": {"weight": {...}}}``) with these QATConfig / start fields on top."""
    q = {**(over.get("qat") or {}), **(qat or {})}
    w = {**((over.get("quant") or {}).get("weight") or {}), **(weight or {})}
    return {**({"qat": q} if q else {}), **({"quant": {"weight": w}} if w else {})}


def point_profile(P, pt: dict, steps: int):
    """The profile of one grid point: its learning rates, gradient clip and start in ``qat_overrides`` (over those
    ``P`` has), ``steps`` QAT steps validated once."""
    rates = {"lr_quant": pt["lr_quant"], "lr_weights": pt["lr_weights"], "grad_clip": pt["grad_clip"]}
    if pt.get("lr_range") is not None:  # None: the recipe's own (so the points run before this axis keep their keys)
        rates["lr_range"] = pt["lr_range"]
    over = with_recipe(P.qat_overrides, rates,
                       SEARCH_INIT if pt["init"] == "search" else CONST_INIT)
    return P.with_overrides(qat_overrides=over, qat_steps=steps, qat_val_every=max(steps, 1))


#: the row every point trains
METHOD = ("RCP", "W2A4KV4")


def sweep_key(P, pt: dict, seed: int, steps: int):
    """``(profile of the point at this seed, cache key of its row)``: the recipe (which holds every QAT field, Block-AP
    and GPTQ start included), the model, corpus, validation windows and code; with a GPTQ start also the calibration
    windows (so a point without one has the key it always had)."""
    from . import method, method_config
    from .rows import code_key

    Pp = point_profile(P.with_overrides(seed=seed), pt, steps)
    config = method_config(method(*METHOD), Pp)
    key = {"method": config, "model": Pp.model, "corpus": Pp.corpus,
           "val_seqlen": Pp.seqlen, "val_windows": Pp.sweep_val_windows, "code": code_key(Pp.device)}
    if config["qat"]["gptq_start"]:
        key["calib"] = [Pp.calib_windows, Pp.calib_seqlen]
    return Pp, key


def sweep_row_path(key: dict):
    """Where the row of ``key`` (:func:`sweep_key`) is cached."""
    from .rows import cache_name
    from ..paths import cache_dir

    return cache_dir() / "rows" / f"{cache_name('sweep', key)}.json"


def score_point(fp, train_ids, pt: dict, Pp, steps: int) -> dict:
    """Train RCP W2A4KV4 under the point's profile ``Pp`` from the FP model ``fp`` (rotate, quantize, the GPTQ start
    when its recipe has one: calibration windows of the train part, never the held-out tail; then QAT on
    ``train_ids``, the tokenized train split) and score it on the held-out tail before the first step and after the
    last. Returns the row (without the point index): the point, budget, perplexities, movement, ``seconds`` (GPTQ +
    Block-AP + training, without the evaluations), Block-AP's mean MSE ratio (after / before, NaN without it),
    config and provenance."""
    import math

    from ..data import calibration_windows, split_holdout
    from ..evaluation import perplexity
    from . import gptq_start, method, method_config, start_key, train_student
    from ..io import provenance
    from ..quant.apply import quantize_model
    from ..rotation.fuse import rotate_model

    m = method(*METHOD)
    recipe = m.recipe(Pp)
    train_part, val = split_holdout(train_ids, recipe.qat.holdout_fraction)

    def val_ppl(model):
        return perplexity(model, val, seqlen=Pp.seqlen, max_windows=Pp.sweep_val_windows, spread=True, progress=False)

    model = copy.deepcopy(fp).float()  # as build(): quantized rows start from fp32 weights (a no-op on the CPU)
    rotate_model(model, recipe.rotation)
    quantize_model(model, recipe.quant)
    gptq_s = 0.0
    if recipe.qat.gptq_start:  # cached: the points of one seed share it
        gptq_s = gptq_start(model, calibration_windows(train_part, Pp.calib_windows, Pp.calib_seqlen, seed=Pp.seed),
                            key=start_key(Pp, recipe))
    stats = train_student(model, fp, Pp, recipe.qat, out_dir=None, progress=True, step0_eval=val_ppl, data=train_ids)
    ppl = val_ppl(model)
    del model
    bap = stats.get("block_ap") or []
    return {**pt, "steps": steps, "qat_seqlen": Pp.qat_seqlen, "tokens": stats["tokens"], "val_ppl": ppl,
            "step0_val_ppl": stats["step0_ppl"], **{k: stats[k] for k in (
                "clip_ratio_init", "clip_ratio_final", "clip_shift", "level_shift", "weight_shift", "code_flips")},
            "seconds": round(stats["seconds"] + gptq_s, 1), "gptq_seconds": round(gptq_s, 1),
            "block_ap_mse_ratio": (sum(b["mse_after"] / b["mse_before"] for b in bap) / len(bap) if bap else math.nan),
            "val_split": f"train tail ({recipe.qat.holdout_fraction:g}), {Pp.sweep_val_windows} windows spread",
            "val_seqlen": Pp.seqlen, "model": Pp.model, "corpus": Pp.corpus, "seed": Pp.seed,
            "config": method_config(m, Pp), **provenance()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rcp_lib.experiments.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="QAT steps per point (default: the profile's qat_steps)")
    ap.add_argument("--grid", nargs="*", help="replace grid axes: AXIS=v1,v2 (lr_quant, lr_weights, grad_clip, init, "
                                              "lr_range)")
    ap.add_argument("--only", help="run only these point indices (e.g. 0-5,12; see --list)")
    ap.add_argument("--list", action="store_true", help="print the grid with indices and whether each is cached")
    ap.add_argument("--set", nargs="*", default=[], help="profile overrides KEY=VALUE (JSON values)")
    ap.add_argument("--seeds", help="run each point at these seeds, e.g. 0,1,2 (default: the profile's seed)")
    ap.add_argument("--name", default="recipe_sweep", help="results/<profile>/<name>.csv")
    ap.add_argument("--allow-dirty", action="store_true", help="write results from a tree with uncommitted changes")
    ap.add_argument("--replace", action="store_true",
                    help="write results/<profile>/<name>.csv with exactly this run's points and seeds (points of other "
                         "code in it are dropped): the regeneration of 07_recipe_search.ipynb")
    args = ap.parse_args(argv)
    if args.allow_dirty:
        os.environ["RCP_ALLOW_DIRTY"] = "1"

    from ..profiles import parse_set_items
    from . import base_model, tokens, write_rows
    from .rows import cached_row
    from ..io import code_fingerprint, require_clean_tree
    from ..paths import results_dir
    from ..profiles import get_profile

    P = get_profile(args.profile, **parse_set_items(args.set))
    steps = args.steps or P.qat_steps
    grid = parse_grid(args.grid)
    pts = points(grid)
    todo = parse_only(args.only, len(pts))
    seeds = parse_seeds(args.seeds, P.seed)

    def key_of(pt, seed):
        return sweep_key(P, pt, seed, steps)

    def row_path(pt, seed):
        return sweep_row_path(key_of(pt, seed)[1])

    def cached(pt, seed) -> bool:
        return row_path(pt, seed).exists()

    if args.list:
        for i, pt in enumerate(pts):
            have = [s for s in SEEDS_SCANNED if cached(pt, s)]
            print(f"{i:3d} {pt} {'cached at seeds ' + ','.join(map(str, have)) if have else ''}")
        return 0
    require_clean_tree()  # fail before hours of training, not after
    if not args.replace:
        check_same_code(results_dir(P) / f"{args.name}.csv", code_fingerprint())

    fp = base_model(P)[0]
    train_ids = tokens(P, "train")

    def write():
        rows = []
        # --replace: exactly this run's points and seeds; else every point and seed cached at this code
        for i, pt in enumerate(pts):
            if args.replace and i not in todo:
                continue
            for s in (seeds if args.replace else SEEDS_SCANNED):
                if cached(pt, s):
                    rows.append({"point": i, **json.loads(row_path(pt, s).read_text())})
        if not rows:
            return None
        select(rows)
        first = ["point", *GRID, "seed", "best", "val_ppl", "n_seeds", "val_ppl_mean", "val_ppl_sem", "vs_best",
                 "step0_val_ppl", "steps", "tokens", "clip_ratio_init", "clip_ratio_final", "clip_shift", "level_shift",
                 "weight_shift", "seconds"]
        rows = [{**{k: r[k] for k in first if k in r}, **{k: v for k, v in r.items() if k not in first}} for r in rows]
        return write_rows(rows, P, args.name), next(r for r in rows if r["best"])

    t_all = time.perf_counter()
    runs = [(i, s) for i in todo for s in seeds]
    for n, (i, seed) in enumerate(runs):
        pt = pts[i]
        Pp, key = key_of(pt, seed)
        t0 = time.perf_counter()
        row = cached_row("sweep", key, lambda: score_point(fp, train_ids, pt, Pp, steps))
        print(f"[sweep {n + 1}/{len(runs)}] point {i} seed {seed} {pt}: val ppl {row['val_ppl']:.2f} (step 0 "
              f"{row['step0_val_ppl']:.1f}), clip {row['clip_ratio_init']:.3f}->{row['clip_ratio_final']:.3f} "
              f"(mean |change| {row.get('clip_shift', float('nan')):.4f}), "
              f"level shift {row['level_shift']:.4f} [{time.perf_counter() - t0:.0f} s, total "
              f"{time.perf_counter() - t_all:.0f} s]", flush=True)
        if not args.replace:  # a sub-grid adds up after every point; a regeneration replaces the table once, at the end
            written = write()
    written = write()
    if written:
        path, best = written
        print(f"{path}\nbest so far: {({k: best[k] for k in GRID})} val ppl {best['val_ppl_mean']:.2f} (mean of "
              f"{best['n_seeds']} seed(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
