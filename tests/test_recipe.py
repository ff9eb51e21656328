"""One setting, one object: Recipe / QuantConfig round trips, the compatibility keywords build the nested form,
named methods never collide, run configs and result rows load into a Recipe, one group-size check."""

import json
from pathlib import Path

import pytest

from rcp_lib import experiments as X
from rcp_lib.memory import PRESETS, Scheme, footprint
from rcp_lib.profiles import get_profile
from rcp_lib.quant.apply import QuantConfig, preset, quantize_model
from rcp_lib.quant.quantizers import WeightQuantConfig
from rcp_lib.recipe import Recipe
from rcp_lib.run_config import RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_flat_keywords_build_the_nested_form():
    q = QuantConfig(w_bits=2, a_bits=4, kv_bits=4, w_group_size=64, w_method="rtn", w_lwc=False, a_clip_ratio=0.8)
    assert q.weight == WeightQuantConfig(bits=2, group_size=64, method="rtn", lwc=False)
    assert (q.act.bits, q.act.clip_ratio, q.kv.bits, q.label) == (4, 0.8, 4, "W2A4KV4")
    assert set(q.to_dict()) == {"weight", "act", "kv"}
    assert QuantConfig.from_dict(q.to_dict()) == q == QuantConfig.from_json(q.to_json())
    assert QuantConfig(w_bits=16).weight is None and preset("W16A16KV16").label == "W16A16KV16"
    with pytest.raises(ValueError, match="unknown QuantConfig fields"):
        QuantConfig(group_size=64)


def test_old_flat_rows_load():
    old = {"w_bits": 2, "w_group_size": 64, "w_method": "rtn", "w_lwc": False, "w_lwc_init": 4.0, "w_clip_ratio": 1.0,
           "w_clip_search": "mse", "ldp_granularity": "group", "ldp_init": "uniform", "a_bits": 4, "a_clip_ratio": 0.9,
           "kv_bits": 4, "kv_group_size": None, "kv_clip_ratio": 1.0, "lm_head_a_bits": 16}
    r = Recipe.of_row({"method": "QuaRot-RTN", "setting": "W2A4KV4", "family": "ptq", "quant": old, "ptq": "rtn",
                       "rotation": None, "qat": None})
    assert r.quant.weight.clip_search == "mse" and r.quant.weight.group_size == 64 and r.ptq == "rtn"


def test_lwc_method_is_one_spelling_in_every_config():
    a = WeightQuantConfig(method="lwc", lwc=False)
    assert (a.method, a.lwc, a.learn_clip) == ("rtn", True, True)
    assert QuantConfig(w_method="lwc").weight == WeightQuantConfig(method="rtn", lwc=True)


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
    assert len({json.dumps(X._row_key(m, P), sort_keys=True) for m in ms}) == len(ms)
    for m in ms:
        r = Recipe.of_row(X.method_config(m, P))
        assert r == m.recipe(P)
        assert r.quant is None or r.quant.weight.group_size == m.weight.get("group_size", P.w_group_size)
    with pytest.raises(ValueError, match="unknown method"):
        X.method("RCP-2")
    with pytest.raises(ValueError, match="not both"):
        Recipe(quant=preset("W2A4KV4"), ptq="gptq", qat=X.qat_config(P)).validate()


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
