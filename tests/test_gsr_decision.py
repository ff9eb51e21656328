"""The GSR decision table (rcp_lib.experiments.gsr) on a tiny random LLaMA: which rows it computes, that each row's
model is what it names (weights untouched at W16A4KV16, groups smaller than the block for the weight part), and the
cache."""

import math

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.experiments import gsr as G
from rcp_lib.profiles import get_profile


@pytest.fixture
def tiny(tiny_experiment):
    return get_profile("ablation", ablation_seeds=[0, 1], w_group_size=32), tiny_experiment[1]


@pytest.mark.heavy
def test_gsr_decision_rows(tiny):
    from rcp_lib.quant.linear import QuantLinear

    P, seen = tiny
    rows = G.gsr_decision(P, progress=False, groups=(8,))
    act = [r for r in rows if r["part"] == "activations"]
    wts = [r for r in rows if r["part"] == "weights"]
    seeded = sum(1 for *_, s in G.ACTIVATION_R1 if s)
    assert len(act) == 2 * seeded + (len(G.ACTIVATION_R1) - seeded) and len(wts) == 2 * len(G.WEIGHT_METHODS)
    assert all(math.isfinite(r["ppl"]) and r["git_commit"] for r in rows)
    assert {(r["w_group"], r["block"]) for r in wts} == {(8, 32)}
    # W16A4KV16: no weight is quantized (the weight part's projections quantize in groups of 8)
    q0 = [m for _, m in M.named_block_linears(seen[0])]
    assert all(isinstance(m, QuantLinear) and m.weight_quantizer is None and m.act_bits == 4 for m in q0)
    wq = next(m for _, m in M.named_block_linears(seen[-1])).weight_quantizer  # the last row: a weight row
    assert wq.config.group_size == 8 and wq.config.bits == 2
    # random signs follow the seed; a deterministic R1 is one row
    by = {(r["method"], r["seed"]): r["ppl"] for r in act}
    assert by[("GSR + random signs", 0)] != by[("GSR + random signs", 1)] and ("GSR", 1) not in by
    assert by[("GSR", 0)] != by[("Hadamard (natural order, no signs)", 0)]
    # the invariant that leaves block-Hadamard out of the activation part: inside each block its rows are GSR's in
    # another order, a permutation of coordinates that a per-token quantizer over the whole hidden size cannot see
    ctl = G.activation_row("block-Hadamard", "block_hadamard", False, 32, P, progress=False)
    assert ctl["ppl"] == pytest.approx(by[("GSR", 0)], rel=1e-4)
    n = len(seen)
    again = G.gsr_decision(P, progress=False, groups=(8,))
    assert [r["ppl"] for r in again] == [r["ppl"] for r in rows] and len(seen) == n  # every row from the cache
    with pytest.raises(ValueError, match="smaller than it"):
        G.gsr_decision(P, progress=False, groups=(32,))


@pytest.mark.heavy
def test_decision_plan_is_what_the_decision_reads(tiny):
    """``decision_plan`` (and so ``row_plan`` of notebook 06) names exactly the cache keys ``gsr_decision`` reads, in
    its order, and reports them cached once computed."""
    from rcp_lib.experiments import rows as R
    from rcp_lib.experiments.notebook import row_plan

    P, _ = tiny
    P = get_profile("ablation", ablation_seeds=[0, 1], w_group_size=32, gsr_weight_groups=[8])
    plan = G.decision_plan(P)
    assert [p[:2] for p in plan] == [(part, s) for s in (0, 1) for part in
                                     ["activations"] * sum(1 for *_, sd in G.ACTIVATION_R1 if sd or s == 0)
                                     + ["weights"] * len(G.WEIGHT_METHODS)]
    before = [r for r in row_plan(P, "06_ablation.ipynb") if r["table"].startswith("gsr")]
    assert len(before) == len(plan) and not any(r["cached"] for r in before)
    G.gsr_decision(P, progress=False)
    assert all(R.row_cached("gsr", key) for *_, key in plan)
    assert all(r["cached"] for r in row_plan(P, "06_ablation.ipynb") if r["table"].startswith("gsr"))
    with pytest.raises(ValueError, match="must divide"):
        G.decision_plan(P, groups=(48,))
