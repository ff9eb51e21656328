"""One setting, one object: Recipe / QuantConfig round trips, the compatibility keywords build the nested form,
named methods are recipe files and never collide, run configs and result rows load into a Recipe (the CLI example's is
the table's), one group-size check."""

import json
from pathlib import Path

import pytest

from rcp_lib import experiments as X
from rcp_lib.memory import PRESETS, Scheme, footprint
from rcp_lib.profiles import get_profile
from rcp_lib.quant.apply import ActQuantConfig, QuantConfig, preset, quantize_model
from rcp_lib.quant.quantizers import WeightQuantConfig
from rcp_lib.recipe import RECIPES_DIR, QATRecipe, Recipe
from rcp_lib.run_config import RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_quant_config_is_nested_only():
    """One layout: weight / act / kv parts (no flat w_bits / a_bits / ... keywords or rows: FLAT_NAMES is gone)."""
    q = QuantConfig(weight=WeightQuantConfig(bits=2, group_size=64, method="rtn", lwc=False),
                    act=ActQuantConfig(bits=4, clip_ratio=0.8))
    assert (q.act.bits, q.act.clip_ratio, q.kv.bits, q.label) == (4, 0.8, 4, "W2A4KV4")
    pr = preset("W2A4KV4", w_group_size=64).with_weight(method="rtn", lwc=False)
    assert (pr.weight, pr.act, pr.kv) == (q.weight, ActQuantConfig(bits=4), q.kv)
    assert set(q.to_dict()) == {"weight", "act", "kv"}
    assert QuantConfig.from_dict(q.to_dict()) == q == QuantConfig.from_json(q.to_json())
    assert preset("W16A16KV16").weight is None and preset("W16A16KV16").label == "W16A16KV16"
    assert QuantConfig.from_dict({"weight": None}).label == "W16A4KV4" and QuantConfig.from_dict({}) == QuantConfig()
    assert preset("W2A4KV4", w_group_size=64, kv_group_size=32).kv.group_size == 32
    with pytest.raises(TypeError):
        QuantConfig(w_bits=2)
    old = {"w_bits": 2, "w_group_size": 64, "w_method": "rtn", "w_lwc": False, "a_bits": 4, "kv_bits": 4}
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        Recipe.of_row({"method": "QuaRot-RTN", "setting": "W2A4KV4", "family": "ptq", "quant": old, "ptq": "rtn",
                       "rotation": None, "qat": None})


def test_lwc_method_is_one_spelling_in_every_config():
    a = WeightQuantConfig(method="lwc", lwc=False)
    assert (a.method, a.lwc, a.learn_clip) == ("rtn", True, True)
    assert QuantConfig.from_dict({"weight": {"method": "lwc"}}).weight == WeightQuantConfig(method="rtn", lwc=True)


def test_default_group_that_does_not_divide_names_a_divisor():
    from rcp_lib import models as M

    model = M.tiny_llama(hidden=96, intermediate=192, heads=2, kv_heads=1, layers=1, vocab=64)
    with pytest.raises(ValueError, match=r"does not divide the input size 96 .*e\.g\. 32"):
        quantize_model(model, QuantConfig())  # the default group 128


def test_recipes_of_named_methods():
    P = get_profile("cpu")
    ms = X.all_methods(P)
    configs = [json.dumps(X.method_config(m, P), sort_keys=True) for m in ms]
    assert len(set(configs)) == len(configs)  # two rows never share a config (nor a cache key)
    assert len({json.dumps(X.row_key(m, P), sort_keys=True) for m in ms}) == len(ms)
    for m in ms:
        r = Recipe.of_row(X.method_config(m, P))
        assert r == m.recipe(P)
        assert r.quant is None or r.quant.weight.group_size == m.weight.get("group_size", P.w_group_size)
    with pytest.raises(ValueError, match="unknown method"):
        X.method("RCP-2")
    with pytest.raises(ValueError, match="not both"):
        Recipe(quant=preset("W2A4KV4"), ptq="gptq", qat=X.qat_config(P)).validate()


