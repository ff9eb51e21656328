"""The R4-blocks table (rcp_lib.experiments.r4) on a tiny random LLaMA: which rows it computes, that each row's model
is what it names (weights untouched at W16A4KV16, down_proj's input rotated by the named R4), blocks that do not
divide the MLP width left out before any model is touched, and the report's table with its paired tests."""

import math

import pandas as pd
import pytest
import torch

from rcp_lib import models as M
from rcp_lib.experiments import r4 as R
from rcp_lib.profiles import get_profile


@pytest.fixture
def tiny(tiny_experiment):
    return get_profile("ablation", ablation_seeds=[0, 1]), tiny_experiment[1]


@pytest.mark.heavy
def test_r4_blocks_rows(tiny):
    from rcp_lib.quant.linear import QuantLinear
    from rcp_lib.rotation.online import OnlineHadamard

    P, seen = tiny
    assert R.r4_block_sizes(P, (None, 512, 64, 48, 16)) == [None, 64, 16]  # 512 > 128, 48 does not divide
    rows = R.r4_blocks(P, progress=False, blocks=(None, 512, 64, 16))
    assert [(r["seed"], r["method"]) for r in rows] == [(s, m) for s in (0, 1) for m in
                                                          ("full Hadamard", "blocks of 64", "blocks of 16")]
    assert [k for *_, k in R.r4_plan(P, (None, 64, 16))] == [R._key(*R._setup(b, P.__class__(**{**P.to_dict(), "seed": s})),
                                                                     P.__class__(**{**P.to_dict(), "seed": s}))
                                                             for s in (0, 1) for b in (None, 64, 16)]
    assert all(math.isfinite(r["ppl"]) and r["git_commit"] and r["setting"] == "W16A4KV16" for r in rows)
    for model, r in zip(seen, rows):
        lins = [m for _, m in M.named_block_linears(model)]
        assert all(isinstance(m, QuantLinear) and m.weight_quantizer is None and m.act_bits == 4 for m in lins)
        t = M.mlp(M.decoder_layers(model)[0]).down_proj.input_transform
        assert isinstance(t, OnlineHadamard) and (t.n, t.block) == (128, r["r4_block"])
    by = {(r["method"], r["seed"]): r["ppl"] for r in rows}
    assert by[("full Hadamard", 0)] != by[("blocks of 16", 0)]  # the block acts on the activations
    assert by[("full Hadamard", 0)] != by[("full Hadamard", 1)]  # the seed sets R1's signs
    n = len(seen)
    again = R.r4_blocks(P, progress=False, blocks=(None, 64, 16))  # cached: nothing recomputed
    assert len(seen) == n and [r["ppl"] for r in again] == [r["ppl"] for r in rows]


def test_r4_blocks_markdown_orders_from_paired_tests():
    from rcp_lib.report import r4_blocks_markdown

    rows = [{"method": m, "seed": s, "ppl": p, "cpu_model": "X", "torch_cpu_capability": "AVX2"}
            for m, vals in (("full Hadamard", (30.0, 31.0, 32.0)), ("blocks of 64", (36.0, 37.5, 38.2)),
                            ("blocks of 128", (30.1, 30.9, 32.2)))
            for s, p in enumerate(vals)]
    text = r4_blocks_markdown(pd.DataFrame(rows))
    assert "r4_blocks.csv`, X (AVX2))" in text
    line = {ln.split(" | ")[0].lstrip("| "): ln for ln in text.splitlines() if ln.startswith("| ")}
    assert "full Hadamard < blocks of 64 (paired p = " in line["blocks of 64"]
    assert "not separable at this budget (paired p = " in line["blocks of 128"]
    assert line["full Hadamard"].endswith("| – |") and "| 31.00 ± 0.58 |" in line["full Hadamard"]  # SE = 1 / sqrt(3)
