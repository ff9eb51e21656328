"""The README results block is formatted from result rows, and replacing it is idempotent."""

import json
import math
import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rcp_lib.report import BEGIN, END, longer_qat_markdown, ppl_markdown, update_readme, zero_shot_markdown


def _ppl_rows():
    common = {"model": "m", "corpus": "c", "seqlen": 8, "windows": 2, "tokens_scored": 14, "git_commit": "abc",
              "date_utc": "d", "device": "cpu"}
    qat = json.dumps({"qat": {"steps": 3, "batch_size": 1, "grad_accum": 1, "seqlen": 8, "lr_weights": 1e-4, "lr_quant": 1e-2,
                              "grad_clip": 1.0}})
    return pd.DataFrame([
        {"method": "FP", "setting": "FP", "family": "baseline", "ppl": 10.0, "config": "{}", **common},
        {"method": "RTN", "setting": "W2A4KV4", "family": "ptq", "ppl": 12345.0, "config": "{}", **common},
        {"method": "RTN", "setting": "W4A4KV4", "family": "ptq", "ppl": 20.5, "config": "{}", **common},
        {"method": "RCP", "setting": "W2A4KV4", "family": "qat", "ppl": 30.25, "config": qat, **common},
    ])


def test_ppl_markdown_layout():
    md = ppl_markdown(_ppl_rows()).splitlines()
    assert md[0] == "| method | family | W2A4KV4 | W4A4KV4 |"
    assert md[2] == "| FP | baseline | 10.00 | 10.00 |"
    assert md[3] == "| RTN | ptq | 12345 | 20.50 |"
    assert md[4] == "| RCP | qat | 30.25 | – |" and len(md) == 5
    rows = _ppl_rows().assign(step0_ppl=[None, None, None, 190.5])  # the QAT row's start, scored on its windows
    md = ppl_markdown(rows).splitlines()
    assert md[4:] == ["| RCP | qat | 30.25 | – |", "| RCP start (no QAT) | start | 190 | – |"]


def test_zero_shot_markdown_layout():
    df = pd.DataFrame([
        {"method": "FP", "setting": "FP", "task": "t1", "metric": "acc", "value": 0.5, "stderr": 0.05, "n_examples": 100},
        {"method": "FP", "setting": "FP", "task": "t1", "metric": "acc_norm", "value": 0.6, "stderr": 0.05, "n_examples": 100},
        {"method": "RCP", "setting": "W2A4KV4", "task": "t1", "metric": "acc", "value": 0.25, "stderr": 0.04, "n_examples": 100},
    ])
    md = zero_shot_markdown(df).splitlines()
    assert md[0] == "| method | setting | t1 acc (n=100) | t1 acc_norm (n=100) |"
    assert md[2:] == ["| FP | FP | 0.500 ± 0.050 | 0.600 ± 0.050 |", "| RCP | W2A4KV4 | 0.250 ± 0.040 | – |"]


def test_update_readme_replaces_block_idempotently(tmp_path, monkeypatch):
    monkeypatch.setenv("RCP_FIGURES_DIR", str(tmp_path / "figs"))
    res = tmp_path / "results"
    res.mkdir()
    _ppl_rows().to_csv(res / "perplexity.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{BEGIN}\n\n## next section\n")
    update_readme("cpu", readme=readme, results=res)
    once, summary = readme.read_text(), (res / "SUMMARY.md").read_text()
    assert once.startswith("intro\n\n" + BEGIN) and once.count(END) == 1 and once.endswith("\n\n## next section\n")
    # the README holds the claim table and a link; SUMMARY.md every table with its protocol
    assert "| claim (the paper's numbers) |" in once and "(results/cpu/SUMMARY.md)" in once
    assert "### Measured here: `cpu` profile" in once and "# Results of" not in once
    assert summary.startswith("# Results of the `cpu` profile")
    assert "| RCP | qat | 30.25 | – |" not in once
    assert "| RCP | qat | 30.25 | – |" in summary and "3 steps" in summary and "loss `kl`" in summary
    assert "learning rates 0.0001 (weights) / 0.01 (quantizer), gradient clip 1" in summary
    assert "](../figs/cpu/perplexity.png)" in summary  # the figures root relative to the folder of SUMMARY.md
    update_readme("cpu", readme=readme, results=res)
    assert readme.read_text() == once and (res / "SUMMARY.md").read_text() == summary


