"""The recipe search behind a profile's QAT recipe, as one job: ``07_recipe_search.ipynb`` runs :func:`run`
(``python -m rcp_lib reproduce --profile cpu --notebooks 07_recipe_search.ipynb``), so that the tables that chose the
recipe are regenerated at one commit like every other table. Each search is one of the resumable commands of this
package, called with the profile (and its overrides) and the profile's ``search_seeds``:

1. ``recipe_sweep_gptq`` (:mod:`.sweep`): the learning rates under the recipe's GPTQ start, the weights' (so that
   codes can flip) and the scale-free range's, at the learning rate, gradient clip and start the first sweep chose;
2. ``recipe_variants`` (:mod:`.variants`): that point against Block-AP, a GPTQ start with a static range and QAT at
   the evaluation length, at (about) equal CPU time;
3. ``qat_tokens`` (:mod:`.curve`): the profile's RCP W2A4KV4 recipe trained ``search_curve_length`` times its QAT budget,
   validated after every budget's worth of steps (written to the profile's folder with those two overrides,
   ``results/<profile>-<hash>/``, where :func:`rcp_lib.report.token_curve_file` finds it).

Not rerun here: ``results/cpu/recipe_sweep.csv``, the first grid (run under the searched start without GPTQ, before
the GPTQ start became the recipe), which chose ``lr_quant`` 1e-2, gradient clip 0.3 and the searched start. Its
points need that start back (``python -m rcp_lib.experiments.sweep --set 'qat_overrides=...'``, its rows' ``config``
says which), which writes to another folder; the file stays the record, at its commit, of how those three were chosen.

Sweeps and variants write their CSV with exactly this run's points and seeds (``--replace``), once every run is
done: a regeneration, not a sub-grid added to an older one, and a stopped run leaves the committed table as it was. On the ``cpu`` profile the three take about 4.5 hours on 2 cores (about 7 minutes a QAT run: 9 sweep
rows, 15 variant rows, a 640-step curve); every finished run is cached, so a stopped job resumes where it stopped.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

from ..profiles import Profile

@dataclass(frozen=True)
class Search:
    """One search: the registry name of the table it writes, the module of this package whose ``main(argv)`` runs
    it, its own arguments, the points it runs (``--only``: grid indices or variant names; ``Profile.search_points``
    keeps the first n), whether it runs once per seed of ``Profile.search_seeds`` and whether it starts its CSV over
    (``--replace``)."""

    table: str
    module: str
    args: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    seeded: bool = True
    replace: bool = True

    def argv(self, profile: Profile) -> list[str]:
        """The command line of this search for ``profile``: its name, points, overrides (``--set``: every field the
        profile overrides, so that each command writes into the profile's own folder) and seeds.

        Raises:
            ValueError: ``search_points`` below 1, or ``search_seeds`` empty.
        """
        if profile.search_points is not None and profile.search_points < 1:
            raise ValueError(f"Profile.search_points must be at least 1 (None: every point), got {profile.search_points}")
        if not profile.search_seeds:
            raise ValueError("Profile.search_seeds must name at least one seed")
        out = ["--profile", profile.name, *self.args]
        if self.only:
            out += ["--only", ",".join(self.only[:profile.search_points])]
        if self.module == "curve":
            c = curve_profile(profile)
            out += ["--steps", str(c.qat_steps), "--val-every", str(c.qat_val_every)]
        if self.seeded:
            out += ["--seeds", ",".join(str(s) for s in profile.search_seeds)]
        if self.replace:
            out.append("--replace")
        if profile.overrides:
            out += ["--set", *(f"{k}={json.dumps(v)}" for k, v in profile.overrides.items())]
        return out

    def command(self, profile: Profile) -> str:
        """The same as one shell line (``python -m rcp_lib.experiments.<module> ...``)."""
        import shlex

        return " ".join(["python", "-m", f"rcp_lib.experiments.{self.module}",
                         *(shlex.quote(a) for a in self.argv(profile))])


def curve_profile(profile: Profile) -> Profile:
    """The profile the token curve trains and writes under (``results/<its run name>/qat_tokens.csv``): ``profile``
    with ``search_curve_length`` times its QAT steps, validated after every ``qat_steps``.

    Raises:
        ValueError: ``search_curve_length`` below 1."""
    if profile.search_curve_length < 1:
        raise ValueError(f"Profile.search_curve_length must be at least 1, got {profile.search_curve_length}")
    return profile.with_overrides(qat_steps=profile.search_curve_length * profile.qat_steps,
                                  qat_val_every=profile.qat_steps)


def _variant_names() -> tuple[str, ...]:
    from .variants import VARIANTS

    return tuple(VARIANTS)


#: the grid of the learning-rate sweep under the GPTQ start (its points 0, 2, 4 run: the weights at 2e-5, 2e-4 and
#: 1e-3, the range at 1e-3; ``python -m rcp_lib.experiments.sweep --grid ... --list`` prints the grid)
SWEEP_GPTQ_GRID = ("lr_quant=1e-2", "grad_clip=0.3", "init=search", "lr_weights=2e-5,2e-4,1e-3", "lr_range=1e-3,1e-2")

SEARCHES: tuple[Search, ...] = (
    Search("recipe_sweep_gptq", "sweep", ("--name", "recipe_sweep_gptq", "--grid", *SWEEP_GPTQ_GRID),
           only=("0", "2", "4")),
    Search("recipe_variants", "variants", only=_variant_names()),
    Search("qat_tokens", "curve", seeded=False, replace=False),
)


def row_plan(profile: Profile) -> list[dict]:
    """The cached runs the searches read or compute, each ``{"table", "row", "cached"}`` (as
    :func:`rcp_lib.experiments.notebook.row_plan`): every sweep point and variant at every seed, and the token
    curve's trained student. Nothing is computed or logged."""
    from .methods import method
    from .rows import qat_key
    from .sweep import parse_grid, points, sweep_key, sweep_row_path
    from .variants import variant_key
    from ..paths import cache_dir

    sweep, variants, _ = SEARCHES
    pts = points(parse_grid(list(SWEEP_GPTQ_GRID)))
    plan = [{"table": sweep.table, "row": f"point {i} seed {seed}",
             "cached": sweep_row_path(sweep_key(profile, pts[int(i)], seed, profile.qat_steps)[1]).exists()}
            for i in sweep.only[:profile.search_points] for seed in profile.search_seeds]
    plan += [{"table": variants.table, "row": f"{name} seed {seed}",
              "cached": sweep_row_path(variant_key(profile, name, seed)[1]).exists()}
             for name in variants.only[:profile.search_points] for seed in profile.search_seeds]
    c = curve_profile(profile)
    student = cache_dir() / "qat" / qat_key(method("RCP", "W2A4KV4"), c) / "student.pt"
    plan.append({"table": "qat_tokens", "row": f"RCP W2A4KV4, {c.qat_steps} steps", "cached": student.exists()})
    return plan


def run(profile: Profile, searches: tuple[Search, ...] = SEARCHES) -> None:
    """Run every search of ``searches`` for ``profile``, in order, each printing its progress; cached runs are
    reused.

    Raises:
        RuntimeError: a search exited with a non-zero status (its own message is printed above).
    """
    for i, s in enumerate(searches):
        print(f"[search {i + 1}/{len(searches)}] {s.table}: {s.command(profile)}", flush=True)
        main = importlib.import_module(f"{__package__}.{s.module}").main
        try:
            rc = main(s.argv(profile))
        except SystemExit as e:  # the commands' one-line refusals (SystemExit() / SystemExit(0): success)
            rc = e.code if isinstance(e.code, int) or e.code is None else 1
            if not (isinstance(e.code, int) or e.code is None):
                print(e.code, flush=True)
        if rc:
            raise RuntimeError(f"{s.table}: `{s.command(profile)}` exited with status {rc}")
