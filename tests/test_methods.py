"""The table's methods: rotation seeded by the profile, GSR blocks = the weight group, block-Hadamard controls,
clip-searched uniform baselines."""

import pytest

from rcp_lib import experiments as X
from rcp_lib.profiles import get_profile
from rcp_lib.rotation.fuse import RotationConfig


def test_gsr_block_defaults_to_the_weight_group_and_is_recorded():
    for name, gs in (("cpu", 64), ("paper", 128)):
        P = get_profile(name)
        ms = {(m.name, m.setting): m for m in X.all_methods(P)}
        for key in (("GSR-GPTQ", "W2A4KV4"), ("BlockHadamard-GPTQ", "W2A4KV4"), ("RCP+GSR", "W2A4KV4"),
                    ("RCP+BlockHadamard", "W2A4KV4")):
            rot = ms[key].rotation_config(P)
            assert rot.r1_block == gs and rot.seed == P.seed
            assert X.method_config(ms[key], P)["rotation"]["r1_block"] == gs
        assert ms[("QuaRot-GPTQ", "W2A4KV4")].rotation_config(P).r1 == "random_hadamard"
    P = get_profile("cpu", seed=3)
    assert X.all_methods(P)[1].rotation_config(P) is None  # RTN: no rotation
    assert [m for m in X.all_methods(P) if m.name == "QuaRot-RTN"][0].rotation_config(P).seed == 3


def test_gsr_without_block_is_refused():
    with pytest.raises(ValueError, match="r1_block"):
        RotationConfig(r1="gsr").validate()


def test_uniform_baselines_use_the_clip_search():
    P = get_profile("cpu")
    for m in X.all_methods(P):
        if m.family == "ptq":
            assert m.quant_config(P).weight_config().clip_search == "mse", m.name
    names = {(m.name, m.setting) for m in X.all_methods(P)}
    assert ("BlockHadamard-GPTQ", "W2A16KV16") in names and ("BlockHadamard-GPTQ", "W4A4KV4") not in names
