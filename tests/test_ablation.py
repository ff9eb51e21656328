"""The ablation profile and table: seeds, columns, the summary and the two-standard-error rule; the recipe fields of
profiles; the tokens-vs-ppl figure."""

import dataclasses
import json
import math
import statistics

import pytest

from rcp_lib import experiments as X
from rcp_lib.experiments import ablation as A
from rcp_lib.profiles import get_profile


def _row(name, seed, ppl):
    return {"method": name, "setting": "W2A4KV4", "seed": seed, "ppl": ppl, "step0_ppl": 10 * ppl,
            "clip_ratio_init": 0.9, "clip_ratio_final": 0.8, "level_shift": 0.01, "weight_shift": 0.001}


def test_summary_mean_std_sem_against_statistics():
    rows = [_row("RCP", s, p) for s, p in enumerate([10.0, 12.0, 11.0])] + [_row("B", 0, 20.0)]
    summ = {s["method"]: s for s in A.summarize_ablation(rows)}
    r = summ["RCP"]
    assert r["n"] == 3 and r["seeds"] == [0, 1, 2]
    assert r["ppl_mean"] == pytest.approx(11.0)
    assert r["ppl_std"] == pytest.approx(statistics.stdev([10.0, 12.0, 11.0]))
    assert r["ppl_sem"] == pytest.approx(1.0 / math.sqrt(3))
    assert r["step0_ppl_mean"] == pytest.approx(110.0) and r["clip_ratio_final_mean"] == pytest.approx(0.8)
    assert math.isnan(summ["B"]["ppl_std"])


def test_separation_states_an_order_only_from_a_t_test():
    """Welch's test on log perplexity at n = 3: 10 vs 12 with small spreads separates (p shown); a difference of
    more than two standard errors that the t quantile at df ~ 4 does not support stays "not separable"."""
    a = {"method": "RCP", "ppl_values": [10.0, 10.2, 9.8]}
    far = {"method": "w/o Clip", "ppl_values": [12.0, 12.3, 11.7]}
    assert A.separation(a, far).startswith("RCP < w/o Clip (Welch p = ")
    assert A.separation(far, a).startswith("RCP < w/o Clip")
    near = {"method": "RCP+GSR", "ppl_values": [9.0, 10.0, 11.0]}
    wide = {"method": "x", "ppl_values": [10.6, 11.6, 12.6]}  # mean difference 1.6 > 2 SE (1.15), t = 1.96 at df 4
    assert A.separation(near, wide).startswith(A.NOT_SEPARABLE)
    single = {"method": "x", "ppl_values": [100.0]}
    assert A.separation(a, single).startswith(A.NOT_SEPARABLE)


def test_ablation_profile_and_table_columns(monkeypatch):
    P = get_profile("ablation")
    assert len(P.ablation_seeds) >= 3 and P.settings == ["W2A4KV4"]
    names = [m.name for m in A.ablation_methods(P)]
    every = {"RCP", *X.methods.QAT_BASELINES, *X.methods.EQUAL_BITS, *X.methods.ABLATIONS, *X.methods.SEEDED_PTQ}
    assert names[0] == "RCP" and set(names) == every & set(P.methods)
    seen = []

    def fake_row(m, p, progress=True):
        rec = m.recipe(p)
        seen.append((m.name, p.seed, rec.rotation.seed if rec.rotation else None,
                     rec.qat.seed if rec.qat else p.seed))  # a PTQ row: the profile's seed picks its calibration
        return {"ppl": 100.0 + p.seed, "step0_ppl": 1e4, "clip_ratio_init": 0.98, "clip_ratio_final": 0.9,
                "level_shift": 0.02, "weight_shift": 1e-3, "qat_tokens": 10240, "qat_seconds": 60.0,
                "git_commit": "abc", "cpu_flags": "avx avx2", "config": '{"w_bits": 2}'}

    monkeypatch.setattr(X.tables, "ppl_row", fake_row)
    rows = A.ablation_table(P, progress=False)
    assert len(rows) == len(P.ablation_seeds) * len(names)
    assert all(tuple(r) == A.ABLATION_COLUMNS for r in rows)
    # each per-seed row says where it ran and what it ran (the perplexity row's provenance and config)
    assert all(r["cpu_flags"] == "avx avx2" and r["config"] == '{"w_bits": 2}' and r["device"] is None for r in rows)
    # the seed sets the R1 signs (rotation seed) and the data order (QAT seed) of every row that rotates
    assert all(s == q and (rs is None or rs == s) for _, s, rs, q in seen)
    summ = A.summarize_ablation(rows)
    assert {s["n"] for s in summ} == {len(P.ablation_seeds)}
    monkeypatch.setattr(A, "provenance", lambda: {"git_commit": "abc"})
    full = {s["method"]: s for s in A.ablation_summary(P, progress=False)}
    # identical fake rows: no order (a paired test of equal values: p = 1)
    assert full["RCP"]["vs_RCP"] == "" and full["Uniform-QAT"]["vs_RCP"].startswith(A.NOT_SEPARABLE)
    assert full["RCP"]["vs_control"] == ""
    P2 = get_profile("ablation", methods=["RCP", "RCP+GSR", "RCP+BlockHadamard"])
    full = {s["method"]: s for s in A.ablation_summary(P2, progress=False)}
    assert full["RCP+GSR"]["vs_control"].startswith(A.NOT_SEPARABLE)


