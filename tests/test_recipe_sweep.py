"""The recipe sweep script's guards and grid (no training here)."""

import pytest

from benchmarks import recipe_sweep as S


def test_sweep_refuses_to_drop_points_of_other_code(tmp_path):
    path = tmp_path / "recipe_sweep.csv"
    S.check_same_code(path, "aaa")  # no file yet: fine
    path.write_text("point,val_ppl,code_fingerprint\n0,1.0,aaa\n1,2.0,aaa\n")
    S.check_same_code(path, "aaa")  # same code: the rewrite keeps every point
    with pytest.raises(SystemExit, match="computed with code aaa .this checkout: bbb.*--name"):
        S.check_same_code(path, "bbb")


def test_sweep_grid_order_and_selection():
    pts = S.points(S.GRID)
    assert len(pts) == 48 and pts[0] == {"lr_quant": 1e-3, "lr_weights": 2e-5, "grad_clip": 1.0, "init": "const"}
    assert pts[41] == {"lr_quant": 1e-2, "lr_weights": 1e-4, "grad_clip": 1.0, "init": "search"}
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
    for P in (get_profile("cpu"), get_profile("cpu", qat_weight={})):
        const, search = (S.point_profile(P, {**S.points(S.GRID)[41], "init": i}, 40) for i in ("const", "search"))
        wc, ws = (m.recipe(p).quant.weight for p in (const, search))
        assert (wc.clip_init, wc.ldp_init) == ("const", "uniform") and (ws.clip_init, ws.ldp_init) == ("mse", "lloyd")
        assert method_config(m, const) != method_config(m, search)
