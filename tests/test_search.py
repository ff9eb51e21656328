"""The recipe search as one job (rcp_lib/experiments/search.py, run by 07_recipe_search.ipynb): the command lines it
runs are the ones behind the committed tables, sized by the profile (seeds, points, budget), with its overrides."""

import json

import pytest

from rcp_lib.experiments import search
from rcp_lib.experiments.registry import SEARCH_NOTEBOOK, TABLES, profile_notebooks
from rcp_lib.experiments.variants import VARIANTS
from rcp_lib.profiles import PROFILES, get_profile


def test_cpu_commands_are_the_committed_tables_commands():
    P = get_profile("cpu")
    sweep, variants, curve = (s.argv(P) for s in search.SEARCHES)
    # the grid and points of results/cpu/recipe_sweep_gptq.csv (weights 2e-5, 2e-4, 1e-3; range 1e-3), 3 seeds
    assert sweep == ["--profile", "cpu", "--name", "recipe_sweep_gptq", "--grid", "lr_quant=1e-2", "grad_clip=0.3",
                     "init=search", "lr_weights=2e-5,2e-4,1e-3", "lr_range=1e-3,1e-2", "--only", "0,2,4",
                     "--seeds", "0,1,2", "--replace"]
    assert variants == ["--profile", "cpu", "--only", ",".join(VARIANTS), "--seeds", "0,1,2", "--replace"]
    assert curve == ["--profile", "cpu", "--steps", str(16 * P.qat_steps), "--val-every", str(P.qat_steps)]
    assert curve[3] == "640"  # the committed curve's length (results/cpu-879e80c6/qat_tokens.csv)
    assert [s.table for s in search.SEARCHES] == ["recipe_sweep_gptq", "recipe_variants", "qat_tokens"]
    assert all(TABLES[s.table].notebook == SEARCH_NOTEBOOK for s in search.SEARCHES)


def test_profile_sizes_and_overrides_reach_the_commands():
    smoke = get_profile("smoke")
    sweep, variants, _ = (s.argv(smoke) for s in search.SEARCHES)
    assert sweep[sweep.index("--only") + 1] == "0" and sweep[sweep.index("--seeds") + 1] == "0"
    assert variants[variants.index("--only") + 1] == "default"
    P = get_profile("cpu", qat_steps=41, search_seeds=[3, 4])
    argv = search.SEARCHES[0].argv(P)
    assert argv[argv.index("--seeds") + 1] == "3,4"
    sets = argv[argv.index("--set") + 1:]
    assert {k: json.loads(v) for k, v in (a.split("=", 1) for a in sets)} == P.overrides
    cmd = search.SEARCHES[0].command(P)
    assert cmd.startswith("python -m rcp_lib.experiments.sweep --profile cpu") and "'search_seeds=[3, 4]'" in cmd


def test_no_profile_runs_the_search_unless_named():
    for p in PROFILES.values():
        assert SEARCH_NOTEBOOK not in profile_notebooks(p)


def test_a_failing_search_stops_the_job(monkeypatch, capsys):
    calls = []

    def refuse(argv):
        calls.append(argv)
        raise SystemExit("refused: a one-line reason")

    import rcp_lib.experiments.sweep as sweep_mod

    monkeypatch.setattr(sweep_mod, "main", refuse)
    with pytest.raises(RuntimeError, match="recipe_sweep_gptq: `python -m rcp_lib.experiments.sweep"):
        search.run(get_profile("smoke"))
    assert len(calls) == 1 and "refused: a one-line reason" in capsys.readouterr().out
