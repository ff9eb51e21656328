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


class _Captured(Exception):
    pass


def _capture(monkeypatch, target: str):
    """Make ``rcp_lib.experiments.<target>`` raise with the profile it is called with (the commands' first use of the
    profile after parsing their arguments)."""
    import rcp_lib.experiments as X

    def grab(P, *a, **k):
        raise _Captured(P)

    monkeypatch.setattr(X, target, grab)


@pytest.mark.parametrize("overrides", [{}, {"qat_steps": 3, "search_seeds": [1, 2]}])
def test_each_command_writes_into_the_folder_the_notebook_reads(monkeypatch, overrides):
    """The profile each command builds from its command line is the notebook's profile (the curve's with its length),
    overrides included (qat_steps in --set no longer clashes with the curve's --steps)."""
    import importlib

    P = get_profile("smoke", **overrides)
    want = {"sweep": P, "variants": P, "curve": search.curve_profile(P)}
    for s in search.SEARCHES:
        _capture(monkeypatch, "token_curve" if s.module == "curve" else "base_model")
        with pytest.raises(_Captured) as e:
            importlib.import_module(f"rcp_lib.experiments.{s.module}").main(s.argv(P))
        got = e.value.args[0]
        assert got.run_name == want[s.module].run_name and got.overrides == want[s.module].overrides, s.module
        assert (got.qat_steps, got.qat_val_every) == (want[s.module].qat_steps, want[s.module].qat_val_every)
    assert search.curve_profile(P).qat_steps == P.search_curve_length * P.qat_steps
    assert get_profile("cpu").search_curve_length == 16  # the curve the cpu recipe's README names


def test_bad_search_sizes_are_refused():
    with pytest.raises(ValueError, match="search_points must be at least 1"):
        search.SEARCHES[0].argv(get_profile("smoke", search_points=0))
    with pytest.raises(ValueError, match="search_seeds must name at least one seed"):
        search.SEARCHES[0].argv(get_profile("smoke", search_seeds=[]))
    with pytest.raises(ValueError, match="search_curve_length must be at least 1"):
        search.SEARCHES[2].argv(get_profile("smoke", search_curve_length=0))


def test_a_variant_keeps_the_runs_own_qat_overrides_where_it_pins_nothing():
    from rcp_lib.experiments.variants import VARIANTS, variant_profile

    P = get_profile("cpu", qat_overrides={"qat": {"lr_quant": 3e-3}})
    Pv = variant_profile(P, VARIANTS["gptq-static"][0])
    assert Pv.qat_overrides["qat"]["lr_quant"] == 3e-3  # the run's
    assert Pv.qat_overrides["qat"]["gptq_start"] is True and Pv.qat_overrides["qat"]["lr_range"] == 1e-4  # pinned
    assert Pv.qat_overrides["quant"]["weight"]["range_mode"] == "static"
    # without overrides of its own the variant's profile is exactly its pinned start (the committed rows' keys)
    P0 = get_profile("cpu")
    assert variant_profile(P0, VARIANTS["gptq-static"][0]).qat_overrides == VARIANTS["gptq-static"][0]["qat_overrides"]


def test_replace_writes_exactly_the_runs_points_and_seeds(monkeypatch, tmp_path):
    """Without --replace the sweep's CSV collects every point and seed cached at this code (sub-grids add up); with
    it, exactly the points and seeds of this run."""
    import csv

    import rcp_lib.experiments as X
    import rcp_lib.experiments.sweep as S

    monkeypatch.setenv("RCP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RCP_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(X, "base_model", lambda P: (None, None))
    monkeypatch.setattr(X, "tokens", lambda P, split: None)

    def fake_point(fp, train_ids, pt, Pp, steps):
        return {**pt, "seed": Pp.seed, "val_ppl": 100.0 + Pp.seed + 10 * pt["lr_weights"], "step0_val_ppl": 200.0,
                "clip_ratio_init": 1.0, "clip_ratio_final": 1.0, "clip_shift": 0.0, "level_shift": 0.0}

    monkeypatch.setattr(S, "score_point", fake_point)
    grid = ["--grid", *search.SWEEP_GPTQ_GRID]
    out = tmp_path / "results" / "smoke" / "t.csv"

    def points_seeds():
        return sorted({(int(r["point"]), int(r["seed"])) for r in csv.DictReader(out.open())})

    assert S.main(["--profile", "smoke", "--name", "t", *grid, "--only", "0,2", "--seeds", "0,1"]) == 0
    assert S.main(["--profile", "smoke", "--name", "t", *grid, "--only", "4", "--seeds", "2"]) == 0
    assert points_seeds() == [(0, 0), (0, 1), (2, 0), (2, 1), (4, 2)]  # sub-grids add up
    assert S.main(["--profile", "smoke", "--name", "t", *grid, "--only", "0", "--seeds", "1", "--replace"]) == 0
    assert points_seeds() == [(0, 1)]


def test_a_variant_named_twice_runs_once():
    from rcp_lib.experiments.variants import parse_variants

    assert parse_variants("default,default,block-ap") == ["default", "block-ap"]
