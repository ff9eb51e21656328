"""Markdown summaries of a profile's results, and the README block that shows the last ``cpu`` run.

``python -m rcp_lib readme --profile cpu`` reads ``results/<profile>/perplexity.csv`` and ``zero_shot.csv`` (written by
notebooks 02 and 03), plus any ``perplexity_qat_*.csv`` (QAT rows re-trained longer with ``python -m rcp_lib table
--families qat --set qat_steps=N``), and rewrites the part of README.md between ``<!-- RESULTS-TABLE -->`` and
``<!-- /RESULTS-TABLE -->``. Nothing here computes a number: it only formats rows that the notebooks measured.
The files it reads are the ``readme=True`` entries of :data:`rcp_lib.experiments.registry.TABLES`. The claim table's
words are people's, in ``configs/claims.yaml`` (:data:`CLAIMS_FILE`); this module only fills in their numbers and tests.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from .experiments.registry import TABLES
from .io import atomic_write_text
from .paths import REPO_ROOT, figures_root, readme_path, results_dir
from .profiles import PROFILES
from .recipe import Recipe

BEGIN, END = "<!-- RESULTS-TABLE -->", "<!-- /RESULTS-TABLE -->"


def _file(name: str) -> str:
    """File name (or glob pattern) of the registered result ``name``; it must be registered as read here."""
    t = TABLES[name]
    if not t.readme:
        raise KeyError(f"result {name!r} is not registered with readme=True in rcp_lib.experiments.registry")
    return t.file


def _fmt_ppl(x: float) -> str:
    if pd.isna(x):
        return "–"
    if x < 100:
        return f"{x:.2f}"
    return f"{x:.0f}" if x < 1e5 else f"{x:.3g}"


def ppl_markdown(df: pd.DataFrame) -> str:
    """Methods × settings table of perplexities (rows in first-seen order, FP first).

    ``df`` has at least the columns method, setting, ppl (one row per method and setting). With a ``step0_ppl``
    column, each QAT method is followed by its start: "<method> start (no QAT)", the same rotated, quantized (and, with
    a GPTQ start, GPTQ'd) model before the first training step, scored on the same windows.
    """
    settings = [s for s in dict.fromkeys(df["setting"]) if s != "FP"]
    methods = list(dict.fromkeys(df["method"]))
    fam = df.drop_duplicates("method").set_index("method")["family"] if "family" in df else None
    bits = "bits_per_weight" in df
    head = "| method | family | " + " | ".join(settings) + (" | bits per weight (" + " / ".join(settings) + ")"
                                                             if bits else "") + " |"
    lines = [head, "|" + "---|" * (len(settings) + 2 + bits)]
    for m in methods:
        sub = df[df.method == m].set_index("setting")
        if "FP" in sub.index:  # the FP baseline has no setting: one value for every column
            cells = [_fmt_ppl(float(sub["ppl"].iloc[0]))] * len(settings)
        else:
            cells = [_fmt_ppl(float(sub.at[s, "ppl"])) if s in sub.index else "–" for s in settings]
        if bits:  # what each row's weight format stores per weight (rcp_lib.memory.Scheme.bits_per_weight)
            b = [float(sub["bits_per_weight"].iloc[0])] * len(settings) if "FP" in sub.index else [
                float(sub.at[s, "bits_per_weight"]) if s in sub.index else float("nan") for s in settings]
            cells.append(" / ".join(f"{v:.3g}" if v == v else "–" for v in b))
        lines.append(f"| {m} | {fam[m] if fam is not None else ''} | " + " | ".join(cells) + " |")
        if "step0_ppl" in df and df[df.method == m]["step0_ppl"].notna().any():
            start = sub["step0_ppl"]
            cells = [_fmt_ppl(float(start[s])) if s in start.index else "–" for s in settings]
            lines.append(f"| {m} start (no QAT) | start | " + " | ".join(cells) + (" | same" if bits else "") + " |")
    return "\n".join(lines)


def zero_shot_markdown(df: pd.DataFrame) -> str:
    """Methods × (task, metric) table of accuracy ± stderr, ``acc`` and, where the task has it, ``acc_norm`` (the
    papers disagree on which one they report), with the number of examples per task."""
    acc = df[df.metric.isin(["acc", "acc_norm"])]
    cols = [(t, m) for t in dict.fromkeys(acc["task"]) for m in ("acc", "acc_norm")
            if ((acc.task == t) & (acc.metric == m)).any()]
    n = acc.drop_duplicates("task").set_index("task")["n_examples"]
    lines = ["| method | setting | " + " | ".join(f"{t} {m} (n={int(n[t])})" for t, m in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for (meth, s), sub in acc.groupby(["method", "setting"], sort=False):
        sub = sub.set_index(["task", "metric"])
        cells = [f"{sub.at[(t, m), 'value']:.3f} ± {sub.at[(t, m), 'stderr']:.3f}" if (t, m) in sub.index else "–"
                 for t, m in cols]
        lines.append(f"| {meth} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def zero_shot_tests_markdown(zs: pd.DataFrame, ppl: pd.DataFrame | None = None, ref: str = "RCP") -> str:
    """Paired tests between zero-shot rows and the measured floor, from the per-document outcomes (``per_doc``,
    :func:`rcp_lib.evaluation.zero_shot.per_document`): for each task's averaged metric (``used_in_average``: ``acc``,
    ``acc_norm`` for wiki_nextsent), ``ref`` at each setting against every other row of that setting and FP (exact
    McNemar, :func:`rcp_lib.stats.accuracy_order`, each test at alpha 0.05 without a multiple-test correction; only
    rows scored on the same documents, ``docs_sha256``), and the accuracy of the zero-shot row whose perplexity in
    ``ppl`` is the highest (what a task gives a model that barely predicts text). The tests need per-document outcomes
    (rows of an older code have none: then only the floor)."""
    from .stats import accuracy_order

    main = zs[zs["used_in_average"].astype(str) == "True"] if "used_in_average" in zs else zs[zs.metric == "acc"]
    has = main["per_doc"].notna() & (main["per_doc"].astype(str) != "") if "per_doc" in zs else None
    scored = main[has] if has is not None else main.iloc[:0]
    lines = ["| task (metric) | rows | paired test on the same documents |", "|---|---|---|"]
    for task, t in scored.groupby("task", sort=False):
        by = {(r.method, r.setting): r for r in t.itertuples()}
        fp = next((r for (m, _), r in by.items() if m == "FP"), None)
        for (m, st), r in by.items():
            if m != ref:
                continue
            others = [o for (m2, s2), o in by.items() if s2 == st and m2 != ref] + ([fp] if fp is not None else [])
            for o in others:
                if str(o.docs_sha256) != str(r.docs_sha256):
                    continue
                a, b = [c == "c" for c in str(r.per_doc)], [c == "c" for c in str(o.per_doc)]
                lines.append(f"| {task} ({r.metric}) | {ref} {st} {r.value:.3f} vs {o.method} {o.setting} "
                             f"{o.value:.3f} | {accuracy_order(ref, a, o.method, b)} |")
    out = lines if len(lines) > 2 else []
    if out:
        out += ["", "Each line is its own exact McNemar test at p < 0.05, without a correction for the number of "
                    "tests."]
    if ppl is not None and len(ppl):
        present = {(m, s) for m, s in zip(main["method"], main["setting"])}
        cand = ppl[[(m, s) in present for m, s in zip(ppl["method"], ppl["setting"])]]
        if len(cand):
            worst = cand.loc[cand["ppl"].idxmax()]
            floor = main[(main.method == worst["method"]) & (main.setting == worst["setting"])]
            cells = ", ".join(f"{r.task} {r.metric} {r.value:.3f}" for r in floor.itertuples())
            out += ["", f"Measured floor: the zero-shot row with the highest perplexity ({worst['method']} "
                        f"{worst['setting']}, perplexity {_fmt_ppl(float(worst['ppl']))}) scores {cells}."]
    return "\n".join(out)


def _qat_budget(config: str) -> dict:
    return json.loads(config)["qat"]


def longer_qat_markdown(main: pd.DataFrame, longer: pd.DataFrame) -> str:
    """QAT rows trained for more steps, next to the same method and setting of the main table.

    Both frames have the columns method, setting, ppl and config (JSON with a ``qat`` entry holding ``steps``).
    """
    main_steps = {(r.method, r.setting): (r.ppl, _qat_budget(r.config)["steps"]) for r in main.itertuples() if r.family == "qat"}
    lines = ["| method | setting | main table (steps: ppl) | longer run (steps: ppl) |", "|---|---|---|---|"]
    for r in longer.itertuples():
        m = main_steps.get((r.method, r.setting))
        left = f"{m[1]}: {_fmt_ppl(float(m[0]))}" if m else "–"
        lines.append(f"| {r.method} | {r.setting} | {left} | {_qat_budget(r.config)['steps']}: {_fmt_ppl(float(r.ppl))} |")
    return "\n".join(lines)


def _fmt_x(x: float) -> str:
    return f"{x:.3g}×" if x < 1000 else f"{x:.3g}×".replace("e+0", "e")


#: the README's claim table, written by people (:func:`claims_markdown` fills its numbers from ``results/``)
CLAIMS_FILE = REPO_ROOT / "configs" / "claims.yaml"
#: the setting of the claims decided with seeds (the ``ablation`` profile's only setting)
CLAIM_SETTING = "W2A4KV4"
#: the names a claim may use (:func:`claim_values`; the header of :data:`CLAIMS_FILE` says what each holds)
CLAIM_NAMES = frozenset({"mem", "saved", "rot", "table", "table_x", "table_d", "best_ptq", "ms", "ms_x", "fp_x", "start", "order",
                         "vs_start", "bits", "clip_shift", "level_shift", "gsr", "gsr_order", "gsr_block"})


class _Lookup:
    """``lookup[key]``: ``fn(key)``, or ``fn(A, B)`` for a pair key ``"A/B"`` (``pair=True``), as a template field such
    as ``{bits[RCP]}`` or ``{order[RCP/Uniform-QAT]}``; KeyError when ``fn`` returns None (a missing method), so the
    claim that asks for it is left out."""

    def __init__(self, fn, pair: bool = False):
        self.fn, self.pair = fn, pair

    def __getitem__(self, key: str) -> str:
        if self.pair:
            a, sep, b = key.partition("/")
            out = self.fn(a, b) if sep else None
        else:
            out = self.fn(key)
        if out is None:
            raise KeyError(key)
        return out


def _seeded(rows: pd.DataFrame) -> tuple[dict[str, str], dict[str, float], _Lookup]:
    """Per-seed rows (``method``, ``ppl``, ``seed``) of one setting -> ``{method: "mean ± SE (n seeds)"}``,
    ``{method: mean}`` and ``order["A/B"]``: A against B, the t-test of :func:`_orders_from_rows` on their values."""
    cells, means = {}, {}
    for name, v in rows.groupby("method", sort=False)["ppl"]:
        se = f" ± {_fmt_ppl(float(v.sem()))}" if len(v) > 1 else ""
        cells[str(name)] = f"{_fmt_ppl(float(v.mean()))}{se} ({len(v)} seed{'s' if len(v) != 1 else ''})"
        means[str(name)] = float(v.mean())
    order = _Lookup(lambda a, b: _orders_from_rows(rows[rows.method.isin([a, b])], "method", "ppl", a).get(b), pair=True)
    return cells, means, order


def _x(a: float | None, b: float | None) -> str | None:
    """``"2.42×"`` for ``a / b``; None when either is missing or not finite."""
    ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b) and b != 0
    return _fmt_x(a / b) if ok else None


#: the profiles whose claims read ``results/ablation/`` (the ``ablation`` profile runs the ``cpu`` profile's setting)
SEEDED_CLAIM_PROFILES = frozenset({"cpu", "ablation"})


def _profile_of(d: Path) -> str:
    """The named profile of a results folder: ``results/cpu`` and ``results/cpu-<hash>`` -> ``"cpu"``."""
    return d.name.split("-", 1)[0]


def claim_values(d: Path, ppl: pd.DataFrame) -> dict:
    """The names a claim template (:data:`CLAIMS_FILE`) can use (:data:`CLAIM_NAMES`), read from the results folder
    ``d`` (its ``perplexity.csv`` is ``ppl``) and ``results/ablation/`` (the rows of :data:`CLAIM_SETTING`); the file's
    header lists them. A missing file leaves its names out; a missing or non-finite number is a missing key. Numbers
    and test phrases only: no sentence here says what they mean."""
    from .experiments.methods import method
    from .experiments.tables import bits_per_weight
    from .profiles import get_profile

    v: dict = {}
    if (d / _file("memory")).exists():
        mem = pd.read_csv(d / _file("memory"))
        r = mem[(mem.model == "LLaMA-2-7B") & (mem.scheme == "W2A4KV4")]
        if len(r):
            v["mem"] = r.iloc[0].to_dict()
    if (d / _file("memory_vs_saved")).exists():
        v["saved"] = pd.read_csv(d / _file("memory_vs_saved")).iloc[0].to_dict()
    if (d / _file("rotation_impact_summary")).exists():
        v["rot"] = pd.read_csv(d / _file("rotation_impact_summary")).set_index("rotation").to_dict("index")
    at = ppl[((ppl.setting == CLAIM_SETTING) | (ppl.method == "FP")) & ppl["ppl"].map(math.isfinite)]
    at = at.drop_duplicates("method").set_index("method")["ppl"].astype(float)
    v["table"] = {m: _fmt_ppl(x) for m, x in at.items()}
    v["table_x"] = _Lookup(lambda a, b: _x(at.get(a), at.get(b)), pair=True)
    v["table_d"] = _Lookup(lambda a, b: f"{at[a] - at[b]:.2f}" if {a, b} <= set(at.index) else None, pair=True)
    ptq = at[ppl.drop_duplicates("method").set_index("method")["family"].reindex(at.index).eq("ptq")]
    if len(ptq):
        v["best_ptq"] = f"{ptq.idxmin()} {_fmt_ppl(float(ptq.min()))}"
    fp = float(at["FP"]) if "FP" in at.index else None
    abl = d.parent / "ablation"  # the seeded rows run on the cpu profile's setting: no other profile's claims
    if _profile_of(d) in SEEDED_CLAIM_PROFILES and (abl / _file("ablation")).exists():
        from .experiments.ablation import summarize_ablation

        per_seed = pd.read_csv(abl / _file("ablation"))
        per_seed = per_seed[per_seed["setting"] == CLAIM_SETTING] if "setting" in per_seed else per_seed
        summ = {r["method"]: r for r in summarize_ablation(per_seed.to_dict("records"))}
        cells, means, order = _seeded(per_seed)

        def bits(m: str) -> str | None:
            try:
                return f"{bits_per_weight(method(m, CLAIM_SETTING), get_profile('ablation')):.3g} bits per weight"
            except ValueError:  # not a method of the tables (a renamed or retired row): its claim is left out
                return None

        def moved(col: str) -> dict[str, str]:
            return {m: f"{r[col]:.3g}" for m, r in summ.items() if pd.notna(r.get(col))}

        v.update(ms=cells, order=order, ms_x=_Lookup(lambda a, b: _x(means.get(a), means.get(b)), pair=True),
                 fp_x=_Lookup(lambda m: _x(means.get(m), fp)), bits=_Lookup(bits),
                 start={m: _fmt_ppl(float(r["step0_ppl_mean"])) for m, r in summ.items()
                        if pd.notna(r.get("step0_ppl_mean"))},
                 vs_start={m: r["vs_start"] for m, r in summ.items() if r.get("vs_start")},
                 clip_shift=moved("clip_shift_mean"), level_shift=moved("level_shift_mean"))
    if _profile_of(d) in SEEDED_CLAIM_PROFILES and (abl / _file("gsr_decision")).exists():  # method names are unique across its two parts
        gsr = pd.read_csv(abl / _file("gsr_decision"))
        v["gsr"], _, v["gsr_order"] = _seeded(gsr)
        if "block" in gsr:
            v["gsr_block"] = {str(m): str(int(b)) for m, b in
                              gsr.dropna(subset=["block"]).groupby("method")["block"].first().items()}
    return v


def _claim_fields(text: str) -> set[str]:
    """The names a template uses: ``"{ms[RCP]} vs {order[RCP/X]}"`` -> ``{"ms", "order"}``."""
    import string

    return {f.split("[", 1)[0].split(".", 1)[0] for _, f, _, _ in string.Formatter().parse(text) if f is not None}


def render_claims(claims: list[dict], values: dict) -> tuple[list[str], list[str]]:
    """The claim table's rows (``| claim | measured | status |``) of the people-written ``claims`` with their fields
    filled from ``values`` (:func:`claim_values`), and one line per claim left out for a missing number.

    A claim without its three keys, a name outside :data:`CLAIM_NAMES` (a typo) or a malformed field raises
    ValueError naming the claim: only missing data leaves a row out."""
    rows, left_out = ["| claim (the paper's numbers) | measured here (from `results/`) | status |", "|---|---|---|"], []
    for i, c in enumerate(claims):
        what = repr(c.get("claim", f"entry {i}")) if isinstance(c, dict) else f"entry {i}"
        if not isinstance(c, dict) or not {"claim", "measured", "status"} <= set(c) <= {"claim", "measured", "status", "profiles"}:
            raise ValueError(f"claim {what} of {CLAIMS_FILE.name} needs the keys claim, measured and status (and optionally profiles)")
        try:
            unknown = (_claim_fields(c["measured"]) | _claim_fields(c["status"])) - CLAIM_NAMES
            if unknown:
                raise ValueError(f"unknown name(s) {sorted(unknown)}; the names are {sorted(CLAIM_NAMES)}")
            cells = [c["claim"], c["measured"].format_map(values), c["status"].format_map(values)]
        except KeyError as e:
            left_out.append(f"{what}: no value for {e.args[0]!r}")
            continue
        except (ValueError, AttributeError, IndexError) as e:
            raise ValueError(f"claim {what} of {CLAIMS_FILE.name}: {e}") from None
        rows.append("| " + " | ".join(" ".join(str(x).split()) for x in cells) + " |")
    return rows, left_out


def claims_markdown(d: Path, ppl: pd.DataFrame, claims: Path | None = None) -> str:
    """The claim table: each claim of :data:`CLAIMS_FILE` (written by people; ``claims`` for another file) with the
    numbers of the results folder ``d`` (:func:`claim_values`). A claim with a ``profiles`` list is shown only for the
    results of those profiles. A claim whose numbers are missing is left out, and named on stderr."""
    import sys

    import yaml

    entries = [c for c in yaml.safe_load(Path(claims or CLAIMS_FILE).read_text())["claims"]
               if not isinstance(c, dict) or "profiles" not in c or _profile_of(d) in c["profiles"]]
    rows, left_out = render_claims(entries, claim_values(d, ppl))
    for line in left_out:
        print(f"[rcp_lib readme] claim left out of {d.name}'s table: {line}", file=sys.stderr)
    return "\n".join(rows)


ROTATION_COLUMNS = ("kurtosis", "err_uniform", "err_uniform_clip", "err_nonuniform_pinned", "err_nonuniform",
                    "range_gain", "shape_gain")


def rotation_markdown(summary: pd.DataFrame) -> str:
    """Per-rotation means of notebook 01 (``rotation_impact_summary.csv``), and each GSR spec next to its
    block-Hadamard control (same block and group), with the largest relative difference of their error columns."""
    cols = [c for c in ROTATION_COLUMNS if c in summary]
    head = ["rotation", "block", "group"] + cols
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary.itertuples(index=False):
        d = r._asdict()
        blk = "–" if pd.isna(d.get("block")) else str(int(d["block"]))
        lines.append(f"| {d['rotation']} | {blk} | {int(d['group_size'])} | " +
                     " | ".join(f"{d[c]:.3f}" if c != "kurtosis" else f"{d[c]:.2f}" for c in cols) + " |")
    sm = summary.set_index("rotation")
    errs = [c for c in ("err_uniform", "err_uniform_clip", "err_nonuniform_pinned", "err_nonuniform") if c in sm]
    notes = []
    for name in sm.index:
        if not str(name).startswith("gsr"):
            continue
        ctl = "block_hadamard" + str(name)[3:]
        if ctl in sm.index:
            diff = max(abs(sm.at[name, c] / sm.at[ctl, c] - 1) for c in errs)
            notes.append(f"`{name}` vs `{ctl}` (block {int(sm.at[name, 'block'])}, groups of "
                         f"{int(sm.at[name, 'group_size'])}): largest relative difference of the mean errors "
                         f"{100 * diff:.2g} %")
    return "\n".join(lines) + ("\n\n" + "; ".join(notes) + "." if notes else "")


CONTROL_PAIRS = (("GSR-GPTQ", "BlockHadamard-GPTQ"), ("RCP+GSR", "RCP+BlockHadamard"))


def gsr_control_markdown(ppl: pd.DataFrame) -> str:
    """GSR rows next to their block-Hadamard control (same blocks, natural instead of sequency order), per setting.

    ``ppl`` has the columns method, setting, ppl and (optionally) r1_block and seed. One seed per row, so no order
    between a pair is claimed."""
    idx = ppl.set_index(["method", "setting"])
    lines = []
    for gsr, ctl in CONTROL_PAIRS:
        for s in dict.fromkeys(ppl["setting"]):
            if (gsr, s) in idx.index and (ctl, s) in idx.index:
                a, b = idx.loc[(gsr, s)], idx.loc[(ctl, s)]
                blk = f", block {int(a['r1_block'])}" if "r1_block" in idx.columns and pd.notna(a.get("r1_block")) else ""
                lines.append(f"| {gsr} vs {ctl} | {s}{blk} | {_fmt_ppl(float(a['ppl']))} | {_fmt_ppl(float(b['ppl']))} | "
                             f"{float(a['ppl']) / float(b['ppl']):.3f} |")
    if not lines:
        return ""
    return "\n".join(["| pair | setting | GSR (sequency order) | control (natural order) | GSR / control |",
                       "|---|---|---|---|---|", *lines])


def _span(values: pd.Series) -> str:
    """``"47483"`` for one value, ``"47483–414830 across its seeds"`` for several (perplexities)."""
    lo, hi = float(values.min()), float(values.max())
    return _fmt_ppl(lo) if len(values) == 1 or lo == hi else f"{_fmt_ppl(lo)}–{_fmt_ppl(hi)} across its seeds"


def sweep_markdown(sweep: pd.DataFrame) -> str:
    """One paragraph on the QAT recipe sweep (``recipe_sweep.csv``, one row per point and seed): how many points and
    seeds, the selected point (mean ± standard error over its seeds), which points it separates from (a t-test
    recomputed from the rows, :mod:`rcp_lib.stats`), and the searched start against the constant start at the same learning rates, clip and seed (the
    ratio of validation perplexities)."""
    keys = ["lr_quant", "lr_weights", "grad_clip"]
    per_point = sweep.groupby("point").first()
    best = per_point[per_point["best"].astype(str) == "True"].iloc[0]
    r0 = sweep.iloc[0]
    n_seeds = per_point["n_seeds"].astype(int)
    pairs = sweep.pivot_table(index=[*keys, "seed"], columns="init", values="val_ppl", aggfunc="first")  # same seed
    ratios = (pairs["const"] / pairs["search"]).dropna() if {"const", "search"} <= set(pairs.columns) else pd.Series([], dtype=float)
    sem = float(best["val_ppl_sem"])
    spread = f" ± {_fmt_ppl(sem)} (standard error)" if math.isfinite(sem) else ""
    txt = (f"QAT recipe sweep (`python -m rcp_lib.experiments.sweep`, `results/cpu/recipe_sweep.csv`): {len(per_point)} points "
           f"({len(sweep)} runs; {int((n_seeds > 1).sum())} points at {int(n_seeds.max())} seeds), "
           f"{int(r0['steps'])} steps × {int(r0['tokens']) // int(r0['steps'])} tokens each, scored on "
           f"{r0['val_split']} (never the test split). Selected (lowest mean among the points run at the most seeds): "
           f"lr_quant {best['lr_quant']:g}, lr_weights {best['lr_weights']:g}, grad clip {best['grad_clip']:g}, "
           f"{best['init']} start → validation perplexity {_fmt_ppl(float(best['val_ppl_mean']))}{spread} over "
           f"{int(best['n_seeds'])} seed(s) (step 0: {_span(sweep[sweep['point'] == best.name]['step0_val_ppl'])}).")
    rivals = per_point[(per_point["n_seeds"].astype(int) > 1) & (per_point["best"].astype(str) != "True")]
    fresh = _orders_from_rows(sweep, "point", "val_ppl", best.name, lambda p: f"point {p}")
    for p, r in rivals.iterrows():
        vs = fresh.get(p, "not separable at this budget")
        txt += (f" Point {p} (lr_quant {r['lr_quant']:g}, lr_weights {r['lr_weights']:g}, grad clip "
                f"{r['grad_clip']:g}): {_fmt_ppl(float(r['val_ppl_mean']))} ± {_fmt_ppl(float(r['val_ppl_sem']))} "
                f"over {int(r['n_seeds'])} seeds; {vs}.")
    if len(ratios) and ratios.min() > 1:
        span = f"{ratios.min():.1f}" if f"{ratios.min():.1f}" == f"{ratios.max():.1f}" else f"{ratios.min():.1f}–{ratios.max():.1f}"
        txt += (f" The searched start beats the constant start in all {len(ratios)} runs of a learning-rate pair both "
                f"ways at the same seed ({span}× lower perplexity).")
    elif len(ratios):
        txt += (f" Constant / searched start perplexity in the {len(ratios)} runs of a learning-rate pair both ways at "
                f"the same seed: {ratios.min():.2f}–{ratios.max():.2f}.")
    return txt


def _ran_on(rows: pd.DataFrame) -> str:
    """``", git 0a0b51ce, AMD EPYC (AVX512)"``: the commits and CPUs of a table's rows (another CPU type rounds
    differently: a table is compared with others of its CPU only), "" without provenance columns."""
    parts = []
    if "git_commit" in rows:
        parts.append("git " + ", ".join(sorted({str(c)[:8] for c in rows["git_commit"]})))
    if "cpu_model" in rows and "torch_cpu_capability" in rows:
        parts.append(", ".join(sorted({f"{m} ({c})" for m, c in zip(rows["cpu_model"], rows["torch_cpu_capability"])})))
    return "".join(f", {p}" for p in parts)


def sweep_table_markdown(sweep: pd.DataFrame, name: str = "recipe_sweep_gptq", profile: str = "cpu") -> str:
    """The learning-rate sweep under the GPTQ start (``results/cpu/<name>.csv`` of ``python -m rcp_lib.experiments.sweep
    --name <name>``, one row per point and seed) as a table: per point its learning rates, validation perplexity on the
    held-out train tail (mean ± standard error over seeds), the start's perplexity, how far each part moved (means
    over seeds: clip ratio, levels, share of weights whose code changed, relative latent-weight change) and its order
    against the selected point, recomputed from the per-seed values (:func:`_orders_from_rows`)."""
    per_point = sweep.groupby("point", sort=True)
    chosen = sweep[sweep["best"].astype(str) == "True"]["point"]
    if not len(chosen):
        return f"`results/{profile}/{name}.csv` marks no selected point."
    best = chosen.iloc[0]
    fresh = _orders_from_rows(sweep, "point", "val_ppl", best, lambda p: f"point {p}")
    r0 = sweep.iloc[0]
    lines = [f"Learning-rate sweep under the GPTQ start (`python -m rcp_lib.experiments.sweep --name {name}`, "
             f"`results/{profile}/{name}.csv`{_ran_on(sweep)}): RCP W2A4KV4, {int(r0['steps'])} steps × "
             f"{int(r0['tokens']) // int(r0['steps'])} tokens, validation perplexity on {r0['val_split']} (never the "
             f"test split); selected: the lowest mean among the points run at the most seeds.", "",
             "| point | lr weights | lr quantizer | lr range | seeds | val ppl (mean ± SE) | start ppl | mean \\|Δ clip "
             "ratio\\| | mean \\|Δ level\\| | code flips | weight change | vs selected |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p, df in per_point:
        r = df.iloc[0]
        lr_range = r.get("lr_range")
        if lr_range is None or pd.isna(lr_range):  # the recipe's own: read from the row's config
            lr_range = (json.loads(r["config"]).get("qat") or {}).get("lr_range")
        lr_range = "–" if lr_range is None else f"{float(lr_range):g}"
        sem = float(r["val_ppl_sem"])
        vs = "selected" if p == best else fresh.get(p, "–")
        lines.append(f"| {p} | {float(r['lr_weights']):g} | {float(r['lr_quant']):g} | {lr_range} | "
                     f"{int(r['n_seeds'])} | {_fmt_ppl(float(r['val_ppl_mean']))}"
                     f"{f' ± {_fmt_ppl(sem)}' if math.isfinite(sem) else ''} | "
                     f"{_fmt_ppl(float(df['step0_val_ppl'].mean()))} | {df['clip_shift'].mean():.4f} | "
                     f"{df['level_shift'].mean():.4f} | {df['code_flips'].mean():.2g} | {df['weight_shift'].mean():.2g} | "
                     f"{vs} |")
    return "\n".join(lines)


def gsr_decision_markdown(df: pd.DataFrame) -> str:
    """The GSR decision (``gsr_decision.csv``, :mod:`rcp_lib.experiments.gsr`) as two tables: W16A4KV16 perplexity
    per R1 (mean ± SE over seeds; a deterministic R1 is one exact value, not tested) with its order against QuaRot's
    R1, and GSR against its control (same blocks, natural order) per weight group at W2A16KV16; orders from t-tests
    on the per-seed values (paired by seed), p shown."""
    def cell(v: pd.Series, deterministic: bool = False) -> str:
        v = v.astype(float)
        if not len(v):
            return "–"
        if len(v) < 2:
            return f"{_fmt_ppl(float(v.iloc[0]))}" + (" (deterministic: one exact run)" if deterministic else
                                                      " (one seed)")
        return f"{_fmt_ppl(float(v.mean()))} ± {_fmt_ppl(float(v.std(ddof=1) / math.sqrt(len(v))))}"

    out = []
    act = df[df["part"] == "activations"]
    if len(act):
        ref = "QuaRot (random Hadamard)"
        orders = _orders_from_rows(act, "method", "ppl", ref)
        out += ["| R1 (weights in full precision, W16A4KV16) | seeds | ppl (mean ± SE) | vs QuaRot's R1 |",
                "|---|---|---|---|"]
        for name, g in act.groupby("method", sort=False):
            det = bool(g["deterministic"].astype(str).eq("True").all()) if "deterministic" in g else False
            vs = "–" if name == ref else ("no test (deterministic, one run)" if det else orders.get(name, "–"))
            out.append(f"| {name} | {len(g)} | {cell(g['ppl'], det)} | {vs} |")
    wts = df[df["part"] == "weights"]
    if len(wts):
        out += ["", "| weight group (R1 block) | GSR-GPTQ (mean ± SE) | BlockHadamard-GPTQ (mean ± SE) | GSR vs control |",
                "|---|---|---|---|"]
        for g, sub in wts.groupby("w_group", sort=True):
            gsr = sub[sub["r1"] == "gsr"]
            ctl = sub[sub["r1"] == "block_hadamard"]
            vs = _orders_from_rows(sub.assign(m=sub["r1"].map({"gsr": "GSR", "block_hadamard": "control"})),
                                   "m", "ppl", "GSR").get("control", "–")
            out.append(f"| {int(g)} ({int(sub['block'].iloc[0])}) | {cell(gsr['ppl'])} | {cell(ctl['ppl'])} | {vs} |")
    return "\n".join(out)


def r4_blocks_markdown(df: pd.DataFrame) -> str:
    """The R4 blocks (``r4_blocks.csv``, :mod:`rcp_lib.experiments.r4`) as a table: W16A4KV16 perplexity per R4 (mean ±
    SE over seeds) and its order against the full Hadamard from a seed-paired t-test on the per-seed values, p shown;
    the CPU the rows ran on (another CPU type rounds differently: compare within one)."""
    from .experiments.r4 import FULL

    orders = _orders_from_rows(df, "method", "ppl", FULL)
    out = ["R4 blocks (notebook 06 of the `ablation` profile, `results/ablation/r4_blocks.csv`"
           f"{_ran_on(df)}): the fused W2A4 pre-kernel runs R4 only for some orders "
           "(`hadamard_supported`), so a deployment of a model whose MLP width it cannot run (LLaMA-2-7B's 11008) "
           "keeps a torch transform or trains with a block-diagonal R4 of power-of-two blocks. What the blocks cost on "
           "4-bit activations, weights in full precision (W16A4KV16), QuaRot's R1:", "",
           "| R4 | seeds | ppl (mean ± SE) | vs the full Hadamard |", "|---|---|---|---|"]
    for name, g in df.groupby("method", sort=False):
        v = g["ppl"].astype(float)
        sem = f" ± {_fmt_ppl(float(v.std(ddof=1) / math.sqrt(len(v))))}" if len(v) > 1 else " (one seed)"
        out.append(f"| {name} | {len(v)} | {_fmt_ppl(float(v.mean()))}{sem} | "
                   f"{'–' if name == FULL else orders.get(name, '–')} |")
    return "\n".join(out)


def _trained_recipe(config: dict) -> dict:
    """A row's ``config`` read back as a :class:`Recipe` (so a field added after the row was written takes its
    default), without what does not change the trained weights of one seed (validation and checkpoint intervals, the
    seed) or names the row."""
    config = Recipe.of_row(config).to_dict()
    skip = {"val_every", "checkpoint_every", "seed"}
    return {"quant": config.get("quant"), "qat": {k: v for k, v in (config.get("qat") or {}).items() if k not in skip},
            "rotation": {k: v for k, v in (config.get("rotation") or {}).items() if k != "seed"}}


def _variant_what(config: dict) -> str:
    """What a recipe variant trains, read from its row's ``config``: the start, Block-AP and the end-to-end budget."""
    q, w = config.get("qat") or {}, ((config.get("quant") or {}).get("weight") or {})
    parts = []
    if q.get("gptq_start"):
        parts.append(f"GPTQ start, static range (lo / hi at lr {q.get('lr_range') or q.get('lr_quant'):g})")
    else:
        parts.append(f"clip `{w.get('clip_init')}`, levels `{w.get('ldp_init')}`, no GPTQ")
    if q.get("block_ap_steps"):
        parts.append(f"Block-AP {q['block_ap_steps']} steps per block on {q.get('block_ap_samples')} windows (lr "
                     f"{q.get('block_ap_lr_weights'):g} / {q.get('block_ap_lr_quant'):g})")
    parts.append(f"{q.get('steps')} end-to-end steps × {q.get('seqlen')} tokens")
    return "; ".join(parts)