def test_ablation_rows_share_keys_with_cpu_at_seed_0_only():
    from rcp_lib.experiments.rows import row_key

    m = X.method("RCP", "W2A4KV4")
    cpu, abl = get_profile("cpu"), get_profile("ablation")
    assert row_key(m, cpu) == row_key(m, abl)  # seed 0 of the ablation reuses the cpu row
    assert row_key(m, cpu) != row_key(m, get_profile("ablation", seed=1))


def test_qat_weight_fields_apply_only_where_they_mean_something():
    P = get_profile("cpu", qat_overrides={"qat": {"lr_quant": 1e-2, "grad_clip": 0.3, "lr_weights": 1e-4},
                                          "quant": {"weight": {"clip_init": "mse", "ldp_init": "lloyd",
                                                               "range_mode": "static"}}})
    w = lambda n: X.method(n, "W2A4KV4").recipe(P).quant.weight
    assert (w("RCP").clip_init, w("RCP").ldp_init) == ("mse", "lloyd")
    assert (w("RCP w/o Clip").clip_init, w("RCP w/o Clip").ldp_init) == ("const", "lloyd")
    assert (w("Uniform-QAT").clip_init, w("Uniform-QAT").ldp_init) == ("mse", "uniform")
    assert w("QuaRot-GPTQ").clip_init == "const"  # PTQ rows never get the QAT fields
    q = X.method("RCP", "W2A4KV4").recipe(P).qat
    assert (q.lr_quant, q.grad_clip, q.lr_weights) == (1e-2, 0.3, 1e-4)
    # range_mode applies to every QAT row (a GPTQ start for each): learnable lo / hi with LWC, fixed without
    D = get_profile("ablation")
    for n in (n for n in D.methods if X.method(n).qat):
        r = X.method(n, "W2A4KV4").recipe(D)
        assert r.qat.gptq_start and r.quant.weight.range_mode == "static", n
    assert not X.method("RCP w/o Clip", "W2A4KV4").recipe(D).quant.weight.lwc
    assert X.method("QuaRot-GPTQ", "W2A4KV4").recipe(D).quant.weight.range_mode == "relative"


def test_default_profile_recipe_is_the_best_sweep_point():
    """The cpu profile's QAT recipe is, field for field, the recipe the selected point of the committed sweep under
    the GPTQ start trained (results/cpu/recipe_sweep_gptq.csv, >= 3 seeds, one code version)."""
    import csv

    from rcp_lib.paths import REPO_ROOT

    sweep = REPO_ROOT / "results" / "cpu" / "recipe_sweep_gptq.csv"
    rows = list(csv.DictReader(sweep.open()))
    best = [r for r in rows if r["best"] == "True"]
    assert len({r["code_fingerprint"] for r in rows}) == 1  # every point trained by the same code
    assert len(best) == int(best[0]["n_seeds"]) >= 3 and int(best[0]["n_seeds"]) == max(int(r["n_seeds"]) for r in rows)
    P = get_profile("cpu")
    r = X.method("RCP", "W2A4KV4").recipe(P)
    skip = ("val_every", "checkpoint_every", "seed")
    for b in best:
        trained = json.loads(b["config"])
        assert {k: v for k, v in trained["qat"].items() if k not in skip} == \
            {k: v for k, v in r.qat.to_dict().items() if k not in skip}
        assert trained["quant"] == r.quant.to_dict()
        assert {k: v for k, v in trained["rotation"].items() if k != "seed"} == \
            {k: v for k, v in r.rotation.to_dict().items() if k != "seed"}
    assert (r.qat.gptq_start, r.quant.weight.range_mode, r.quant.weight.range_param) == (True, "static", "log")


