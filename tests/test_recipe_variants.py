"""The recipe-variants script: its keys, its variants' recipes and its summary (no training here)."""

import math

import pytest

from rcp_lib.experiments import sweep as S
from rcp_lib.experiments import variants as V


def _key(name, seed=0, profile="cpu"):
    from rcp_lib.profiles import get_profile

    P = get_profile(profile)
    over, steps, _ = V.VARIANTS[name]
    return S.sweep_key(V.variant_profile(P, over), S.points(S.GRID)[V.POINT], seed, steps or P.qat_steps)


def _trained(cfg):  # the recipe fields that change the trained weights (not the validation / checkpoint intervals)
    return {**cfg, "qat": {k: v for k, v in cfg["qat"].items() if k not in ("val_every", "checkpoint_every")}}


def test_default_variant_is_the_sweeps_point_and_gptq_static_the_profiles_recipe():
    """'default' is the sweep's selected point with the start it was selected with (its rows share the sweep's
    cache key); the winner, 'gptq-static', is the cpu profile's recipe."""
    from rcp_lib.experiments import method, method_config
    from rcp_lib.profiles import get_profile

    P = get_profile("cpu")
    pt = S.points(S.GRID)[V.POINT]
    q = method("RCP", "W2A4KV4").recipe(P).qat
    assert (pt["lr_quant"], pt["lr_weights"], pt["grad_clip"], pt["init"]) == (
        q.lr_quant, q.lr_weights, q.grad_clip, "search")
    Pp, key = _key("default")
    assert key == S.sweep_key(V.variant_profile(P, V.SEARCHED_START), pt, 0, P.qat_steps)[1] and "calib" not in key
    m = method("RCP", "W2A4KV4")
    assert not m.recipe(Pp).qat.gptq_start and m.recipe(Pp).quant.weight.range_mode == "relative"
    # the profile then moved on (issue 35): the same start with the range learned scale-free (range_param "log")
    gs, now = _trained(method_config(m, _key("gptq-static")[0])), _trained(method_config(m, P))
    assert now["quant"]["weight"].pop("range_param") == "log" and gs["quant"]["weight"].pop("range_param") == "absolute"
    assert (now["qat"].pop("lr_range"), gs["qat"].pop("lr_range")) == (1e-3, 1e-4)  # a log step vs a weight-unit step
    assert gs == now


def test_variants_build_the_recipes_they_name():
    from rcp_lib.experiments import method

    m = method("RCP", "W2A4KV4")
    q = {name: m.recipe(_key(name)[0]).qat for name in V.VARIANTS}
    w = {name: m.recipe(_key(name)[0]).quant.weight for name in V.VARIANTS}
    assert q["default"].block_ap_steps == 0 and not q["default"].gptq_start and q["default"].steps == 40
    assert (q["block-ap"].block_ap_steps, q["block-ap"].block_ap_samples, q["block-ap"].block_ap_lr_quant,
            q["block-ap"].steps) == (16, 16, 1e-2, 21)
    assert (q["block-ap-effqat-lr"].block_ap_lr_quant, q["block-ap-effqat-lr"].block_ap_lr_weights) == (1e-4, 2e-5)
    assert q["gptq-static"].gptq_start and w["gptq-static"].range_mode == "static"
    assert (q["gptq-static"].lr_range, q["gptq-static"].lr_quant) == (1e-4, 1e-2) and q["default"].lr_range is None
    assert (w["gptq-static"].clip_init, w["gptq-static"].ldp_init) == ("mse", "lloyd")
    assert "calib" in _key("gptq-static")[1]
    assert (q["seqlen-512"].seqlen, q["seqlen-512"].steps) == (512, 20)
    assert q["seqlen-512"].seqlen * q["seqlen-512"].steps == q["default"].seqlen * q["default"].steps  # equal tokens
    keys = {name: str(_key(name)[1]) for name in V.VARIANTS}
    assert len(set(keys.values())) == len(keys)  # no two variants share a cached row
    assert _key("block-ap", 1)[1] != _key("block-ap", 0)[1]


def test_variant_summary_states_order_against_default_only_from_a_t_test():
    rows = ([{"variant": "default", "seed": s, "val_ppl": v, "seconds": 180.0} for s, v in enumerate((500., 520., 510.))]
            + [{"variant": "a", "seed": s, "val_ppl": v, "seconds": 170.0} for s, v in enumerate((300., 310., 305.))]
            + [{"variant": "b", "seed": s, "val_ppl": v, "seconds": 190.0} for s, v in enumerate((400., 650., 520.))])
    V.summarize(rows)
    by = {r["variant"]: r for r in rows}
    assert by["default"]["vs_default"] == "" and by["default"]["n_seeds"] == 3
    assert by["a"]["vs_default"].startswith("a < default (Welch p = ")
    assert by["b"]["vs_default"].startswith("not separable at this budget (Welch p = ")
    assert math.isclose(by["a"]["val_ppl_mean"], 305.0) and math.isclose(by["a"]["val_ppl_sem"], 5 / math.sqrt(3))
    assert by["b"]["seconds_mean"] == 190.0


def test_variant_names_are_checked():
    assert V.parse_variants(None) == list(V.VARIANTS)
    assert V.parse_variants("default, seqlen-512") == ["default", "seqlen-512"]
    with pytest.raises(SystemExit, match="unknown variant"):
        V.parse_variants("default,nope")
