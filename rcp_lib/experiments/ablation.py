"""The ablation with seeds (``ablation`` profile), its summary with an honest order, and the tokens-vs-perplexity
curve of RCP (issue "a recipe under which Clip and Partition actually learn", items 8-10).

* :func:`ablation_table`: RCP and its ablations at W2A4KV4, once per seed of ``profile.ablation_seeds`` (the seed sets
  the R1 signs and the QAT data order), one row each with :data:`ABLATION_COLUMNS`. Every row is a cached perplexity
  row (:func:`~rcp_lib.experiments.tables.ppl_row`), so an interrupted run resumes from the row cache.
* :func:`summarize_ablation` / :func:`ablation_summary`: mean, standard deviation and standard error of the
  perplexity per method, and :func:`separation`, which states an order between two rows only when Welch's t-test on
  log perplexity over the seeds gives p < 0.05 (:mod:`rcp_lib.stats`, p shown), and otherwise says "not separable at
  this budget".
* :func:`token_curve` / :func:`plot_token_curve`: RCP W2A4KV4 validation perplexity (held-out tail of the train split,
  the QAT loop's own validation) against training tokens, with the FP model on the same windows as a line.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Any

from ..io import provenance
from ..profiles import Profile
from ..stats import NOT_SEPARABLE, order  # noqa: F401 (NOT_SEPARABLE: re-exported)
from .methods import ABLATIONS, EQUAL_BITS, QAT_BASELINES, SEEDED_PTQ, Method, method
from .rows import cached_row, code_key

#: where an ablation row ran (a CPU type rounds like a seed) and what it ran, copied from its perplexity row
ROW_PROVENANCE = ("device", "cpu_model", "cpu_flags", "torch_cpu_capability", "config")
#: the columns of ``ablation.csv``, in order
ABLATION_COLUMNS = ("method", "setting", "seed", "ppl", "step0_ppl", "clip_ratio_init", "clip_ratio_final",
                    "clip_shift", "range_shift", "level_shift", "weight_shift", "code_flips", "tokens", "seconds",
                    "git_commit", "code_fingerprint") + ROW_PROVENANCE
ABLATION_SETTING = "W2A4KV4"


def ablation_methods(profile: Profile) -> list[Method]:
    """RCP, its QAT rivals and ablations and the seeded PTQ rows (:data:`~rcp_lib.experiments.methods.SEEDED_PTQ`) at
    W2A4KV4 (restricted to ``profile.methods`` when set)."""
    names = ("RCP",) + QAT_BASELINES + EQUAL_BITS + ABLATIONS + SEEDED_PTQ
    return [method(n, ABLATION_SETTING) for n in names if profile.methods is None or n in profile.methods]


def ablation_table(profile: Profile, progress: bool = True) -> list[dict]:
    """One row per (seed of ``profile.ablation_seeds``, ablation method), columns :data:`ABLATION_COLUMNS`.

    Each row is the cached perplexity row of the method under the profile with ``seed`` replaced (the test windows of
    the profile; the step-0 perplexity, movement columns, training tokens and seconds of its QAT run)."""
    from .tables import ppl_row

    if not profile.ablation_seeds:
        raise ValueError("profile.ablation_seeds is empty: give at least one seed (the ablation profile uses 3)")
    rows = []
    for seed in profile.ablation_seeds:
        p = replace(profile, seed=int(seed))
        for m in ablation_methods(profile):
            rows.append(ablation_row({**ppl_row(m, p, progress=progress), "method": m.name, "setting": m.setting,
                                      "seed": int(seed)}))
    return rows


def ablation_row(r: dict) -> dict:
    """The :data:`ABLATION_COLUMNS` of one perplexity row ``r`` (:func:`~rcp_lib.experiments.tables.ppl_row`, a row of
    ``perplexity.csv``): a PTQ row has no start, movement, tokens or training seconds (None)."""
    def get(k):
        v = r.get(k)
        return None if v is None or (isinstance(v, float) and v != v) else v

    return {"method": r["method"], "setting": r["setting"], "seed": int(r["seed"]), "ppl": float(r["ppl"]),
            "step0_ppl": get("step0_ppl"), "clip_ratio_init": get("clip_ratio_init"),
            "clip_ratio_final": get("clip_ratio_final"), "clip_shift": get("clip_shift"),
            "range_shift": get("range_shift"), "level_shift": get("level_shift"), "weight_shift": get("weight_shift"),
            "code_flips": get("code_flips"),
            "tokens": get("qat_tokens"), "seconds": get("qat_seconds"), "git_commit": r.get("git_commit"),
            "code_fingerprint": r.get("code_fingerprint"),
            **{k: get(k) for k in ROW_PROVENANCE}}


def _stats(values: list[float]) -> tuple[float, float, float]:
    """(mean, sample standard deviation, standard error of the mean); std and SE are NaN for fewer than 2 values."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    sd = statistics.stdev(values)
    return mean, sd, sd / math.sqrt(len(values))


