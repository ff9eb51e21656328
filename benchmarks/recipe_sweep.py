"""QAT recipe sweep: RCP W2A4KV4 over a grid of learning rates, gradient clip and clip initialisation at a fixed token
budget, selected by validation perplexity on the held-out tail of the TRAIN split (never the test split).

    python benchmarks/recipe_sweep.py --profile cpu                      # the whole grid (48 points)
    python benchmarks/recipe_sweep.py --profile cpu --list               # print the grid with indices
    python benchmarks/recipe_sweep.py --profile cpu --only 0-5,12        # a part of it (indices of --list)
    python benchmarks/recipe_sweep.py --profile cpu --grid lr_quant=1e-2,3e-3 init=search --steps 80

Grid (issue "a recipe under which Clip and Partition actually learn", item 3): ``lr_quant`` in {1e-3, 3e-3, 1e-2},
``lr_weights`` in {2e-5, 5e-5, 1e-4, 2e-4}, ``grad_clip`` in {1.0, 0.3}, ``init`` in {const, search} (``search``: the
searched per-group clip and Lloyd-Max levels inside it, ``qat_weight={"clip_init": "mse", "ldp_init": "lloyd"}``;
``const``: the constant start, ``{"clip_init": "const", "ldp_init": "uniform"}``: the clip logit ``lwc_init`` and
uniform levels; either merged over the profile's other ``qat_weight`` fields). Everything else is the profile's recipe (``--set`` overrides profile
fields, e.g. ``--set qat_seqlen=512``). Every point trains from the same rotated, quantized start for ``--steps``
steps (default ``qat_steps``; tokens = steps x qat_seqlen x batch) and is scored before the first step and after the
last on ``sweep_val_windows`` windows of ``seqlen`` tokens, evenly spread over the held-out tail
(``QATConfig.holdout_fraction``) of the train split, which the training never sees.

Resumable: each point's row is cached (``cache_dir()/rows/sweep-<hash>.json``, keyed by the recipe, budget, validation
windows and code), and after every point ``results/<profile>/recipe_sweep.csv`` is rewritten atomically with every
point of the grid that has a cached row (so sub-grids run in several sessions add up), its provenance, and
``best = True`` on the row with the lowest validation perplexity. Results are refused from a dirty tree unless
``--allow-dirty``. Run it alone: two torch jobs on 2 cores slow each other more than 10x.
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
                         "grad_clip": [1.0, 0.3], "init": ["const", "search"]}
SEARCH_INIT = {"clip_init": "mse", "ldp_init": "lloyd"}
# explicit: since the profiles default to the searched start, "the profile's own qat_weight" would be SEARCH_INIT too
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
        else:
            grid[key] = [float(v) for v in vals.split(",")]
    return grid


def points(grid: dict[str, list]) -> list[dict]:
    """The grid's points in a fixed order (lr_quant, lr_weights, grad_clip, init)."""
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


