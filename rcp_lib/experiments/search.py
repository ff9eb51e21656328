"""The recipe search behind a profile's QAT recipe, as one job: ``07_recipe_search.ipynb`` runs :func:`run`
(``python -m rcp_lib reproduce --profile cpu --notebooks 07_recipe_search.ipynb``), so that the tables that chose the
recipe are regenerated at one commit like every other table. Each search is one of the resumable commands of this
package, called with the profile (and its overrides) and the profile's ``search_seeds``:

1. ``recipe_sweep_gptq`` (:mod:`.sweep`): the learning rates under the recipe's GPTQ start, the weights' (so that
   codes can flip) and the scale-free range's, at the learning rate, gradient clip and start the first sweep chose;
2. ``recipe_variants`` (:mod:`.variants`): that point against Block-AP, a GPTQ start with a static range and QAT at
   the evaluation length, at (about) equal CPU time;
3. ``qat_tokens`` (:mod:`.curve`): the profile's RCP W2A4KV4 recipe trained :data:`CURVE_LENGTH` times its QAT budget,
   validated after every budget's worth of steps (written to the profile's folder with those two overrides,
   ``results/<profile>-<hash>/``, where :func:`rcp_lib.report.token_curve_file` finds it).

Not rerun here: ``results/cpu/recipe_sweep.csv``, the first grid (run under the searched start without GPTQ, before
the GPTQ start became the recipe), which chose ``lr_quant`` 1e-2, gradient clip 0.3 and the searched start. Its
points need that start back (``python -m rcp_lib.experiments.sweep --set 'qat_overrides=...'``, its rows' ``config``
says which), which writes to another folder; the file stays the record, at its commit, of how those three were chosen.

Sweeps and variants start their CSV over at this code (``--replace``): a regeneration, not a sub-grid added to an
older one. On the ``cpu`` profile the three take about 4.5 hours on 2 cores (about 7 minutes a QAT run: 9 sweep
rows, 15 variant rows, a 640-step curve); every finished run is cached, so a stopped job resumes where it stopped.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

from ..profiles import Profile

#: the token curve trains this many times the profile's QAT steps, validated after every ``qat_steps``
CURVE_LENGTH = 16


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
        """The command line of this search for ``profile``: its name, points, overrides (``--set``) and seeds."""
        out = ["--profile", profile.name, *self.args]
        if self.only:
            out += ["--only", ",".join(self.only[:profile.search_points])]
        if self.module == "curve":
            out += ["--steps", str(CURVE_LENGTH * profile.qat_steps), "--val-every", str(profile.qat_steps)]
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


def _variant_names() -> tuple[str, ...]:
    from .variants import VARIANTS

    return tuple(VARIANTS)


SEARCHES: tuple[Search, ...] = (
    # the grid's points 0, 2, 4: weights at 2e-5, 2e-4 and 1e-3, the range at 1e-3 (--list prints the grid)
    Search("recipe_sweep_gptq", "sweep", ("--name", "recipe_sweep_gptq", "--grid", "lr_quant=1e-2", "grad_clip=0.3",
                                          "init=search", "lr_weights=2e-5,2e-4,1e-3", "lr_range=1e-3,1e-2"),
           only=("0", "2", "4")),
    Search("recipe_variants", "variants", only=_variant_names()),
    Search("qat_tokens", "curve", seeded=False, replace=False),
)


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
        except SystemExit as e:  # the commands' one-line refusals
            rc = e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, int):
                print(e.code, flush=True)
        if rc:
            raise RuntimeError(f"{s.table}: `{s.command(profile)}` exited with status {rc}")