def test_plot_token_curve(tmp_path):
    rows = [{"method": "RCP", "setting": "W2A4KV4", "tokens": t, "val_ppl": v, "fp_val_ppl": 20.0, "val_seqlen": 256}
            for t, v in ((5120, 900.0), (10240, 500.0), (20480, 300.0))]
    fig = A.plot_token_curve(rows)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert list(ax.lines[0].get_xdata()) == [5120, 10240, 20480] and list(ax.lines[1].get_ydata()) == [20.0, 20.0]
    fig.savefig(tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_cpu_tables_leave_the_seeded_ablations_to_the_ablation_profile():
    cpu = {(m.name, m.setting) for m in X.all_methods(get_profile("cpu"))}
    assert ("RCP", "W2A4KV4") in cpu and ("GSR-GPTQ", "W2A4KV4") in cpu
    assert not {n for n, _ in cpu} & set(X.SEEDED_ABLATIONS)
    # the equal-bits rival and the GSR controls, which the ablation profile runs with seeds, are left to it (the cpu
    # budget); every other row stays, at every setting
    left = {("Uniform-QAT g32", "W2A4KV4"), ("RCP+GSR", "W2A4KV4"), ("BlockHadamard-GPTQ", "W2A4KV4"),
            ("BlockHadamard-GPTQ", "W2A16KV16")}
    assert not cpu & left
    assert cpu | left == {
        (m.name, m.setting) for m in X.all_methods(dataclasses.replace(get_profile("cpu"), methods=None))}
    assert {(n, s) for n in ("Uniform-QAT", "QuaRot-GPTQ static") for s in ("W2A4KV4", "W2A16KV16", "W4A4KV4")} <= cpu
    abl = {m.name for m in A.ablation_methods(get_profile("ablation"))}
    assert {"RCP", "Uniform-QAT", "Uniform-QAT g32"} <= abl  # the rest: --set methods=[...]
    every = {m.name for m in A.ablation_methods(get_profile("ablation", methods=sorted(X.methods.NAMED)))}
    assert set(X.SEEDED_ABLATIONS) <= every and "RCP+GSR" in every
    assert {m.name for m in X.all_methods(get_profile("gpu"))} >= set(X.SEEDED_ABLATIONS)  # default: in the table


def test_summary_says_what_qat_bought_over_its_start():
    """vs_start: each method's start (step0_ppl) against its trained row, paired by seed; empty without a start."""
    rows = [{"method": "RCP", "setting": "W2A4KV4", "seed": s, "ppl": p, "step0_ppl": q, "code_flips": f}
            for s, p, q, f in ((0, 90.0, 190.0, 0.01), (1, 110.0, 200.0, 0.02), (2, 95.0, 185.0, 0.03))]
    rows += [{"method": "x", "setting": "W2A4KV4", "seed": s, "ppl": 100.0 + s, "step0_ppl": None} for s in range(3)]
    summ = {r["method"]: r for r in A.summarize_ablation(rows)}
    assert summ["RCP"]["vs_start"].startswith("RCP < RCP start (paired p = ")
    assert summ["RCP"]["code_flips_mean"] == pytest.approx(0.02)
    assert summ["x"]["vs_start"] == ""
    same = [{**r, "step0_ppl": r["ppl"] * (1.01 if r["seed"] % 2 else 0.99)} for r in rows[:3]]
    assert A.summarize_ablation(same)[0]["vs_start"].startswith(A.NOT_SEPARABLE)