@pytest.mark.parametrize("config, profile", [("cpu.yaml", "cpu"), ("paper-llama2-7b.yaml", "paper")])
def test_cli_example_config_is_the_tables_recipe(config, profile):
    """`python -m rcp_lib qat --config configs/cpu.yaml` (the CLI example of docs/library.md) trains the recipe of the
    cpu table's RCP W2A4KV4 row, on its model, corpus, calibration and test windows; the paper's run config is the
    paper profile's RCP row."""
    cfg = RunConfig.load(CONFIGS / config)
    P = get_profile(profile)
    table = X.method("RCP", "W2A4KV4").recipe(P)
    assert cfg.recipe == table
    assert table == Recipe.load(RECIPES_DIR / "rcp.yaml", "W2A4KV4", P.budget, P.qat_recipe)  # the file, resolved
    assert (cfg.model, cfg.corpus, cfg.device) == (P.model, P.corpus, P.device)
    if table.qat.gptq_start:  # the GPTQ start's windows (rcp_lib.experiments.calibration)
        assert (cfg.calib["windows"], cfg.calib["seqlen"]) == (P.calib_windows, P.calib_seqlen)
    assert (cfg.eval["seqlen"], cfg.eval["max_windows"]) == (P.seqlen, P.eval_windows)
    if P.eval_windows is not None:
        assert cfg.eval.get("spread", False) == P.eval_spread


def test_named_methods_are_recipe_files():
    """Every named method is one file of configs/recipes/; each row's recipe is its file resolved with the profile's
    budget and QAT recipe."""
    from rcp_lib.recipe import read_recipe_file

    P = get_profile("cpu", qat_ablation_rows=True)
    files = {read_recipe_file(f)["name"]: f for f in sorted(RECIPES_DIR.glob("*.yaml"))}
    assert sorted(files) == sorted(X.NAMED)
    for m in X.all_methods(P):
        assert Recipe.load(files[m.name], m.setting, P.budget, QATRecipe.load(P.qat_recipe)) == m.recipe(P), m.name
    with pytest.raises(ValueError, match="needs a QAT recipe"):
        Recipe.load(files["RCP"], "W2A4KV4", P.budget)


def test_profiles_hold_no_recipe_fields():
    """A profile says where and how much, plus the path of its QAT recipe: no QATConfig field is mirrored."""
    from dataclasses import fields

    from rcp_lib.profiles import Profile

    qat = {f.name for f in fields(Profile) if f.name.startswith("qat_")}
    assert qat == {"qat_steps", "qat_seqlen", "qat_batch_size", "qat_grad_accum", "qat_val_every", "qat_recipe",
                   "qat_overrides", "qat_ablation_rows"}
    P = get_profile("cpu")
    assert X.qat_config(P) == QATRecipe.load("configs/recipes/qat/cpu.yaml").config(P.budget)
    q = X.qat_config(get_profile("gpu"))  # warm-up: a tenth of the steps, at most 10; checkpoints at validation
    assert (q.steps, q.warmup_steps, q.checkpoint_every, q.lr_quant) == (400, 10, 100, 1e-2)