def point_profile(P, pt: dict, steps: int):
    """The profile of one grid point."""
    qw = {**P.qat_weight, **(SEARCH_INIT if pt["init"] == "search" else CONST_INIT)}
    return P.with_overrides(qat_lr_quant=pt["lr_quant"], qat_lr_weights=pt["lr_weights"],
                            qat_grad_clip=pt["grad_clip"], qat_weight=qw, qat_steps=steps,
                            qat_val_every=max(steps, 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="QAT steps per point (default: the profile's qat_steps)")
    ap.add_argument("--grid", nargs="*", help="replace grid axes: AXIS=v1,v2 (lr_quant, lr_weights, grad_clip, init)")
    ap.add_argument("--only", help="run only these point indices (e.g. 0-5,12; see --list)")
    ap.add_argument("--list", action="store_true", help="print the grid with indices and whether each is cached")
    ap.add_argument("--set", nargs="*", default=[], help="profile overrides KEY=VALUE (JSON values)")
    ap.add_argument("--name", default="recipe_sweep", help="results/<profile>/<name>.csv")
    ap.add_argument("--allow-dirty", action="store_true", help="write results from a tree with uncommitted changes")
    args = ap.parse_args(argv)
    if args.allow_dirty:
        os.environ["RCP_ALLOW_DIRTY"] = "1"

    from rcp_lib.__main__ import _parse_overrides
    from rcp_lib.data import split_holdout
    from rcp_lib.evaluation import perplexity
    from rcp_lib.experiments import base_model, method, method_config, tokens, train_student, write_rows
    from rcp_lib.experiments.rows import _cached, _code, cache_name
    from rcp_lib.io import provenance, require_clean_tree
    from rcp_lib.paths import cache_dir, results_dir
    from rcp_lib.profiles import get_profile
    from rcp_lib.quant.apply import quantize_model
    from rcp_lib.rotation.fuse import rotate_model

    P = get_profile(args.profile, **_parse_overrides(args.set))
    steps = args.steps or P.qat_steps
    grid = parse_grid(args.grid)
    pts = points(grid)
    todo = parse_only(args.only, len(pts))
    m = method("RCP", "W2A4KV4")

    def key_of(pt):
        Pp = point_profile(P, pt, steps)
        return Pp, {"method": method_config(m, Pp), "model": Pp.model, "corpus": Pp.corpus, "val_seqlen": Pp.seqlen,
                    "val_windows": Pp.sweep_val_windows, "code": _code()}

    def row_path(pt):
        return cache_dir() / "rows" / f"{cache_name('sweep', key_of(pt)[1])}.json"

    def cached(pt) -> bool:
        return row_path(pt).exists()

    if args.list:
        for i, pt in enumerate(pts):
            print(f"{i:3d} {pt} {'cached' if cached(pt) else ''}")
        return 0
    require_clean_tree()  # fail before hours of training, not after
    check_same_code(results_dir(P) / f"{args.name}.csv", _code())

    fp = base_model(P)[0]
    train_ids = tokens(P, "train")

    def compute(pt, Pp):
        recipe = m.recipe(Pp)
        _, val = split_holdout(train_ids, recipe.qat.holdout_fraction)

        def val_ppl(model):
            return perplexity(model, val, seqlen=Pp.seqlen, max_windows=Pp.sweep_val_windows, spread=True,
                              progress=False)

        model = copy.deepcopy(fp)
        rotate_model(model, recipe.rotation)
        quantize_model(model, recipe.quant)
        stats = train_student(model, fp, Pp, recipe.qat, out_dir=None, progress=True, step0_eval=val_ppl,
                              data=train_ids)
        ppl = val_ppl(model)
        del model
        return {**pt, "steps": steps, "qat_seqlen": Pp.qat_seqlen, "tokens": stats["tokens"], "val_ppl": ppl,
                "step0_val_ppl": stats["step0_ppl"], **{k: stats[k] for k in (
                    "clip_ratio_init", "clip_ratio_final", "clip_shift", "level_shift", "weight_shift", "seconds")},
                "val_split": f"train tail ({recipe.qat.holdout_fraction:g}), {Pp.sweep_val_windows} windows spread",
                "val_seqlen": Pp.seqlen, "model": Pp.model, "corpus": Pp.corpus, "seed": Pp.seed,
                "config": method_config(m, Pp), **provenance()}

    def write():
        rows = []
        for i, pt in enumerate(pts):
            if cached(pt):
                rows.append({"point": i, **json.loads(row_path(pt).read_text())})
        if not rows:
            return None
        best = min(range(len(rows)), key=lambda j: rows[j]["val_ppl"])
        first = ["point", *GRID, "best", "val_ppl", "step0_val_ppl", "steps", "tokens", "clip_ratio_init",
                 "clip_ratio_final", "clip_shift", "level_shift", "weight_shift", "seconds"]
        for j, r in enumerate(rows):
            r["best"] = j == best
            rows[j] = {**{k: r[k] for k in first if k in r}, **{k: v for k, v in r.items() if k not in first}}
        return write_rows(rows, P, args.name), rows[best]

    t_all = time.perf_counter()
    for n, i in enumerate(todo):
        pt = pts[i]
        Pp, key = key_of(pt)
        t0 = time.perf_counter()
        row = _cached("sweep", key, lambda: compute(pt, Pp))
        print(f"[sweep {n + 1}/{len(todo)}] point {i} {pt}: val ppl {row['val_ppl']:.2f} (step 0 "
              f"{row['step0_val_ppl']:.1f}), clip {row['clip_ratio_init']:.3f}->{row['clip_ratio_final']:.3f} "
              f"(mean |change| {row.get('clip_shift', float('nan')):.4f}), "
              f"level shift {row['level_shift']:.4f} [{time.perf_counter() - t0:.0f} s, total "
              f"{time.perf_counter() - t_all:.0f} s]", flush=True)
        written = write()
    written = write()
    if written:
        path, best = written
        print(f"{path}\nbest so far: {({k: best[k] for k in GRID})} val ppl {best['val_ppl']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