def test_update_readme_needs_results(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(BEGIN)
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        update_readme("cpu", readme=readme, results=tmp_path)


def test_longer_qat_rows_sit_next_to_the_main_table(tmp_path):
    main = _ppl_rows()
    longer = main[main.family == "qat"].copy()
    longer["ppl"] = 25.0
    longer["config"] = json.dumps({"qat": {"steps": 12, "batch_size": 1, "grad_accum": 2, "seqlen": 8}})
    extra = longer.iloc[[0]].assign(method="RCP w/o Clip", ppl=27.5)
    md = longer_qat_markdown(main, pd.concat([longer, extra])).splitlines()
    assert md[2] == "| RCP | W2A4KV4 | 3: 30.25 | 12: 25.00 |"
    assert md[3] == "| RCP w/o Clip | W2A4KV4 | – | 12: 27.50 |"
    res = tmp_path / "results"
    res.mkdir()
    main.to_csv(res / "perplexity.csv", index=False)
    longer.to_csv(res / "perplexity_qat_12steps.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(BEGIN)
    update_readme("cpu", readme=readme, results=res)
    text = (res / "SUMMARY.md").read_text()
    assert "perplexity_qat_12steps.csv" in text and "12 steps × 16 tokens" in text and "| RCP | W2A4KV4 | 3: 30.25 | 12: 25.00 |" in text


def test_gsr_control_pairs_from_rows():
    from rcp_lib.report import gsr_control_markdown

    df = pd.DataFrame([
        {"method": "GSR-GPTQ", "setting": "W2A4KV4", "ppl": 200.0, "r1_block": 64},
        {"method": "BlockHadamard-GPTQ", "setting": "W2A4KV4", "ppl": 100.0, "r1_block": 64},
        {"method": "GSR-GPTQ", "setting": "W4A4KV4", "ppl": 30.0, "r1_block": 64},
    ])
    md = gsr_control_markdown(df).splitlines()
    assert md[2] == "| GSR-GPTQ vs BlockHadamard-GPTQ | W2A4KV4, block 64 | 200 | 100 | 2.000 |"
    assert len(md) == 3  # no control row at W4A4KV4


def _readme_static() -> str:
    from rcp_lib.paths import readme_path

    text = readme_path().read_text()
    a, b = text.index(BEGIN), text.index(END)
    return text[:a] + text[b:]


def test_readme_prose_quotes_no_measured_number():
    """Measured numbers live only in the generated block (python -m rcp_lib readme). Outside it, a number with a
    unit of a measurement is either the paper's (quoted as such) or a stated budget."""
    import re

    allowed = {"5.29×",  # the paper's headline, quoted as the paper's
               "15-minute", "15 minutes", "80 GB",  # the test-time budget; the GPU memory in the estimate table's header
               "8.5 %"}  # the cross-CPU spread of quantized rows ("Reproducibility across machines"): two machines'
                         # runs of the same code (AVX2 vs AVX-512 EPYC), not a number of results/
    found = set(re.findall(r"(?<![\w.-])\d+(?:\.\d+)?(?:×|-minute| ?%| min\b| minutes?\b| ?h\b| hours?\b| ms\b| GB\b)",
                           _readme_static()))
    assert found <= allowed, found - allowed
    assert "| claim" not in _readme_static()  # the claim table is generated from results/


def test_docs_gpu_memory_table_matches_the_estimator():
    """The QAT memory-per-GPU table in docs/reproducing.md is an estimate: every cell equals qat_memory_per_gpu's
    output."""
    import re

    from rcp_lib.experiments import REFERENCE_CONFIGS
    from rcp_lib.paths import REPO_ROOT
    from rcp_lib.train_memory import qat_memory_per_gpu

    text = (REPO_ROOT / "docs" / "reproducing.md").read_text()
    rows = [l for l in text.splitlines() if re.match(r"\| LLaMA-[\w.-]+ \| \d+ \| (single|FSDP|DDP) \|", l)]
    assert len(rows) >= 4
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        name, n, strat = cells[0], int(cells[1]), cells[2].lower()
        est = qat_memory_per_gpu(REFERENCE_CONFIGS[name], n_gpus=n, strategy="ddp" if strat == "ddp" else "fsdp")
        got = [float(c) for c in cells[3:7]]
        want = [est[k] for k in ("student_states_gb", "teacher_gb", "activations_gb", "total_gb")]
        assert got == [round(w, 1) for w in want], (line, want)


def test_rotation_markdown_pairs_gsr_with_its_control():
    from rcp_lib.report import rotation_markdown

    base = {"kurtosis": 3.0, "err_uniform": 0.2, "err_uniform_clip": 0.1, "err_nonuniform_pinned": 0.09,
            "err_nonuniform": 0.085, "range_gain": 2.0, "shape_gain": 1.1}
    df = pd.DataFrame([
        {"rotation": "none", "block": None, "group_size": 64, **base, "kurtosis": 12.0, "err_uniform": 0.25},
        {"rotation": "random_hadamard", "block": None, "group_size": 64, **base},
        {"rotation": "gsr:64/g32", "block": 64, "group_size": 32, **base},
        {"rotation": "block_hadamard:64/g32", "block": 64, "group_size": 32, **base, "err_uniform": 0.21},
    ])
    md = rotation_markdown(df)
    assert "| gsr:64/g32 | 64 | 32 | 3.00 | 0.200 |" in md and "| none | – | 64 | 12.00 |" in md
    assert "`gsr:64/g32` vs `block_hadamard:64/g32` (block 64, groups of 32): largest relative difference of the " \
           "mean errors 4.8 %" in md
    from rcp_lib.report import CLAIMS_FILE, claim_values, render_claims

    claims = [c for c in yaml.safe_load(CLAIMS_FILE.read_text())["claims"] if "rot[" in c["measured"]]
    rows, left_out = render_claims(claims, claim_values(Path("/nonexistent"), _ppl_rows()) | {
        "rot": df.set_index("rotation").to_dict("index")})
    assert len(claims) == 1 and not left_out
    assert "kurtosis 12 → 3 (random Hadamard)" in rows[2] and "the range accounts for 2×" in rows[2]


def test_sweep_markdown_states_best_point_seeds_and_init_ratios():
    from rcp_lib.report import sweep_markdown

    from rcp_lib.experiments.sweep import select

    base = {"steps": 40, "tokens": 10240, "val_split": "train tail", "step0_val_ppl": 5e4}
    grid = [(1e-2, 1e-4, "search", [400.0, 420.0, 410.0]), (1e-2, 1e-4, "const", [1200.0]),
            (1e-3, 1e-4, "search", [500.0, 700.0, 600.0]), (1e-3, 1e-4, "const", [1000.0]),
            (1e-3, 2e-5, "search", [300.0])]  # lowest single run, but one seed: not selectable
    rows = [{"point": p, "seed": s, "lr_quant": q, "lr_weights": w, "grad_clip": 1.0, "init": i, "val_ppl": v, **base}
            for p, (q, w, i, vals) in enumerate(grid) for s, v in enumerate(vals)]
    md = sweep_markdown(pd.DataFrame(select(rows)))
    assert "5 points (9 runs; 2 points at 3 seeds), 40 steps × 256 tokens" in md
    assert "lr_quant 0.01, lr_weights 0.0001, grad clip 1, search start → validation perplexity 410 ± 5.77 (standard error)" in md
    assert "over 3 seed(s)" in md
    # 600 ± 57.7 vs 410 ± 5.77 at the same seeds: recomputed from the rows, paired by seed (Welch alone: p ~ 0.06)
    assert "Point 2 (lr_quant 0.001, lr_weights 0.0001, grad clip 1): 600 ± 57.74 over 3 seeds; point 0 < point 2 " \
           "(paired p = " in md
    # const vs search at the same seed (seed 0): 1200 / 400 and 1000 / 500
    assert "in all 2 runs of a learning-rate pair both ways at the same seed (2.0–3.0× lower" in md


def test_ablation_block_in_readme(tmp_path):
    """results/ablation/ablation_summary.csv next to the profile's folder adds the seeded table, with the orders of
    its rows and no cause for a gap."""
    from rcp_lib.report import results_markdown

    res = tmp_path / "cpu"
    res.mkdir()
    _ppl_rows().to_csv(res / "perplexity.csv", index=False)
    assert "Ablation with seeds" not in results_markdown("cpu", res)
    (tmp_path / "ablation").mkdir()
    pd.DataFrame([
        {"method": "RCP", "setting": "W2A4KV4", "n": 3, "ppl_mean": 400.0, "ppl_std": 10.0, "ppl_sem": 5.77,
         "step0_ppl_mean": 5e4, "clip_ratio_init_mean": 0.672, "clip_ratio_final_mean": 0.671, "clip_shift_mean": 0.012,
         "level_shift_mean": 0.013, "weight_shift_mean": 0.0034, "vs_RCP": float("nan"), "git_commit": "abc"},
        {"method": "RCP w/o Clip", "setting": "W2A4KV4", "n": 3, "ppl_mean": 410.0, "ppl_std": 30.0, "ppl_sem": 17.3,
         "step0_ppl_mean": 6e4, "clip_ratio_init_mean": 1.0, "clip_ratio_final_mean": 1.0, "clip_shift_mean": 0.0,
         "level_shift_mean": 0.02, "weight_shift_mean": 0.0035, "vs_RCP": "not separable at this budget (Welch p = 0.5, n = 3, 3)",
         "git_commit": "abc"},
    ]).to_csv(tmp_path / "ablation" / "ablation_summary.csv", index=False)
    md = results_markdown("cpu", res)
    assert "| RCP | 3 | 400 ± 5.77 | 50000 | – | 0.672 → 0.671 | 0.0120 | 0.0130 | – | 0.0034 | – |" in md
    assert "| RCP w/o Clip | 3 | 410 ± 17.30 |" in md and "not separable at this budget (Welch p = 0.5, n = 3, 3) |" in md
    assert "Not comparable row to row" not in md  # no fingerprints recorded on either side: nothing to compare
    assert "reproduce --profile ablation` took" not in md  # no timing file: no time line
    (tmp_path / "ablation" / "reproduce_timing.json").write_text(json.dumps(
        {"total_seconds": 5580.0, "device": "cpu x2", "git_commit": "abcdef012345", "date_utc": "2026-12-08",
         "notebooks": {"06_ablation.ipynb": 5578.9}, "rows": {"06_ablation.ipynb": {"computed": 28, "hits": 61}}}))
    md = results_markdown("cpu", res)  # the ablation profile's own run time, with what it took from the cache
    assert ("The last full `reproduce --profile ablation` took **93 min** computing 28 result rows and taking 61 from "
            "the cache") in md.split("Ablation with seeds")[1]
    with_range = pd.read_csv(tmp_path / "ablation" / "ablation_summary.csv").assign(range_shift_mean=[0.0023, 0.0])
    from rcp_lib.report import ablation_markdown

    rmd = ablation_markdown(with_range).splitlines()  # the range's own movement, where the rows record it
    assert "mean \\|Δ clip ratio\\| | mean \\|Δ range\\| / range | mean \\|Δ level\\|" in rmd[0]
    assert rmd[2].startswith("| RCP | 3 | 400 ± 5.77 | 50000 | – | 0.672 → 0.671 | 0.0120 | 0.0023 | 0.0130 |")
    cells = [s.replace("\\|", "").count("|") for s in rmd[:3]]  # column separators, not escaped pipes
    assert cells[0] == cells[1] == cells[2] == 13
    abl = pd.read_csv(tmp_path / "ablation" / "ablation_summary.csv")
    extra = {**abl.iloc[1].to_dict(), "method": "RCP w/o Rotate", "ppl_mean": 4000.0, "vs_RCP": "RCP < RCP w/o Rotate (Welch p = 0.01, n = 3, 3)"}
    abl = pd.concat([abl, pd.DataFrame([extra])], ignore_index=True)
    abl.loc[1, "vs_RCP"] = "RCP < RCP w/o Clip (Welch p = 0.01, n = 3, 3)"
    abl["code_fingerprint"] = "new"
    abl.to_csv(tmp_path / "ablation" / "ablation_summary.csv", index=False)
    rows = _ppl_rows()
    rows["code_fingerprint"] = "old"
    rows.to_csv(res / "perplexity.csv", index=False)
    md = results_markdown("cpu", res)
    # the report prints the rows and their tests, and states no cause for a gap
    assert "| RCP w/o Clip | 3 | 410 ± 17.30 |" in md and "RCP < RCP w/o Clip (Welch p = 0.01, n = 3, 3) |" in md
    assert "the gap comes from the searched clip start" not in md and "its clip ratio starts at" not in md
    assert "**Not comparable row to row:** the ablation ran with code new and the perplexity table with code old" in md


def test_code_versions_sentence_checks_the_rows_both_files_compute():
    """Table and ablation at different code: the rows both compute (method, setting, seed) decide the sentence."""
    from rcp_lib.report import code_versions_markdown

    ppl = _ppl_rows().assign(seed=0, code_fingerprint="old")
    summary = pd.DataFrame([{"method": "RCP", "setting": "W2A4KV4", "code_fingerprint": "new"}])
    seeds = pd.DataFrame([{"method": "RCP", "setting": "W2A4KV4", "seed": s, "ppl": v}
                          for s, v in ((0, 30.25), (1, 41.0), (2, 39.0))])
    assert code_versions_markdown(ppl, summary.assign(code_fingerprint="old"), seeds) == ""  # same code
    md = code_versions_markdown(ppl, summary, seeds)
    assert md.startswith("Code versions: the ablation ran with code new and the perplexity table with code old")
    assert "(RCP W2A4KV4 seed 0: 30.25) are identical in both files" in md and "Not comparable" not in md
    md = code_versions_markdown(ppl, summary, seeds.assign(ppl=[30.5, 41.0, 39.0]))
    assert md.startswith("**Not comparable row to row:**") and "RCP W2A4KV4 seed 0: 30.50 vs 30.25" in md
    md = code_versions_markdown(ppl, summary, seeds.assign(seed=[1, 2, 3]))  # seed 0 is not in the ablation
    assert md.startswith("**Not comparable row to row:**") and "they share no row" in md
    assert "they share no row" in code_versions_markdown(ppl, summary, None)


def test_readme_block_flags_an_ablation_of_other_code(tmp_path):
    """The README's block, not only SUMMARY, says when the claims "with seeds" (results/ablation/) come from another
    code version than the table beside them and their shared rows differ; nothing when the code is the same."""
    from rcp_lib.report import readme_markdown

    res, abl = tmp_path / "cpu", tmp_path / "ablation"
    res.mkdir()
    abl.mkdir()
    ppl = _ppl_rows().assign(seed=0, code_fingerprint="old")
    ppl.to_csv(res / "perplexity.csv", index=False)
    seeds = pd.DataFrame([{"method": "RCP", "setting": "W2A4KV4", "seed": s, "ppl": v, "code_fingerprint": "new"}
                          for s, v in ((0, 30.5), (1, 41.0), (2, 39.0))])
    seeds.to_csv(abl / "ablation.csv", index=False)
    seeds.iloc[:1].to_csv(abl / "ablation_summary.csv", index=False)
    md = readme_markdown("cpu", res)
    assert "**Not comparable row to row:** the ablation ran with code new" in md
    assert "RCP W2A4KV4 seed 0: 30.50 vs 30.25" in md
    seeds.assign(code_fingerprint="old").iloc[:1].to_csv(abl / "ablation_summary.csv", index=False)
    assert "Not comparable" not in readme_markdown("cpu", res) and "Code versions" not in readme_markdown("cpu", res)


def test_reconstruction_recipe_prose_matches_the_configs():
    """The QAT settings the prose of docs/reconstruction.md names are the cpu profile's defaults and the paper
    config's."""
    from rcp_lib.paths import REPO_ROOT
    from rcp_lib.run_config import RunConfig
    from rcp_lib.profiles import get_profile

    from rcp_lib.experiments.methods import profile_qat_recipe, qat_config

    text = " ".join((REPO_ROOT / "docs" / "reconstruction.md").read_text().split())
    P = get_profile("cpu")
    q = qat_config(P)
    lr = lambda x: f"{x:.0e}".replace("e-0", "e-")  # 1e-4, as the prose writes it
    assert (f"`lr_range` {lr(q.lr_range)}, the same relative step in every layer), {lr(q.lr_quant)} for the levels "
            f"and gradient clip {q.grad_clip:.1f}") in text
    assert f"and {lr(q.lr_weights)} for the weights, selected again under the GPTQ start" in text
    assert profile_qat_recipe(P).weight == {"clip_init": "mse", "ldp_init": "lloyd", "range_mode": "static",
                                            "range_param": "log"}
    assert q.gptq_start and "a GPTQ start on each QAT row's own grid" in text
    paper = RunConfig.load(REPO_ROOT / "configs" / "paper-llama2-7b.yaml").recipe.qat
    assert f"keeps {lr(paper.lr_weights)} / {lr(paper.lr_quant)} and the searched start without GPTQ for its " \
           f"{paper.steps} steps" in text


def test_readme_names_the_analysed_layers(tmp_path):
    from rcp_lib.profiles import get_profile

    res = tmp_path / "results"
    res.mkdir()
    _ppl_rows().to_csv(res / "perplexity.csv", index=False)
    pd.DataFrame([{"rotation": "none", "block": float("nan"), "group_size": 64, "kurtosis": 3.0, "err_uniform": 0.3,
                   "err_uniform_clip": 0.2, "err_nonuniform_pinned": 0.15, "err_nonuniform": 0.1}]).to_csv(
        res / "rotation_impact_summary.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(BEGIN)
    update_readme("cpu", readme=readme, results=res)
    layers = get_profile("cpu").analysis_layers
    text = (res / "SUMMARY.md").read_text()
    assert layers and f"mean over the decoder layers {', '.join(map(str, layers))} (`analysis_layers`" in text


def test_committed_rotation_rows_cover_the_layers_the_readme_names():
    """The README names the analysed layers from the cpu profile: the committed rows must be those layers (a profile
    edit without a rerun would make the sentence wrong)."""
    from rcp_lib.experiments.registry import result_path
    from rcp_lib.profiles import get_profile

    path = result_path("rotation_impact_layers", "cpu")
    if not path.exists():
        pytest.skip("no committed results/cpu/rotation_impact_layers.csv")
    layers = sorted(set(pd.read_csv(path)["layer"].astype(int)))
    assert layers == sorted(get_profile("cpu").analysis_layers or layers)


def test_variants_markdown_states_orders_from_the_rows():
    from rcp_lib.experiments.variants import summarize
    from rcp_lib.report import variants_markdown

    def rows(name, vals, secs, **kw):
        return [{"variant": name, "seed": s, "val_ppl": v, "seconds": secs,
                 "step0_val_ppl": 5000.0, "tokens": 10240, "block_ap_mse_ratio": float("nan"), "clip_shift": 0.005,
                 "level_shift": 0.01, "weight_shift": 7e-4, "val_split": "train tail (0.05), 16 windows spread", **kw}
                for s, v in enumerate(vals)]

    cfg = {n: {"method": "RCP", "rotation": {"r1": "random_hadamard", "seed": 0},
               "quant": {"weight": {"range_mode": m, "clip_init": "mse", "ldp_init": "lloyd"}},
               "qat": {"gptq_start": g, "lr_range": 1e-4 if g else None, "lr_quant": 1e-2, "steps": st, "seqlen": 256,
                       "val_every": 40, "seed": 0}}
           for n, m, g, st in (("default", "relative", False, 40), ("fast", "static", True, 40),
                               ("noisy", "relative", False, 21))}
    cfg["noisy"]["qat"].update(block_ap_steps=16, block_ap_samples=16, block_ap_lr_weights=2e-5, block_ap_lr_quant=1e-2)
    df = pd.DataFrame(summarize(rows("default", (500., 520., 510.), 180.) + rows("fast", (300., 310., 305.), 170.)
                                + rows("noisy", (400., 650., 520.), 190., block_ap_mse_ratio=0.8)))
    df["config"] = [json.dumps(cfg[v]) for v in df["variant"]]
    md = variants_markdown(df)
    assert ("| fast | GPTQ start, static range (lo / hi at lr 0.0001); 40 end-to-end steps × 256 tokens | 3 | "
            "305 ± 2.89 |") in md and "| 170 | 10240 | – |" in md
    assert "| default | clip `mse`, levels `lloyd`, no GPTQ; 40 end-to-end steps × 256 tokens |" in md
    assert ("| noisy | clip `mse`, levels `lloyd`, no GPTQ; Block-AP 16 steps per block on 16 windows (lr 2e-05 / "
            "0.01); 21 end-to-end steps × 256 tokens |") in md and "| 0.800 |" in md
    assert "Lower than the default (t-test, p < 0.05): fast." in md
    assert "Not separable from the default at this budget: noisy." in md and "is kept" not in md
    md2 = variants_markdown(df[df.variant != "fast"])
    assert "No variant is lower than the default at p < 0.05." in md2
    table = {**cfg["fast"], "qat": {**cfg["fast"]["qat"], "val_every": 20, "seed": 3},
             "rotation": {"r1": "random_hadamard", "seed": 3}}
    assert "The perplexity table's RCP rows train with the recipe of `fast`." in variants_markdown(df, table)
    other = {**table, "qat": {**table["qat"], "steps": 80}}
    assert "trains with none of these recipes" in variants_markdown(df, other)


def test_timing_line_counts_rows_of_this_code(tmp_path):
    """The reproduce timing line says how many rows the run computed and took from the cache (keys hold the code
    fingerprint), not how many row files of any code the cache held."""
    from rcp_lib.report import results_markdown

    res = tmp_path / "cpu"
    res.mkdir()
    _ppl_rows().to_csv(res / "perplexity.csv", index=False)
    timing = {"total_seconds": 3504.8, "device": "cpu x2", "git_commit": "abcdef012345", "date_utc": "2026-11-27",
              "notebooks": {"01_rotation_impact.ipynb": 138.0, "02_perplexity.ipynb": 2640.0},
              "rows": {"01_rotation_impact.ipynb": {"computed": 9, "hits": 0}, "02_perplexity.ipynb": {"computed": 29,
                                                                                                    "hits": 5}},
              "cached_rows_at_start": 77}
    (res / "reproduce_timing.json").write_text(json.dumps(timing))
    md = results_markdown("cpu", res)
    assert "took **58 min** computing 38 result rows and taking 5 from the cache of this code on cpu x2" in md
    assert "77" not in md.split("took **58 min**")[1].split("\n")[0]


def test_token_curve_paragraph_reads_the_curve(tmp_path):
    """The token-curve paragraph quotes the first and last validation points against FP, the last doubling of tokens
    and the run's movement, all from the rows; the README block carries it when ``qat_tokens.csv`` exists."""
    from rcp_lib.report import results_markdown, token_curve_markdown

    def row(step, ppl):
        return {"method": "RCP", "setting": "W2A4KV4", "step": step, "tokens": 256 * step, "val_ppl": ppl,
                "fp_val_ppl": 20.0, "val_seqlen": 256, "val_windows": 16, "run_clip_shift": 0.004,
                "run_level_shift": 0.02, "run_weight_shift": 1.5e-3, "git_commit": "abcdef0123456789"}

    curve = pd.DataFrame([row(s, p) for s, p in ((40, 200.0), (80, 120.0), (120, 100.0), (160, 80.0))])
    md = token_curve_markdown(curve.sample(frac=1.0, random_state=0), "cpu")  # order of the rows does not matter
    assert "--steps 160 --val-every 40" in md and "git abcdef01" in md
    assert "Validation perplexity 200 at 10,240 tokens (10× FP) → 80.00 at 40,960 tokens (4× FP; FP 20.00)" in md
    assert "The last doubling of tokens (20,480 → 40,960) lowered it by 33 %." in md
    assert "clip ratio moved by 0.0040 and the level fractions by 0.0200" in md and "by 0.0015 (relative" in md
    assert "![qat_tokens](figures/cpu/qat_tokens.png)" in md
    flat = curve.assign(val_ppl=[200.0, 90.0, 100.0, 95.0])
    assert "did not lower it (90.00 → 95.00)" in token_curve_markdown(flat)

    res = tmp_path / "cpu"
    res.mkdir()
    _ppl_rows().to_csv(res / "perplexity.csv", index=False)
    assert "How far would more tokens go" not in results_markdown("cpu", res)
    other = tmp_path / "cpu-aaaa"  # a curve of another recipe: not the profile's
    other.mkdir()
    curve.assign(overrides=json.dumps({"qat_steps": 160, "qat_overrides": {"qat": {"lr_quant": 0.1}}}),
                 date_utc="2026-12-01").to_csv(
        other / "qat_tokens.csv", index=False)
    assert "How far would more tokens go" not in results_markdown("cpu", res)
    for name, date, steps in (("cpu-bbbb", "2026-11-02", 160), ("cpu-cccc", "2026-11-03", 640)):  # the newest one
        (tmp_path / name).mkdir()
        curve.assign(overrides=json.dumps({"qat_steps": steps, "qat_val_every": 40}), date_utc=date).to_csv(
            tmp_path / name / "qat_tokens.csv", index=False)
    md = results_markdown("cpu", res)
    assert ("(`python -m rcp_lib.experiments.curve --profile cpu --steps 160 --val-every 40`; "
            "`results/cpu-cccc/qat_tokens.csv`") in md and "![qat_tokens](figures/cpu-cccc/qat_tokens.png)" in md
    curve.to_csv(res / "qat_tokens.csv", index=False)  # in the profile's own folder: that one
    assert "`results/cpu/qat_tokens.csv`" in results_markdown("cpu", res)


def test_ablation_start_columns():
    """With ``ablation_start.csv`` the table gets the clip ratio against the FP weights and the level offset from the
    uniform grid (means over seeds): the movement columns of a GPTQ start are 1 for every row."""
    from rcp_lib.report import ablation_markdown

    def summ(method, ppl, vs):
        return {"method": method, "setting": "W2A4KV4", "n": 3, "ppl_mean": ppl, "ppl_std": 5.0, "ppl_sem": 2.9,
                "step0_ppl_mean": 200.0, "clip_ratio_init_mean": 1.0, "clip_ratio_final_mean": 1.0,
                "clip_shift_mean": 0.003, "level_shift_mean": 0.012, "weight_shift_mean": 7e-4, "vs_RCP": vs}

    summary = pd.DataFrame([summ("RCP", 90.0, ""), summ("RCP w/o Clip", 300.0, "RCP < RCP w/o Clip (Welch p = 0.01, n = 3, 3)"),
                            summ("Uniform-QAT", 120.0, "RCP < Uniform-QAT (Welch p = 0.02, n = 3, 3)"),
                            summ("RCP w/o Rotate", 900.0, "RCP < RCP w/o Rotate (z)")])
    start = pd.DataFrame([
        {"method": m, "seed": sd, "clip_ratio_start": c0, "clip_ratio_trained": c0 + d, "clip_shift": abs(d) + 0.001,
         "level_offset_start": l0, "level_offset_trained": l0 + 0.001}
        for m, c0, l0 in (("RCP", 0.67, 0.05), ("RCP w/o Clip", 1.0, 0.06), ("Uniform-QAT", 0.67, 0.0),
                          ("RCP w/o Rotate", 0.5, 0.04))
        for sd, d in ((0, 0.002), (1, 0.004))])
    md = ablation_markdown(summary, start)
    assert "clip ratio vs FP weights: start → trained | levels off uniform: start → trained | vs RCP |" in md
    assert "| 0.670 → 0.673 | 0.0500 → 0.0510 | – |" in md  # RCP, means over its two seeds
    assert "| 1.000 → 1.003 | 0.0600 → 0.0610 | RCP < RCP w/o Clip (Welch p = 0.01, n = 3, 3) |" in md
    assert "| 0.500 → 0.503 | 0.0400 → 0.0410 |" in md  # w/o Rotate, means over its two seeds
    assert "which neither GPTQ nor QAT touched" in md  # the columns, and no cause written by the report:
    assert "the gap comes from" not in md and "off the uniform grid instead of RCP's" not in md
    plain = ablation_markdown(summary)  # without the file: no such columns
    assert "vs FP weights" not in plain
    assert "| – | – |" in ablation_markdown(summary, start[start.method != "RCP w/o Rotate"])


def test_gptq_sweep_table_orders_from_the_seeds():
    """The GPTQ-start sweep table: one line per point with mean ± SE, movement means and the order against the
    selected point recomputed from the per-seed values (paired by seed)."""
    from rcp_lib.report import sweep_table_markdown

    rows = []
    for p, (lw, vals) in enumerate(((2e-5, (100.0, 110.0, 105.0)), (1e-3, (150.0, 170.0, 160.0)))):
        for seed, v in enumerate(vals):
            rows.append({"point": p, "lr_quant": 1e-2, "lr_weights": lw, "grad_clip": 0.3, "init": "search",
                         "lr_range": 1e-3, "seed": seed, "best": p == 0, "val_ppl": v, "n_seeds": 3,
                         "val_ppl_mean": sum(vals) / 3, "val_ppl_sem": 2.9, "step0_val_ppl": 220.0, "steps": 40,
                         "tokens": 10240, "clip_shift": 0.002, "level_shift": 0.01, "code_flips": 1e-6 * (p + 1),
                         "weight_shift": 0.001, "val_split": "train tail", "config": "{}"})
    md = sweep_table_markdown(pd.DataFrame(rows))
    assert "| 0 | 2e-05 | 0.01 | 0.001 | 3 | 105 ± 2.90 | 220 | 0.0020 | 0.0100 | 1e-06 | 0.001 | selected |" in md
    assert "| 1 | 0.001 | 0.01 | 0.001 | 3 | 160 ± 2.90 |" in md and "point 0 < point 1 (paired p = " in md
    # the axis left to the recipe (None): the rate is read from each row's config, "–" when it has none
    fallback = [{**r, "lr_range": None, "config": '{"qat": {"lr_range": 0.002}}' if r["point"] == 0 else "{}"}
                for r in rows]
    md = sweep_table_markdown(pd.DataFrame(fallback))
    assert "| 0 | 2e-05 | 0.01 | 0.002 | 3 |" in md and "| 1 | 0.001 | 0.01 | – | 3 |" in md
    assert "marks no selected point" in sweep_table_markdown(pd.DataFrame([{**r, "best": False} for r in rows]))


def test_gsr_decision_markdown():
    from rcp_lib.report import gsr_decision_markdown

    rows = [{"part": "activations", "method": m, "r1": r, "seed": s, "ppl": v, "block": 64, "w_group": None,
             "deterministic": False}
            for m, r, vals in (("QuaRot (random Hadamard)", "random_hadamard", (34.0, 34.5, 35.0)),
                               ("GSR + random signs", "gsr", (49.0, 50.0, 51.5)))
            for s, v in enumerate(vals)]
    rows.append({"part": "activations", "method": "GSR", "r1": "gsr", "seed": 0, "ppl": 49.9, "block": 64,
                 "w_group": None, "deterministic": True})
    rows += [{"part": "weights", "method": f"x g{g}", "r1": r, "seed": s, "ppl": v + s, "block": 64, "w_group": g}
             for g in (16, 32) for r, v in (("gsr", 300.0), ("block_hadamard", 310.0)) for s in range(3)]
    md = gsr_decision_markdown(pd.DataFrame(rows))
    assert "| GSR + random signs | 3 | 50.17 ±" in md and "QuaRot (random Hadamard) < GSR + random signs (paired p = " in md
    assert "| GSR | 1 | 49.90 (deterministic: one exact run) | no test (deterministic, one run) |" in md
    # a constant difference over seeds: the paired test has zero spread
    assert "| 16 (64) | 301 ± 0.58 | 311 ± 0.58 | GSR < control (paired p = " in md


def _claim_table(tmp_path, fp: float = 22.13) -> str:
    """The claim table of a results folder ``tmp_path/cpu`` whose FP row is ``fp``, with ``tmp_path/ablation``."""
    from rcp_lib.report import claims_markdown

    res = tmp_path / "cpu"
    res.mkdir(exist_ok=True)
    ppl = _ppl_rows()
    ppl.loc[ppl.method == "FP", "ppl"] = fp
    return claims_markdown(res, ppl)


def test_seeded_claims(tmp_path, capsys):
    """The claims decided with seeds: each status is a t-test's phrase recomputed from the per-seed rows; a claim
    whose methods or file are missing is left out, and named on stderr."""
    from rcp_lib.stats import order

    (tmp_path / "ablation").mkdir()
    vals = {"RCP": ((90.0, 118.0, 88.0), (190.0, 205.0, 188.0)), "Uniform-QAT": ((150.0, 127.0, 135.0), (210.0, 211.0, 212.0)),
            "RCP clip frozen": ((91.0, 119.0, 88.5), (190.0, 205.0, 188.0))}
    rows = [{"method": name, "setting": "W2A4KV4", "seed": s, "ppl": v, "step0_ppl": st, "clip_shift": 0.002,
             "level_shift": 0.012} for name, (vs, starts) in vals.items() for s, (v, st) in enumerate(zip(vs, starts))]
    pd.DataFrame(rows).to_csv(tmp_path / "ablation" / "ablation.csv", index=False)
    out = _claim_table(tmp_path)
    assert "| QAT recovers W2A4KV4 (RCP) | RCP 98.67 ± 9.68 (3 seeds), 4.46× the FP perplexity" in out
    assert "| RCP < RCP start (paired p = " in out
    assert ("RCP 98.67 ± 9.68 (3 seeds), 3 bits per weight vs Uniform-QAT 137 ± 6.74 (3 seeds), 2.5 bits per weight | "
            f"{order('RCP', list(vals['RCP'][0]), 'Uniform-QAT', list(vals['Uniform-QAT'][0]), kind='paired')} |") in out
    assert "| learning the clip helps |" in out and "learning the levels" not in out
    assert "GSR" not in out  # no gsr_decision.csv
    err = capsys.readouterr().err
    assert "claim left out of cpu's table: 'learning the levels helps': no value for 'RCP levels frozen'" in err
    pd.DataFrame([{"part": "activations", "method": m, "seed": s, "ppl": v}
                  for m, vs in (("QuaRot (random Hadamard)", (33.2, 33.4, 32.9)), ("GSR + random signs", (49.0, 48.3, 46.4)))
                  for s, v in enumerate(vs)]).to_csv(tmp_path / "ablation" / "gsr_decision.csv", index=False)
    out = _claim_table(tmp_path)
    assert "QuaRot (random Hadamard) < GSR + random signs (paired p = " in out
    assert "sequency order at 2-bit weights" not in out  # no weight part yet
    wrows = [{"part": "weights", "method": f"{m} g{grp}", "block": 64, "w_group": grp, "seed": s, "ppl": v}
             for grp in (16, 32) for m, vs in (("GSR-GPTQ", (120.0, 121.0, 119.5)),
                                               ("BlockHadamard-GPTQ", (120.5, 118.0, 121.0)))
             for s, v in enumerate(vs)]
    pd.concat([pd.read_csv(tmp_path / "ablation" / "gsr_decision.csv"), pd.DataFrame(wrows)]).to_csv(
        tmp_path / "ablation" / "gsr_decision.csv", index=False)
    lines = [ln for ln in _claim_table(tmp_path).splitlines() if "sequency order at 2-bit weights" in ln]
    assert len(lines) == 2 and "R1 blocks of 64, weight groups of 16: GSR 120 ± 0.44 (3 seeds)" in lines[0]
    assert all("not separable at this budget (paired p = " in ln for ln in lines)


def test_seeded_claims_ptq_and_equal_bits(tmp_path):
    """RCP against the seeded PTQ rows and the equal-bits uniform rival: each status is recomputed from the per-seed
    values (a paired test: the seeds agree); the bits come from the accountant."""
    from rcp_lib.stats import order

    vals = {"RCP": (92.0, 118.7, 87.9), "QuaRot-GPTQ": (221.0, 240.0, 215.0), "QuaRot-GPTQ static": (195.0, 214.0, 190.0),
            "Uniform-QAT g32": (120.0, 119.0, 100.0)}
    rows = [{"method": m, "setting": "W2A4KV4", "seed": s, "ppl": v, "step0_ppl": 190.0 if "GPTQ" not in m else None}
            for m, vs in vals.items() for s, v in enumerate(vs)]
    (tmp_path / "ablation").mkdir()
    pd.DataFrame(rows).to_csv(tmp_path / "ablation" / "ablation.csv", index=False)
    out = _claim_table(tmp_path)
    ptq = next(line for line in out.splitlines() if line.startswith("| RCP ≫ PTQ baselines at W2A4KV4, with seeds"))
    for m in ("QuaRot-GPTQ", "QuaRot-GPTQ static"):
        assert order("RCP", list(vals["RCP"]), m, list(vals[m]), kind="paired") in ptq
    q, r = vals["QuaRot-GPTQ"], vals["RCP"]
    se = statistics.stdev(q) / math.sqrt(3)
    assert f"QuaRot-GPTQ {statistics.mean(q):.0f} ± {se:.2f} (3 seeds) ({statistics.mean(q) / statistics.mean(r):.3g}× " \
           "RCP's mean)" in ptq
    eq = next(line for line in out.splitlines() if line.startswith("| Partition, with the bits each format stores"))
    assert eq.count("3 bits per weight") == 2  # from the accountant: 2 + 64/64 = 2 + 32/32
    assert eq.endswith(f"| {order('RCP', list(vals['RCP']), 'Uniform-QAT g32', list(vals['Uniform-QAT g32']), kind='paired')} |")


def test_every_claim_renders_from_the_committed_results():
    """Every people-written claim of configs/claims.yaml finds its numbers in the checkout's results/cpu and
    results/ablation: a misspelt name would leave its row out of the README."""
    from rcp_lib.paths import results_dir
    from rcp_lib.report import CLAIMS_FILE, claim_values, render_claims

    d = results_dir("cpu")
    claims = yaml.safe_load(CLAIMS_FILE.read_text())["claims"]
    rows, left_out = render_claims(claims, claim_values(d, pd.read_csv(d / "perplexity.csv")))
    assert not left_out and len(rows) == len(claims) + 2
    assert all(ln.count(" | ") == 2 and "{" not in ln for ln in rows[2:])


def test_claims_keep_settings_apart_and_fail_loudly_on_a_template_error(tmp_path, capsys):
    """The seeded claims read the W2A4KV4 rows only (rows of another setting never pool into a mean or a test); a
    method the tables do not know leaves only its claim out; a name outside CLAIM_NAMES or a bad format spec is an
    error naming the claim, never a silently missing row."""
    from rcp_lib.report import claim_values, render_claims
    from rcp_lib.stats import order

    vals = {("RCP", "W2A4KV4"): (90.0, 118.0, 88.0), ("Uniform-QAT", "W2A4KV4"): (150.0, 127.0, 135.0),
            ("RCP", "W4A4KV4"): (40.0, 41.0, 39.0), ("Retired row", "W2A4KV4"): (100.0, 101.0, 102.0)}
    (tmp_path / "ablation").mkdir()
    pd.DataFrame([{"method": m, "setting": s, "seed": i, "ppl": v} for (m, s), vs in vals.items()
                  for i, v in enumerate(vs)]).to_csv(tmp_path / "ablation" / "ablation.csv", index=False)
    (tmp_path / "cpu").mkdir()
    values = claim_values(tmp_path / "cpu", _ppl_rows())
    rcp, uni = vals[("RCP", "W2A4KV4")], vals[("Uniform-QAT", "W2A4KV4")]
    assert values["ms"]["RCP"].endswith("(3 seeds)") and values["ms"]["RCP"].startswith(f"{statistics.mean(rcp):.2f} ± ")
    assert values["order"]["RCP/Uniform-QAT"] == order("RCP", list(rcp), "Uniform-QAT", list(uni), kind="paired")
    assert values["fp_x"]["RCP"] == f"{statistics.mean(rcp) / 10.0:.3g}×"  # the FP row of _ppl_rows: 10
    rows, left_out = render_claims([{"claim": "a", "measured": "{bits[Retired row]}", "status": "-"},
                                    {"claim": "b", "measured": "{bits[RCP]}", "status": "{order[RCP/Uniform-QAT]}"}],
                                   values)
    assert left_out == ["'a': no value for 'Retired row'"] and rows[2].startswith("| b | 3 bits per weight | ")
    with pytest.raises(ValueError, match="claim 'c' of claims.yaml: unknown name"):
        render_claims([{"claim": "c", "measured": "{msx[RCP]}", "status": "-"}], values)
    with pytest.raises(ValueError, match="claim 'd' of claims.yaml: "):
        render_claims([{"claim": "d", "measured": "{ms[RCP]:.2f}", "status": "-"}], values)  # a spec on a string
    with pytest.raises(ValueError, match="needs the keys claim, measured and status"):
        render_claims([{"claim": "e", "measured": "x"}], values)


def test_single_run_claim_reads_the_table(tmp_path):
    """The one-run claim: RCP against QuaRot-GPTQ and the table's lowest PTQ row, ratios recomputed here."""
    from rcp_lib.report import claim_values

    rows = pd.concat([_ppl_rows(), _ppl_rows().iloc[[1]].assign(method="QuaRot-GPTQ", ppl=223.18)], ignore_index=True)
    v = claim_values(tmp_path, rows)
    assert v["table"]["QuaRot-GPTQ"] == "223" and v["table"]["RCP"] == "30.25" and v["table"]["FP"] == "10.00"
    assert v["table_x"]["QuaRot-GPTQ/RCP"] == f"{223.18 / 30.25:.3g}×" and v["table_x"]["RCP/FP"] == "3.02×"
    assert v["best_ptq"] == "QuaRot-GPTQ 223"  # RTN's 12345 is higher; RTN W4A4KV4 (20.5) is another setting
    with pytest.raises(KeyError):
        v["table_x"]["RCP/Uniform-QAT"]


def test_readme_block_is_the_committed_results_rendered():
    """The README's generated block is what `python -m rcp_lib readme --profile cpu` writes from the committed
    results with this code: a change to the claims or the report without a regeneration fails here."""
    from rcp_lib.report import readme_markdown
    from rcp_lib.paths import readme_path

    text = readme_path().read_text()
    block = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    assert block == readme_markdown("cpu")


def test_paper_profile_claims_show_its_own_gap_and_no_cpu_seeds(tmp_path):
    """A `paper` results folder gets the −2.84 claim filled from its own table (difference and ratio recomputed here)
    and none of the claims decided with the cpu profile's seeds, even when results/ablation/ sits beside it."""
    from rcp_lib.report import claims_markdown

    (tmp_path / "ablation").mkdir()
    pd.DataFrame([{"method": m, "setting": "W2A4KV4", "seed": i, "ppl": v} for m in ("RCP", "Uniform-QAT")
                  for i, v in enumerate((90.0, 118.0, 88.0))]).to_csv(tmp_path / "ablation" / "ablation.csv", index=False)
    (tmp_path / "paper").mkdir()
    md = claims_markdown(tmp_path / "paper", _ppl_rows())
    assert f"RCP 30.25 vs FP 10.00, a gap of {30.25 - 10.0:.2f} ({30.25 / 10.0:.3g}× FP)" in md
    assert "not reproduced here" not in md and "seeds" not in md and "Uniform-QAT" not in md
    (tmp_path / "cpu").mkdir()
    md = claims_markdown(tmp_path / "cpu", _ppl_rows())
    assert "not reproduced here" in md and "a gap of" not in md and "Uniform-QAT" in md