def variants_markdown(var: pd.DataFrame, table_config: dict | None = None) -> str:
    """The recipe variants (``recipe_variants.csv``, one row per variant and seed; ``python -m rcp_lib.experiments.variants``):
    a table of validation perplexity (mean ± standard error over seeds), step-0 perplexity, training seconds, tokens,
    Block-AP's MSE ratio and the movement, each variant's order against ``default`` (only from a t-test, :mod:`rcp_lib.stats`),
    one sentence on what that means for the default recipe and, given the ``config`` of the perplexity table's RCP
    W2A4KV4 row (``table_config``), which variant's recipe that row trains with."""
    def num(v, fmt):
        return "–" if v is None or pd.isna(v) else fmt(float(v))

    r0 = var.iloc[0]
    lines = [f"QAT recipe variants (`python -m rcp_lib.experiments.variants`, `results/cpu/recipe_variants.csv`): the sweep's "
             f"selected recipe (`default`: its searched start, no GPTQ) against each variant at the same seeds, scored like the sweep on {r0['val_split']}; `seconds` is "
             f"GPTQ + Block-AP + training, without evaluations. An order against the default is stated only from "
             f"a t-test on log perplexity over the seeds (paired by seed, else Welch's; two-sided p < 0.05, p shown).", "",
             "| variant | what | seeds | val ppl (mean ± SE) | step-0 ppl | seconds (mean) | tokens | Block-AP MSE "
             "after / before | mean \\|Δ clip ratio\\| | mean \\|Δ level\\| | weight change | vs default |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mean = var.groupby("variant", sort=False).mean(numeric_only=True)
    first = var.groupby("variant", sort=False).first()
    first["vs_default"] = pd.Series(_orders_from_rows(var, "variant", "val_ppl", "default"), dtype=object)
    for name, r in first.iterrows():
        m = mean.loc[name]
        vs = r.get("vs_default")
        lines.append(
            f"| {name} | {_variant_what(json.loads(r['config'])) if isinstance(r.get('config'), str) else '–'} | "
            f"{int(r['n_seeds'])} | {_fmt_ppl(float(r['val_ppl_mean']))} ± {num(r['val_ppl_sem'], _fmt_ppl)} | "
            f"{num(m['step0_val_ppl'], _fmt_ppl)} | {m['seconds']:.0f} | {int(r['tokens'])} | "
            f"{num(m.get('block_ap_mse_ratio'), lambda x: f'{x:.3f}')} | {num(m['clip_shift'], lambda x: f'{x:.4f}')} | "
            f"{num(m['level_shift'], lambda x: f'{x:.4f}')} | {num(m['weight_shift'], lambda x: f'{x:.2g}')} | "
            f"{vs if isinstance(vs, str) and vs else '–'} |")
    better = [n for n, r in first.iterrows() if isinstance(r.get("vs_default"), str)
              and r["vs_default"].startswith(f"{n} < default")]
    worse = [n for n, r in first.iterrows() if isinstance(r.get("vs_default"), str)
             and r["vs_default"].startswith(f"default < {n}")]
    same = [n for n in first.index if n != "default" and n not in better + worse]
    txt = []
    if better:
        txt.append(f"Lower than the default (t-test, p < 0.05): {', '.join(better)}.")
    if worse:
        txt.append(f"Higher than the default (t-test, p < 0.05): {', '.join(worse)}.")
    if same:
        txt.append(f"Not separable from the default at this budget: {', '.join(same)}.")
    if not better:
        txt.append("No variant is lower than the default at p < 0.05.")
    if table_config is not None and "config" in var:
        same = [n for n, r in first.iterrows()
                if _trained_recipe(json.loads(r["config"])) == _trained_recipe(table_config)]
        txt.append(f"The perplexity table's RCP rows train with the recipe of `{same[0]}`." if same else
                   "The perplexity table's RCP W2A4KV4 row trains with none of these recipes.")
    return "\n".join(lines) + "\n\n" + " ".join(txt)


def _current_order(vs: object) -> str:
    """An order phrase of :mod:`rcp_lib.stats` (it names its test and p, or n), else "" (a phrase written by an older
    rule, e.g. "beyond two standard errors", is never shown)."""
    if not isinstance(vs, str) or not vs:
        return ""
    return vs if (" p = " in vs or "(n = " in vs or vs.startswith("not comparable")) else ""


def _orders_from_rows(rows: pd.DataFrame, key: str, value: str, ref: object, label=str) -> dict:
    """``{group: order phrase against ref}`` recomputed from per-seed rows (Welch's t-test on log ``value``, paired by
    seed when both groups ran the same seeds): the orders a table shows come from the values, never from cached text."""
    from .experiments.ablation import separation

    groups = {}
    for g, df in rows.groupby(key, sort=False):
        df = df.sort_values("seed") if "seed" in df else df
        groups[g] = {"method": label(g), "ppl_values": [float(v) for v in df[value]],
                     **({"seeds": [int(x) for x in df["seed"]]} if "seed" in df else {})}
    if ref not in groups:
        return {}
    return {g: separation(groups[ref], r) for g, r in groups.items() if g != ref}


def ablation_markdown(summary: pd.DataFrame, start: pd.DataFrame | None = None,
                      seeds: pd.DataFrame | None = None) -> str:
    """The ablation with seeds (``results/ablation/ablation_summary.csv``): perplexity mean ± standard error over seeds,
    the start's perplexity (before the first QAT step) with what QAT bought over it (a seed-paired t-test), how far
    each part moved (means over seeds; code flips: the share of weights whose code changed), and the order against RCP that
    :func:`rcp_lib.experiments.ablation.separation` states (only from a t-test, :mod:`rcp_lib.stats`).

    ``start`` (``ablation_start.csv`` of ``python -m rcp_lib.experiments.ablation_start``, one row per method and seed), when given,
    adds where each row's quantizer starts and ends against the rotated FP weights (clip ratio) and the uniform grid
    (level offset), means over seeds (the movement columns divide by the latent weights of the QAT start, which a GPTQ
    start puts inside the range). The report prints these columns and the tests; it states no cause for a difference. ``seeds`` (``ablation.csv``, one row per method and seed), when given, recomputes the orders from the
    values (:func:`rcp_lib.experiments.ablation.refresh_orders`); without it only orders in the current phrasing of
    :mod:`rcp_lib.stats` are shown."""
    def num(r, k, fmt):
        v = r.get(k)
        return "–" if v is None or pd.isna(v) else fmt(float(v))

    if seeds is not None and len(seeds):
        from .experiments.ablation import refresh_orders

        summary = pd.DataFrame(refresh_orders(summary.to_dict("records"), seeds.to_dict("records")))
    summary = summary.assign(**{c: summary[c].map(_current_order) for c in ("vs_RCP", "vs_control", "vs_start")
                                if c in summary})
    means: dict[str, dict] = {}
    if start is not None and len(start):
        cols = ["clip_ratio_start", "clip_ratio_trained", "clip_shift", "level_offset_start", "level_offset_trained"]
        means = start.groupby("method")[cols].mean().to_dict("index")
    extra_h, extra_s = ("", "") if not means else (" clip ratio vs FP weights: start → trained | levels off uniform: "
                                                   "start → trained |", "---|---|")
    rng = "range_shift_mean" in summary  # rows computed since the range's own movement is recorded
    rng_h, rng_s = (" mean \\|Δ range\\| / range |", "---|") if rng else ("", "")
    lines = ["| method | seeds | ppl (mean ± SE) | start ppl (before QAT) | QAT vs its start | clip ratio init → final | "
             f"mean \\|Δ clip ratio\\| |{rng_h} mean \\|Δ level\\| | code flips | weight change |{extra_h} vs RCP |",
             f"|---|---|---|---|---|---|---|{rng_s}---|---|---|{extra_s}---|"]
    for r in summary.to_dict("records"):
        vs, vst = r.get("vs_RCP"), r.get("vs_start")
        f = means.get(r["method"])
        extra = "" if not means else (
            " – | – |" if f is None else
            f" {f['clip_ratio_start']:.3f} → {f['clip_ratio_trained']:.3f} | {f['level_offset_start']:.4f} → "
            f"{f['level_offset_trained']:.4f} |")
        lines.append(f"| {r['method']} | {int(r['n'])} | {_fmt_ppl(float(r['ppl_mean']))} ± {num(r, 'ppl_sem', _fmt_ppl)} | "
                     f"{num(r, 'step0_ppl_mean', _fmt_ppl)} | {vst if isinstance(vst, str) and vst else '–'} | "
                     f"{num(r, 'clip_ratio_init_mean', lambda x: f'{x:.3f}')} → "
                     f"{num(r, 'clip_ratio_final_mean', lambda x: f'{x:.3f}')} | {num(r, 'clip_shift_mean', lambda x: f'{x:.4f}')} | "
                     + (f"{num(r, 'range_shift_mean', lambda x: f'{x:.4f}')} | " if rng else "") +
                     f"{num(r, 'level_shift_mean', lambda x: f'{x:.4f}')} | {num(r, 'code_flips_mean', lambda x: f'{x:.2g}')} | "
                     f"{num(r, 'weight_shift_mean', lambda x: f'{x:.2g}')} |"
                     f"{extra} {vs if isinstance(vs, str) and vs else '–'} |")
    if means:
        lines.append("\n`clip ratio init → final` and the movement columns compare the quantizer with the latent weights "
                     "at the start of QAT (after a GPTQ start: GPTQ's weights, rounded onto the grid, so the ratio is 1 by "
                     "construction); the two columns after them (`python -m rcp_lib.experiments.ablation_start --profile "
                     "ablation`, `results/ablation/ablation_start.csv`) compare it with the rotated FP weights, which "
                     "neither GPTQ nor QAT touched, and the level positions with the uniform grid's.")
    for r in summary.to_dict("records"):
        vc = r.get("vs_control")
        if isinstance(vc, str) and vc:
            lines.append(f"\n{r['method']} against its control (same blocks, natural order): {vc}.")
    return "\n".join(lines)


#: the overrides a token curve of a profile may carry (``python -m rcp_lib.experiments.curve --steps/--val-every``): its length
TOKEN_CURVE_OVERRIDES = frozenset({"qat_steps", "qat_val_every", "search_curve_length"})


def token_curve_file(d: Path) -> Path | None:
    """The token curve of the profile whose results are ``d``: ``d/qat_tokens.csv``, or the newest (``date_utc``) of the
    run folders ``<d>-<hash>/qat_tokens.csv`` whose overrides are only its length (:data:`TOKEN_CURVE_OVERRIDES`; a
    profile with overrides writes to its own folder, :func:`rcp_lib.experiments.rows.write_rows`); None without one."""
    name = _file("qat_tokens")
    if (d / name).exists():
        return d / name
    found = []
    for p in d.parent.glob(f"{d.name}-*/{name}"):
        df = pd.read_csv(p)
        over = set(json.loads(df["overrides"].iloc[0])) if "overrides" in df and len(df) else {"?"}
        if over <= TOKEN_CURVE_OVERRIDES:
            found.append((str(df["date_utc"].max()) if "date_utc" in df else "", p))
    return max(found)[1] if found else None


def token_curve_markdown(curve: pd.DataFrame, profile: str = "cpu", link_root: str = "figures/") -> str:
    """One paragraph on ``qat_tokens.csv`` (:func:`rcp_lib.experiments.token_curve`, one row per validation point of
    one long RCP run): the command that wrote it, the validation perplexity at the first and the last point against
    FP on the same held-out windows, what the last doubling of tokens bought, and how far the whole run moved each
    part. Every number is read from ``curve``."""
    c = curve.sort_values("tokens")
    first, last = c.iloc[0], c.iloc[-1]
    steps, every = int(last["step"]), int(c["step"].diff().dropna().mode().iloc[0]) if len(c) > 1 else int(last["step"])
    fp = float(last["fp_val_ppl"])
    commits = ", ".join(sorted({str(x)[:8] for x in c["git_commit"]})) if "git_commit" in c else "?"
    base = profile.split("-")[0] if profile.split("-")[0] in PROFILES else profile  # "cpu-<hash>": the cpu profile
    txt = (f"How far would more tokens go (`python -m rcp_lib.experiments.curve --profile {base} --steps {steps} "
           f"--val-every {every}`; `results/{profile}/qat_tokens.csv`, git {commits}): one {last['method']} "
           f"{last['setting']} run of {steps} steps of the `{base}` profile's recipe (its learning-rate schedule spans "
           f"the whole run, so a point at the table's budget is not the table's row), scored every {every} steps on "
           f"{int(last['val_windows'])} held-out windows of {int(last['val_seqlen'])} tokens from the tail of the train "
           f"split. Validation perplexity {_fmt_ppl(float(first['val_ppl']))} at {int(first['tokens']):,} tokens "
           f"({_fmt_x(float(first['val_ppl']) / fp)} FP) → {_fmt_ppl(float(last['val_ppl']))} at "
           f"{int(last['tokens']):,} tokens ({_fmt_x(float(last['val_ppl']) / fp)} FP; FP {_fmt_ppl(fp)}).")
    half = c[c["tokens"] <= int(last["tokens"]) // 2]
    if len(half) and len(c) > 2:
        h = half.iloc[-1]
        drop = 1 - float(last["val_ppl"]) / float(h["val_ppl"])
        txt += (f" The last doubling of tokens ({int(h['tokens']):,} → {int(last['tokens']):,}) "
                + (f"lowered it by {100 * drop:.0f} %." if drop > 0 else f"did not lower it ({_fmt_ppl(float(h['val_ppl']))} → "
                   f"{_fmt_ppl(float(last['val_ppl']))})."))
    moved = [(k, last.get(f"run_{k}")) for k in ("clip_shift", "level_shift", "weight_shift")]
    if all(v is not None and not pd.isna(v) for _, v in moved):
        cs, ls, ws = (float(v) for _, v in moved)
        txt += (f" Over the whole run the clip ratio moved by {cs:.4f} and the level fractions by {ls:.4f} on average "
                f"(mean |Δ| over groups), the latent weights by {ws:.2g} (relative Frobenius change).")
    return txt + f"\n\n![qat_tokens]({link_root}{profile}/qat_tokens.png)"


def benchmarks_markdown(d: Path) -> str:
    """Benchmark table from ``hadamard_speed.json`` and ``qat_step.json`` (scripts of ``benchmarks/``), if present."""
    lines = []
    hp, qp = d / _file("hadamard_speed"), d / _file("qat_step")
    if hp.exists():
        h = json.loads(hp.read_text())
        cells = ", ".join(f"n = {r['n']}: {r['speedup']:.2g}× ({1000 * r['fast_s']:.0f} ms vs {1000 * r['dense_s']:.0f} ms)"
                          for r in h["rows"])
        diff = max(r["max_abs_diff"] for r in h["rows"])
        lines.append(f"| `python benchmarks/bench_hadamard.py --json results/{d.name}/hadamard_speed.json` | "
                     f"`apply_hadamard` vs dense `x @ H`, {h['rows'][0]['rows']} rows, float32, median of "
                     f"{h['rows'][0]['repeats']} ({h['device']}, git {h['git_commit'][:8]}) | {cells}; max abs difference "
                     f"≤ {diff:.2g} |")
    if qp.exists():
        q = json.loads(qp.read_text())
        lines.append(f"| `python benchmarks/bench_qat_step.py --repeats {q['repeats']} --json results/{d.name}/qat_step.json` | "
                     f"one QAT step (student fwd+bwd, teacher fwd, KL, AdamW), {q['model']}, seqlen {q['seqlen']}, batch "
                     f"{q['batch']}, median of {q['repeats']} interleaved ({q['device']}, git {q['git_commit'][:8]}) | "
                     f"FP step {q['fp_step_s']:.2f} s, W2A4KV4 fake-quant RCP step {q['rcp_step_s']:.2f} s: overhead "
                     f"**{q['overhead_ratio']:.2f}×**; peak RSS {q['fp_peak_rss_mb'] / 1000:.1f} GB / "
                     f"{q['rcp_peak_rss_mb'] / 1000:.1f} GB |")
    if not lines:
        return ""
    return "\n".join(["| script | what | measured |", "|---|---|---|", *lines])


def code_versions_markdown(ppl: pd.DataFrame, summary: pd.DataFrame, seeds: pd.DataFrame | None) -> str:
    """A sentence when the ablation (``summary``, with its per-seed rows ``seeds``) and the perplexity table ``ppl``
    were computed by different code (their ``code_fingerprint`` columns), "" when by the same code (or unrecorded).

    The rows both files compute (same method, setting and seed) decide what it says: identical perplexities show that
    the change between the two code versions did not move them; any difference, or nothing shared, makes the two
    not comparable row to row until one of them is regenerated at the other's code."""
    fp_tab = set(ppl["code_fingerprint"].astype(str)) if "code_fingerprint" in ppl else set()
    fp_abl = set(summary["code_fingerprint"].astype(str)) if "code_fingerprint" in summary else set()
    if fp_tab == fp_abl:
        return ""
    codes = (f"the ablation ran with code {', '.join(sorted(fp_abl)) or '?'} and the perplexity table with code "
             f"{', '.join(sorted(fp_tab)) or '?'} (`code_fingerprint` columns)")
    shared = []
    if seeds is not None and {"method", "setting", "seed", "ppl"} <= set(seeds) and "seed" in ppl:
        both = seeds.merge(ppl[["method", "setting", "seed", "ppl"]], on=["method", "setting", "seed"],
                           suffixes=("_abl", "_tab"))
        shared = [(r.method, r.setting, int(r.seed), float(r.ppl_abl), float(r.ppl_tab)) for r in both.itertuples()]
    if shared and all(a == b for *_, a, b in shared):
        rows = ", ".join(f"{m} {s} seed {sd}: {a:.2f}" for m, s, sd, a, _ in shared)
        return (f"Code versions: {codes}; the rows both compute ({rows}) are identical in both files, so the change "
                "between the two versions did not move them.")
    diff = "; ".join(f"{m} {s} seed {sd}: {a:.2f} vs {b:.2f}" for m, s, sd, a, b in shared if a != b)
    why = f"the rows both compute differ ({diff})" if diff else "they share no row to check them against each other"
    return (f"**Not comparable row to row:** {codes}, and {why}; regenerate one at the other's code (the ablation: "
            "`python -m rcp_lib reproduce --profile ablation`, notebook 06).")


def ablation_versions_markdown(d: Path, ppl: pd.DataFrame) -> str:
    """:func:`code_versions_markdown` of the results folder ``d`` (a profile whose claims read ``results/ablation/``)
    and its perplexity table ``ppl``: "" where ``d`` reads no ablation or both ran the same code."""
    abl_p = d.parent / "ablation" / _file("ablation_summary")
    if _profile_of(d) not in SEEDED_CLAIM_PROFILES or not abl_p.exists():
        return ""
    seeds_p = abl_p.parent / _file("ablation")
    return code_versions_markdown(ppl, pd.read_csv(abl_p), pd.read_csv(seeds_p) if seeds_p.exists() else None)


def _read_ppl(d: Path, profile: str) -> pd.DataFrame:
    """``perplexity.csv`` of the results folder ``d`` (FileNotFoundError naming the notebook that writes it)."""
    ppl_path = d / _file("perplexity")
    if not ppl_path.exists():
        raise FileNotFoundError(f"{ppl_path} not found: run notebook 02 first "
                                f"(python -m rcp_lib reproduce --profile {profile} --notebooks 02_perplexity.ipynb)")
    return pd.read_csv(ppl_path)


def timing_markdown(d: Path, profile: str) -> str:
    """One sentence on the last full ``reproduce`` of the profile (``reproduce_timing.json`` of ``d``): its time, the
    rows it computed or took from the cache, where and when; empty without that file."""
    timing = d / _file("reproduce_timing")
    if not timing.exists():
        return ""
    t = json.loads(timing.read_text())
    nb_rows = [r for r in (t.get("rows") or {}).values() if isinstance(r, dict)]
    if nb_rows:  # every cache key holds the code fingerprint: a hit is a row of this code (earlier in the run or before)
        cold = (f"computing {sum(int(r.get('computed', 0)) for r in nb_rows)} result rows and taking "
                f"{sum(int(r.get('hits', 0)) for r in nb_rows)} from the cache of this code")
    else:
        cold = ("from empty caches" if not t.get("cached_rows_at_start") else
                f"with {t['cached_rows_at_start']} cached rows at the start")
    cpu = f", {t['cpu_model']}" if t.get("cpu_model") else ""
    return (f"The last full `reproduce --profile {profile}` took **{t['total_seconds'] / 60:.0f} min** {cold} "
            f"on {t['device']}{cpu} (git {str(t['git_commit'])[:8]}, {t['date_utc']}); per notebook: "
            + ", ".join(f"{k.split('.')[0]} {v / 60:.1f} min" for k, v in t["notebooks"].items()) + ".")


def readme_markdown(profile: str = "cpu", results: Path | None = None) -> str:
    """The README's block for a profile: the last run's time, the claim table (:func:`claims_markdown`) and a link to
    the profile's ``SUMMARY.md`` (:func:`results_markdown`), which holds every table behind it."""
    d = Path(results) if results else results_dir(profile)
    ppl = _read_ppl(d, profile)
    out = [f"### Measured here: `{profile}` profile (regenerate with `python -m rcp_lib reproduce --profile {profile}` "
           f"then `python -m rcp_lib readme --profile {profile}`)", ""]
    t = timing_markdown(d, profile)
    out += [t, ""] if t else []
    out += [claims_markdown(d, ppl), ""]
    line = ablation_versions_markdown(d, ppl)  # the claims "with seeds" beside rows of another code version
    out += [line, ""] if line else []
    out += [f"Every table behind these rows, with its protocol, seeds and provenance: "
            f"[`results/{profile}/SUMMARY.md`](results/{profile}/SUMMARY.md) (generated by the same command)."]
    return "\n".join(out)


def results_markdown(profile: str = "cpu", results: Path | None = None, link_root: str = "figures/") -> str:
    """Every table of a profile's results with its protocol and provenance (the profile's ``SUMMARY.md``): the claim
    table, perplexity, rotation impact, sweeps, ablation with seeds, GSR, zero-shot, benchmarks. ``link_root`` is the
    figures root (the folder of ``<profile>/perplexity.png``) as a link prefix: ``"figures/"`` from the checkout;
    :func:`update_readme` passes it relative to the folder ``SUMMARY.md`` is written to."""
    d = Path(results) if results else results_dir(profile)
    zs_path = d / _file("zero_shot")
    ppl = _read_ppl(d, profile)
    r0 = ppl.iloc[0]
    qat = ppl[ppl.family == "qat"]
    commits = sorted(set(ppl["git_commit"].astype(str)))
    at = (f"git {commits[0]}" if len(commits) == 1 else
          f"{len(commits)} different commits ({', '.join(c[:8] + ('+dirty' if c.endswith('+dirty') else '') for c in commits)})")
    windows = f"{int(r0['windows'])} windows"
    if "windows_note" in ppl and isinstance(r0.get("windows_note"), str):
        windows = f"{r0['windows_note']} windows"
    out = [f"# Results of the `{profile}` profile", "",
           f"Generated from `results/{profile}/` (and `results/ablation/`) by `python -m rcp_lib readme --profile "
           f"{profile}`; do not edit by hand.", ""]
    t = timing_markdown(d, profile)
    out += [t, ""] if t else []
    cpus = ""
    if "cpu_model" in ppl:
        models = sorted(set(ppl["cpu_model"].dropna().astype(str)))
        cpus = f" ({' / '.join(models)})" if models else ""
    out += [claims_markdown(d, ppl), "",
            f"Perplexity of **{r0['model']}** on the **{r0['corpus']} test split**, seqlen {int(r0['seqlen'])}, "
            f"{windows} ({int(r0['tokens_scored'])} tokens scored), {r0['device']}{cpus}; rows computed at {at} "
            f"(each row's provenance is in `results/{profile}/perplexity.csv`). Lower is better.", ""]
    if len(qat):
        q = _qat_budget(qat.iloc[0]["config"])
        start = ""
        rcp_rows = qat[qat.method == "RCP"]
        if len(rcp_rows):
            quant = Recipe.of_row(json.loads(rcp_rows.iloc[0]["config"])).quant
            if quant is not None and quant.weight is not None:
                w = quant.weight
                start = f"; RCP's quantizer starts from clip `{w.clip_init}` and levels `{w.ldp_init}`"
                if q.get("gptq_start"):
                    lr = q.get('lr_range') or q['lr_quant']
                    how = (f"log-multipliers of the start's range train at {lr:g}"
                           if getattr(w, "range_param", "absolute") == "log" else f"lo / hi train at {lr:g}")
                    start += (f", then GPTQ on that grid (the calibration windows of the PTQ rows) and QAT with "
                              f"`range_mode=\"{w.range_mode}\"` ({how})")
        out += [f"QAT rows: {q['steps']} steps × batch {q['batch_size']} × grad-accum {q['grad_accum']} × "
                f"{q['seqlen']} tokens of the train split (same budget for every QAT row), loss "
                f"`{q.get('loss', 'kl')}` against the FP teacher, learning rates {q['lr_weights']:g} "
                f"(weights) / {q['lr_quant']:g} (quantizer), gradient clip {q['grad_clip']:g}"
                f"{start}.", ""]
    out += [ppl_markdown(ppl), "", f"![perplexity]({link_root}{profile}/perplexity.png)", ""]
    rot_p = d / _file("rotation_impact_summary")
    if rot_p.exists():
        if profile not in PROFILES:  # e.g. "cpu-<hash>": the layers are in its rows, not in a named profile
            which = "the analysed decoder layers (`rotation_impact_layers.csv`)"
        elif PROFILES[profile].analysis_layers is None:
            which = "every decoder layer"
        else:
            li = PROFILES[profile].analysis_layers
            which = f"the decoder layers {', '.join(map(str, li))} (`analysis_layers` of the `{profile}` profile)"
        out += [f"Rotation impact (notebook 01; `results/{profile}/rotation_impact_summary.csv`): mean over {which} and "
                "the projections of the 2-bit relative weight error ||W − Q(W)||² / ||W||² of four nested quantizers — "
                "min–max uniform, uniform with the MSE-optimal clip per group, non-uniform with the ends pinned to a "
                "clipped range (what LDP inside LWC represents), unconstrained Lloyd–Max; `range_gain` = uniform / "
                "uniform-clip, `shape_gain` = uniform-clip / pinned non-uniform. The non-uniform errors come from "
                "Lloyd searches (upper bounds within a few per cent of the optimum).", "",
                rotation_markdown(pd.read_csv(rot_p)), ""]
    sweep_p = d / _file("recipe_sweep")
    if sweep_p.exists():
        out += [sweep_markdown(pd.read_csv(sweep_p)), ""]
    gsweep_p = d / _file("recipe_sweep_gptq")
    if gsweep_p.exists():
        out += [sweep_table_markdown(pd.read_csv(gsweep_p), profile=profile), ""]
    lrq_p = d / _file("recipe_sweep_lrq")
    if lrq_p.exists():
        out += [sweep_table_markdown(pd.read_csv(lrq_p), name="recipe_sweep_lrq", profile=profile), ""]
    var_p = d / _file("recipe_variants")
    if var_p.exists():
        rcp = ppl[(ppl.method == "RCP") & (ppl.setting == "W2A4KV4")]
        out += [variants_markdown(pd.read_csv(var_p), json.loads(rcp.iloc[0]["config"]) if len(rcp) else None), ""]
    seeded = _profile_of(d) in SEEDED_CLAIM_PROFILES  # results/ablation/ runs the cpu profile's setting
    abl_p = d.parent / "ablation" / _file("ablation_summary")
    if seeded and abl_p.exists():
        abl = pd.read_csv(abl_p)
        start_p = abl_p.parent / _file("ablation_start")  # python -m rcp_lib.experiments.ablation_start
        commits = sorted(set(abl["git_commit"].astype(str))) if "git_commit" in abl else []
        out += [f"Ablation with seeds (`ablation` profile, notebook 06: `python -m rcp_lib reproduce --profile "
                f"ablation`; W2A4KV4, the `cpu` profile's test windows and QAT budget, one run per seed, the seed "
                f"setting the R1 signs and the data order; `results/ablation/`, git {', '.join(c[:8] for c in commits)}). "
                "An order against RCP is stated only from a t-test on log perplexity over the seeds (paired by seed) "
                "(two-sided p < 0.05, p shown).", ""]
        t = timing_markdown(abl_p.parent, "ablation")  # the ablation profile's run (GSR, R4, zero-shot included)
        out += [t, ""] if t else []
        out += [ablation_markdown(abl, pd.read_csv(start_p) if start_p.exists() else None,
                                  pd.read_csv(abl_p.parent / _file("ablation"))
                                  if (abl_p.parent / _file("ablation")).exists() else None), ""]
        line = ablation_versions_markdown(d, ppl)
        if line:
            out += [line, ""]
    gsr_p = d.parent / "ablation" / _file("gsr_decision")
    if seeded and gsr_p.exists():
        out += ["GSR decided (notebook 06 of the `ablation` profile, "
                "`results/ablation/gsr_decision.csv`): what a block-diagonal R1 does to 4-bit activations alone, and "
                "GSR's sequency order where it can matter (weight groups smaller than the block).", "",
                gsr_decision_markdown(pd.read_csv(gsr_p)), ""]
    r4_p = d.parent / "ablation" / _file("r4_blocks")
    if seeded and r4_p.exists():
        out += [r4_blocks_markdown(pd.read_csv(r4_p)), ""]
    tok_p = token_curve_file(d)
    if tok_p is not None:
        out += [token_curve_markdown(pd.read_csv(tok_p), tok_p.parent.name, link_root), ""]
    ctl = gsr_control_markdown(ppl)
    if ctl:
        out += ["GSR and its control: the same block-diagonal R1 with the rows of each block in natural Hadamard order "
                "instead of sequency order. The block is the weight group, so within a group the two differ only by a "
                "permutation of the rotated columns, which per-group RTN/LWC/LDP and per-token activation quantizers "
                "cannot see (GPTQ's column order can); any difference below comes from that order and from one seed "
                "per row, so no order between the two is claimed (not separable at this budget).", "", ctl, ""]
    full_p = d / _file("perplexity_full_split")
    if full_p.exists():
        full = pd.read_csv(full_p)
        sampled = ppl.set_index(["method", "setting"])["ppl"]
        out += [f"Scored on the whole test split ({int(full.iloc[0]['windows'])} windows, "
                f"`results/{profile}/perplexity_full_split.csv`) next to the table's sample:", "",
                "| method | setting | whole split | table's sample | sample / whole |", "|---|---|---|---|---|"]
        for r in full.itertuples():
            smp = sampled.get((r.method, r.setting))
            out.append(f"| {r.method} | {r.setting} | {_fmt_ppl(float(r.ppl))} | "
                       f"{_fmt_ppl(float(smp)) if smp is not None else '–'} | "
                       f"{float(smp) / float(r.ppl):.3f} |" if smp is not None else
                       f"| {r.method} | {r.setting} | {_fmt_ppl(float(r.ppl))} | – | – |")
        out.append("")
    for extra in sorted(d.glob(_file("perplexity_qat"))):  # optional: QAT rows re-trained with a longer budget
        longer = pd.read_csv(extra)
        if not len(longer):
            continue
        q = _qat_budget(longer.iloc[0]["config"])
        settings = json.dumps(list(dict.fromkeys(longer["setting"])))
        methods = json.dumps(list(dict.fromkeys(longer["method"])))
        out += [f"Longer QAT, `results/{profile}/{extra.name}` (written by `python -m rcp_lib table --profile {profile} "
                f"--families qat --name {extra.stem} --set qat_steps={q['steps']} --set 'settings={settings}' "
                f"--set 'methods={methods}'`; {q['steps']} steps × "
                f"{q['batch_size'] * q['grad_accum'] * q['seqlen']} tokens, same test windows):", "",
                longer_qat_markdown(ppl, longer), ""]
    if zs_path.exists():
        from .experiments import chance_level

        zs = pd.read_csv(zs_path, dtype={"per_doc": str, "docs_sha256": str})
        chance = {t: chance_level(t) for t in dict.fromkeys(zs["task"])}
        floor = ", ".join(f"{t} {c:g}" for t, c in chance.items() if c is not None) or "n/a"
        out += [f"Zero-shot accuracy (lm-evaluation-harness, 0-shot, acc ± stderr; random-guess accuracy: {floor}):", "",
                zero_shot_markdown(zs), ""]
        tests = zero_shot_tests_markdown(zs, ppl)
        if tests:
            out += [tests, ""]
    abl_zs = d.parent / "ablation" / _file("zero_shot_all")
    if profile == README_PROFILE and abl_zs.exists():  # every document, per-document outcomes (notebook 06)
        zs = pd.read_csv(abl_zs, dtype={"per_doc": str, "docs_sha256": str})
        n = ", ".join(f"{t} {int(k)}" for t, k in zs.groupby("task", sort=False)["n_examples"].max().items())
        out += [f"Zero-shot on every document (`results/ablation/{abl_zs.name}`, notebook 06, seed 0; documents: {n}; "
                f"the floor's perplexity from this profile's table):", "",
                zero_shot_markdown(zs), "", zero_shot_tests_markdown(zs, ppl) or "no per-document outcomes", ""]
    bench = benchmarks_markdown(d)
    if bench:
        out += ["Benchmarks (scripts; ratios measured side by side in one run; raw numbers with provenance in "
                f"`results/{profile}/`):", "", bench, ""]
    return "\n".join(out)


#: the profile whose run the checkout's README shows
README_PROFILE = "cpu"
#: the file of a profile's results folder that holds every generated table (:func:`results_markdown`)
SUMMARY = "SUMMARY.md"


def update_readme(profile: str = "cpu", readme: Path | None = None, results: Path | None = None) -> Path:
    """Replace the block between the RESULTS-TABLE markers of ``readme`` with :func:`readme_markdown` (the claim
    table) and write every table, :func:`results_markdown`, to ``SUMMARY.md`` of the results folder.

    The checkout's README (``readme`` None) shows the :data:`README_PROFILE` run only: another profile raises
    ValueError instead of replacing that block (print its markdown with ``python -m rcp_lib readme --print``).
    """
    if readme is None and profile != README_PROFILE:
        raise ValueError(f"README.md shows the {README_PROFILE!r} profile; --profile {profile} would replace that "
                         f"block: print the {profile!r} block with `python -m rcp_lib readme --profile {profile} "
                         f"--print` instead")
    path = Path(readme) if readme else readme_path()
    text = path.read_text()
    if BEGIN not in text:
        raise ValueError(f"{path} has no {BEGIN} marker")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else rest
    d = Path(results) if results else results_dir(profile)
    link = Path(os.path.relpath(figures_root().resolve(), d.resolve())).as_posix() + "/"  # wherever either lives
    summary = results_markdown(profile, d, link_root=link)  # raises before anything is written
    block = f"{BEGIN}\n{readme_markdown(profile, d)}\n{END}"
    atomic_write_text(summary + "\n", d / SUMMARY)
    return atomic_write_text(head + block + tail, path)
