"""The recipe sweep script's guards and grid (no training here)."""

import pytest

from rcp_lib.experiments import sweep as S


def test_sweep_refuses_to_drop_points_of_other_code(tmp_path):
    path = tmp_path / "recipe_sweep.csv"
    S.check_same_code(path, "aaa")  # no file yet: fine
    path.write_text("point,val_ppl,code_fingerprint\n0,1.0,aaa\n1,2.0,aaa\n")
    S.check_same_code(path, "aaa")  # same code: the rewrite keeps every point
    with pytest.raises(SystemExit, match="computed with code aaa .this checkout: bbb.*--name"):
        S.check_same_code(path, "bbb")


def test_sweep_grid_order_and_selection():
    pts = S.points(S.GRID)
    assert len(pts) == 48 and pts[0] == {"lr_quant": 1e-3, "lr_weights": 2e-5, "grad_clip": 1.0, "init": "const",
                                         "lr_range": None}
    assert pts[41] == {"lr_quant": 1e-2, "lr_weights": 1e-4, "grad_clip": 1.0, "init": "search", "lr_range": None}
    two = S.points(S.parse_grid(["lr_weights=2e-5", "lr_range=1e-3,1e-2", "lr_quant=1e-2", "grad_clip=0.3",
                                 "init=search"]))
    assert [p["lr_range"] for p in two] == [1e-3, 1e-2]
    from rcp_lib.experiments import method
    from rcp_lib.profiles import get_profile

    ranges = [method("RCP", "W2A4KV4").recipe(S.point_profile(get_profile("cpu"), p, 40)).qat.lr_range for p in two]
    assert ranges == [1e-3, 1e-2]  # the axis reaches the row's recipe
    assert S.parse_only("0-2,41", 48) == [0, 1, 2, 41]
    with pytest.raises(SystemExit, match="outside the grid"):
        S.parse_only("48", 48)
    assert S.parse_grid(["init=search"])["init"] == ["search"]


def test_const_and_search_points_are_different_recipes():
    """The two starts of a learning-rate pair must train different models, whatever the profile's default start."""
    from rcp_lib.experiments import method
    from rcp_lib.experiments.rows import method_config
    from rcp_lib.profiles import get_profile

    m = method("RCP", "W2A4KV4")
    const_start = {"qat": {"gptq_start": False}, "quant": {"weight": {
        "clip_init": "const", "ldp_init": "uniform", "range_mode": "relative", "range_param": "absolute"}}}
    for P in (get_profile("cpu"), get_profile("cpu", qat_overrides=const_start)):
        const, search = (S.point_profile(P, {**S.points(S.GRID)[41], "init": i}, 40) for i in ("const", "search"))
        wc, ws = (m.recipe(p).quant.weight for p in (const, search))
        assert (wc.clip_init, wc.ldp_init) == ("const", "uniform") and (ws.clip_init, ws.ldp_init) == ("mse", "lloyd")
        assert method_config(m, const) != method_config(m, search)


def test_sweep_selects_by_mean_over_seeds_and_states_separation_only_from_a_t_test():
    rows = [{"point": 3, "seed": 0, "val_ppl": 100.0}, {"point": 3, "seed": 1, "val_ppl": 110.0},
            {"point": 7, "seed": 0, "val_ppl": 90.0}, {"point": 7, "seed": 1, "val_ppl": 140.0},
            {"point": 9, "seed": 0, "val_ppl": 50.0}]  # best single run, one seed: never selected over 2-seed points
    S.select(rows)
    best = {r["point"] for r in rows if r["best"]}
    assert best == {3}  # means 105 < 115; point 9 has fewer seeds
    r3 = next(r for r in rows if r["point"] == 3)
    assert (r3["n_seeds"], r3["val_ppl_mean"], r3["vs_best"]) == (2, 105.0, "")
    assert abs(r3["val_ppl_sem"] - 5.0) < 1e-12  # sample std 7.07 / sqrt(2)
    r7 = next(r for r in rows if r["point"] == 7)
    assert r7["vs_best"].startswith("not separable at this budget (Welch p = ")
    r9 = next(r for r in rows if r["point"] == 9)
    assert r9["n_seeds"] == 1 and r9["vs_best"] == "not separable at this budget (n = 2, 1)"  # one seed: no test
    far = S.select([{"point": 0, "seed": s, "val_ppl": v} for s, v in enumerate((100.0, 102.0, 101.0))] +
                   [{"point": 1, "seed": s, "val_ppl": v} for s, v in enumerate((200.0, 210.0, 205.0))])
    assert far[-1]["vs_best"].startswith("point 0 < point 1 (Welch p = ")


def test_sweep_seed_parsing():
    assert S.parse_seeds(None, 4) == [4] and S.parse_seeds("2,0,1,1", 0) == [0, 1, 2]
    with pytest.raises(SystemExit, match="outside 0..9"):
        S.parse_seeds("10", 0)
    with pytest.raises(SystemExit, match="comma-separated integers"):
        S.parse_seeds("a", 0)