def summarize_ablation(rows: list[dict]) -> list[dict]:
    """Per (method, setting), in first-seen order: ``n``, ``ppl_mean``, ``ppl_std`` (sample std), ``ppl_sem``
    (std / sqrt(n)), ``seeds``, ``ppl_values``, the means of ``step0_ppl``, ``clip_ratio_init``, ``clip_ratio_final``,
    ``clip_shift``, ``range_shift``, ``level_shift``, ``weight_shift``, ``code_flips`` (NaN where a column is
    missing), and
    ``vs_start``: the row's start (its model before the first QAT step, ``step0_ppl``) against the trained row, a
    seed-paired t-test (:func:`start_order`; empty without a start for every seed)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    out = []
    for (name, setting), rs in groups.items():
        mean, sd, se = _stats([float(r["ppl"]) for r in rs])
        rec: dict[str, Any] = {"method": name, "setting": setting, "n": len(rs), "seeds": [r["seed"] for r in rs],
                               "ppl_mean": mean, "ppl_std": sd, "ppl_sem": se,
                               "ppl_values": [float(r["ppl"]) for r in rs]}
        for k in ("step0_ppl", "clip_ratio_init", "clip_ratio_final", "clip_shift", "range_shift", "level_shift",
                  "weight_shift", "code_flips"):
            vals = [float(r[k]) for r in rs if r.get(k) is not None and r.get(k) == r.get(k)]
            rec[f"{k}_mean"] = statistics.fmean(vals) if vals else float("nan")
        rec["vs_start"] = start_order(name, rs)
        out.append(rec)
    return out


def start_order(name: str, rows: list[dict]) -> str:
    """What the QAT of one method bought: its start (``step0_ppl``: the rotated, quantized model, after a GPTQ start
    when the recipe has one, before the first step) against the trained model (``ppl``) on the same windows, a t-test
    paired by seed on log perplexity (:func:`rcp_lib.stats.order`). Empty when a seed has no start."""
    start = [r.get("step0_ppl") for r in rows]
    if not rows or any(v is None or v != v for v in start):
        return ""
    return order(f"{name} start", [float(v) for v in start], name, [float(r["ppl"]) for r in rows], kind="paired")


def separation(a: dict, b: dict) -> str:
    """The order of two summary rows by perplexity over seeds: :func:`rcp_lib.stats.order` on log perplexity,
    two-sided, p < 0.05 (the phrase shows the test, p and n), else ``"not separable at this budget (...)"``. The test
    is paired by seed when both rows list the same ``seeds`` in the same order (one seed sets the same R1 signs,
    calibration windows and data order in both), else Welch's. A row's values are its ``ppl_values``
    (:func:`summarize_ablation`) or ``vals``; its name is ``method``."""
    va, vb = a.get("ppl_values", a.get("vals")), b.get("ppl_values", b.get("vals"))
    if va is None or vb is None:
        raise ValueError("separation needs each row's per-seed values (ppl_values or vals)")
    sa, sb = a.get("seeds"), b.get("seeds")
    paired = sa is not None and sb is not None and list(sa) == list(sb) and len(sa) == len(va) == len(vb)
    return order(a["method"], va, b["method"], vb, kind="paired" if paired else "welch")


#: rows compared with a control besides RCP: GSR's sequency order against the same blocks in natural order
CONTROLS = {"RCP+GSR": "RCP+BlockHadamard"}


def refresh_orders(summary: list[dict], seeds: list[dict]) -> list[dict]:
    """``summary`` rows (:func:`summarize_ablation` layout, e.g. read back from ``ablation_summary.csv``) with
    ``ppl_values`` / ``seeds`` and their ``vs_start`` / ``vs_RCP`` / ``vs_control`` recomputed by :func:`separation` from the per-seed
    rows ``seeds`` (``ablation.csv``), so a table never shows an order written by an older rule. Returns new dicts."""
    fresh = {r["method"]: r for r in summarize_ablation(seeds)}
    out = []
    for s in summary:
        s = dict(s)
        f = fresh.get(s["method"])
        if f is not None:
            s.update(ppl_values=f["ppl_values"], seeds=f["seeds"], vs_start=f["vs_start"],
                     code_flips_mean=f["code_flips_mean"])
        out.append(s)
    by = {s["method"]: s for s in out}
    rcp = by.get("RCP")
    for s in out:
        ok = "ppl_values" in s
        s["vs_RCP"] = "" if rcp is None or s is rcp or not ok or "ppl_values" not in rcp else separation(rcp, s)
        ctl = by.get(CONTROLS.get(s["method"], ""))
        s["vs_control"] = separation(s, ctl) if ctl is not None and ok and "ppl_values" in ctl else ""
    return out


def ablation_summary(profile: Profile, progress: bool = True) -> list[dict]:
    """:func:`summarize_ablation` of :func:`ablation_table`, each row with ``vs_RCP``: its :func:`separation` from
    RCP (empty for RCP itself), ``vs_control``: its separation from its control in :data:`CONTROLS` (empty for
    rows without one), and provenance."""
    summ = summarize_ablation(ablation_table(profile, progress=progress))
    by_name = {s["method"]: s for s in summ}
    rcp = by_name.get("RCP")
    prov = provenance()
    for s in summ:
        s["vs_RCP"] = "" if rcp is None or s is rcp else separation(rcp, s)
        ctl = by_name.get(CONTROLS.get(s["method"], ""))
        s["vs_control"] = separation(s, ctl) if ctl is not None else ""
        s.update(prov)
    return summ


# --------------------------------------------------------------------------------------------------------------------
# tokens vs perplexity
# --------------------------------------------------------------------------------------------------------------------


def _fp_val_ppl(profile: Profile, seqlen: int, windows: int, holdout: float, progress: bool) -> float:
    """Perplexity of the FP model on the QAT loop's validation windows (cached row)."""
    from ..data import split_holdout
    from ..evaluation import perplexity
    from .build import base_model, tokens

    key = {"kind": "fp-val", "model": profile.model, "corpus": profile.corpus, "seqlen": seqlen, "windows": windows,
           "holdout_fraction": holdout, "code": code_key(profile.device)}

    def compute():
        _, val = split_holdout(tokens(profile, "train"), holdout)
        return {"ppl": perplexity(base_model(profile)[0], val, seqlen=seqlen, max_windows=windows, progress=progress)}

    return cached_row("fpval", key, compute)["ppl"]