def test_qat_overrides_are_checked_and_keyed():
    P = get_profile("cpu", qat_overrides={"qat": {"lr_quant": 3e-3}, "quant": {"weight": {"clip_init": "const"}}})
    r = X.method("RCP", "W2A4KV4").recipe(P)
    assert (r.qat.lr_quant, r.qat.lr_weights, r.quant.weight.clip_init, r.quant.weight.ldp_init) == (
        3e-3, 2e-5, "const", "lloyd")
    assert X.method_config(X.method("RCP"), P) != X.method_config(X.method("RCP"), get_profile("cpu"))
    for bad, needle in (({"qat": {"lr_quantt": 1e-3}}, "lr_quantt"), ({"quant": {"weight": {"bits": 3}}}, "start fields"),
                        ({"optim": {}}, "optim")):
        with pytest.raises(ValueError, match=needle):
            get_profile("cpu", qat_overrides=bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_profile("cpu", qat_recipe="configs/recipes/qat/nope.yaml")


def test_run_qat_takes_the_gptq_start_on_the_tables_windows(tmp_path, monkeypatch):
    """A run config with qat.gptq_start GPTQs the student on its calib windows of the train split (the windows
    rcp_lib.experiments.calibration gives the table's rows) before training; a tiny random model, no download."""
    import importlib

    import torch

    from rcp_lib import models as M
    from rcp_lib.data import calibration_windows
    from rcp_lib.run_config import run_qat

    B = importlib.import_module("rcp_lib.experiments.build")
    data = importlib.import_module("rcp_lib.data")
    tiny = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=1, vocab=128, seed=0)
    ids = {s: torch.randint(0, 128, (1, 6000), generator=torch.Generator().manual_seed(i))
           for i, s in enumerate(("train", "test"))}
    monkeypatch.setattr(M, "load", lambda *a, **k: (__import__("copy").deepcopy(tiny).float(), None))
    monkeypatch.setattr(M, "model_dims", lambda name: M.dims(tiny))
    monkeypatch.setattr(M, "describe", lambda name: "tiny")
    monkeypatch.setattr(data, "corpus_tokens", lambda tok, corpus, split: ids[split])
    seen = []
    real = B.gptq_start
    monkeypatch.setattr(B, "gptq_start", lambda model, calib, progress=True: (seen.append(calib), real(model, calib,
                                                                                                       False)))
    cfg = RunConfig.from_dict({
        "rotation": {"r1": "random_hadamard", "seed": 0}, "ptq": "none",
        "quant": {"weight": {"bits": 2, "group_size": 32, "method": "ldp", "lwc": True, "range_mode": "static",
                             "range_param": "log"}, "act": {"bits": 4}, "kv": {"bits": 4}},
        "qat": {"steps": 1, "seqlen": 32, "val_every": 1, "checkpoint_every": 1, "warmup_steps": 0, "val_windows": 1,
                "gptq_start": True, "seed": 3, "mixed_precision": "no"},
        "calib": {"windows": 2, "seqlen": 32}, "eval": {"seqlen": 32, "max_windows": 2, "spread": True},
        "out_dir": str(tmp_path / "run")})
    out = run_qat(cfg, progress=False)
    assert len(seen) == 1 and torch.equal(seen[0], calibration_windows(ids["train"], 2, 32, seed=3))
    assert out["eval_windows"] == 2 and out["config"]["calib"] == {"windows": 2, "seqlen": 32}
    seen.clear()
    cfg.recipe.qat.gptq_start = False
    cfg.recipe.quant = cfg.recipe.quant.with_weight(range_mode="relative", range_param="absolute")
    cfg.out_dir = str(tmp_path / "run2")
    run_qat(cfg, progress=False)
    assert seen == []


@pytest.mark.parametrize("name", ["cpu.yaml", "smoke.yaml", "paper-llama2-7b.yaml"])
def test_run_configs_load_into_a_recipe(name):
    cfg = RunConfig.load(CONFIGS / name)
    assert cfg.recipe.label == "W2A4KV4" and cfg.recipe.qat is not None
    assert RunConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="unknown run-config sections"):
        RunConfig.from_dict({**cfg.to_dict(), "w_bits": 2})


def test_accountant_reads_the_recipe():
    q = preset("W2A4KV4", w_group_size=128, kv_group_size=128)
    assert Scheme.of(q, name="W2A4KV4") == PRESETS["W2A4KV4"]
    cfg = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000)
    assert footprint(cfg, preset("W2A4KV4", w_group_size=128)).to_dict() == footprint(cfg, "W2A4KV4").to_dict()