def token_curve(profile: Profile, progress: bool = True) -> list[dict]:
    """RCP W2A4KV4 validation perplexity vs training tokens for the profile's recipe (one row per validation point of
    the QAT history: every ``qat_val_every`` steps and the last step), with ``fp_val_ppl``: the FP model on the same
    held-out windows of the train split, and ``run_clip_shift`` / ``run_level_shift`` / ``run_weight_shift``: how far
    the whole run moved each part (:mod:`rcp_lib.movement`). Trains (or loads from the cache) the RCP student of the
    profile: set ``qat_steps`` / ``qat_val_every`` for the budget and the points (e.g. ``--set qat_steps=640 qat_val_every=40``)."""
    from .build import build, qat_history, qat_stats

    m = method("RCP", ABLATION_SETTING)
    qat = m.recipe(profile).qat
    build(m, profile, progress=progress)
    hist = [h for h in qat_history(m, profile) if "val_ppl" in h]
    if not hist:
        raise RuntimeError("the RCP student has no validation points in its history (was it trained by build?)")
    fp = _fp_val_ppl(profile, qat.seqlen, qat.val_windows, qat.holdout_fraction, progress)
    st = qat_stats(m, profile)
    run = {f"run_{k}": st.get(k) for k in ("clip_shift", "level_shift", "weight_shift", "code_flips")}  # the whole run's movement
    prov = provenance()
    return [{"method": m.name, "setting": m.setting, "step": h["step"], "tokens": h["tokens"], "val_ppl": h["val_ppl"],
             "fp_val_ppl": fp, "val_seqlen": qat.seqlen, "val_windows": qat.val_windows, "split": "train (held-out tail)",
             **run, **prov} for h in hist]


def plot_token_curve(rows: list[dict]):
    """Figure: validation perplexity vs training tokens (log x, log y), FP as a horizontal line. Returns the
    matplotlib figure (a bare :class:`matplotlib.figure.Figure`: no pyplot state and no backend chosen, so a command
    line draws it headless and a notebook shows it inline with ``display(fig)``)."""
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no rows to plot")
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    xs = [r["tokens"] for r in rows]
    ax.plot(xs, [r["val_ppl"] for r in rows], "o-", label=f"{rows[0]['method']} {rows[0]['setting']}")
    ax.axhline(rows[0]["fp_val_ppl"], color="k", ls="--", label="FP")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel(f"validation perplexity (train tail, seqlen {rows[0]['val_seqlen']})")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig
