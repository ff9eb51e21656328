"""Markdown summaries of a profile's results, and the README block that shows the last ``cpu`` run.

``python -m rcp_lib readme --profile cpu`` reads ``results/<profile>/perplexity.csv`` and ``zero_shot.csv`` (written by
notebooks 02 and 03), plus any ``perplexity_qat_*.csv`` (QAT rows re-trained longer with ``python -m rcp_lib table
--families qat --set qat_steps=N``), and rewrites the part of README.md between ``<!-- RESULTS-TABLE -->`` and
``<!-- /RESULTS-TABLE -->``. Nothing here computes a number: it only formats rows that the notebooks measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .io import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- RESULTS-TABLE -->", "<!-- /RESULTS-TABLE -->"


def _fmt_ppl(x: float) -> str:
    if pd.isna(x):
        return "–"
    if x < 100:
        return f"{x:.2f}"
    return f"{x:.0f}" if x < 1e5 else f"{x:.3g}"


def ppl_markdown(df: pd.DataFrame) -> str:
    """Methods × settings table of perplexities (rows in first-seen order, FP first).

    ``df`` has at least the columns method, setting, ppl (one row per method and setting).
    """
    settings = [s for s in dict.fromkeys(df["setting"]) if s != "FP"]
    methods = list(dict.fromkeys(df["method"]))
    fam = df.drop_duplicates("method").set_index("method")["family"] if "family" in df else None
    head = "| method | family | " + " | ".join(settings) + " |"
    lines = [head, "|" + "---|" * (len(settings) + 2)]
    for m in methods:
        sub = df[df.method == m].set_index("setting")["ppl"]
        if "FP" in sub.index:  # the FP baseline has no setting: one value for every column
            cells = [_fmt_ppl(float(sub.iloc[0]))] * len(settings)
        else:
            cells = [_fmt_ppl(float(sub[s])) if s in sub.index else "–" for s in settings]
        lines.append(f"| {m} | {fam[m] if fam is not None else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def zero_shot_markdown(df: pd.DataFrame) -> str:
    """Methods × tasks table of accuracy ± stderr (metric ``acc``), with the number of examples per task."""
    acc = df[df.metric == "acc"]
    tasks = list(dict.fromkeys(acc["task"]))
    n = acc.drop_duplicates("task").set_index("task")["n_examples"]
    lines = ["| method | setting | " + " | ".join(f"{t} acc (n={int(n[t])})" for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 2)]
    for (m, s), sub in acc.groupby(["method", "setting"], sort=False):
        sub = sub.set_index("task")
        cells = [f"{sub.at[t, 'value']:.3f} ± {sub.at[t, 'stderr']:.3f}" if t in sub.index else "–" for t in tasks]
        lines.append(f"| {m} | {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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


def results_markdown(profile: str = "cpu", results: Path | None = None) -> str:
    """The README block for a profile: perplexity and zero-shot tables with their protocol and provenance."""
    d = Path(results) if results else REPO / "results" / profile
    ppl_path, zs_path = d / "perplexity.csv", d / "zero_shot.csv"
    if not ppl_path.exists():
        raise FileNotFoundError(f"{ppl_path} not found: run notebook 02 first "
                                f"(python -m rcp_lib reproduce --profile {profile} --notebooks 02_perplexity.ipynb)")
    ppl = pd.read_csv(ppl_path)
    r0 = ppl.iloc[0]
    qat = ppl[ppl.family == "qat"]
    out = [f"### Measured here: `{profile}` profile (regenerate with `python -m rcp_lib reproduce --profile {profile}` "
           f"then `python -m rcp_lib readme --profile {profile}`)", "",
           f"Perplexity of **{r0['model']}** on the **{r0['corpus']} test split**, seqlen {int(r0['seqlen'])}, "
           f"{int(r0['windows'])} windows ({int(r0['tokens_scored'])} tokens scored), {r0['device']}; first row computed "
           f"{r0['date_utc']} at git {r0['git_commit']} (each row's provenance is in `results/{profile}/perplexity.csv`). "
           "Lower is better.", ""]
    if len(qat):
        q = _qat_budget(qat.iloc[0]["config"])
        out += [f"QAT rows: {q['steps']} steps × batch {q['batch_size']} × grad-accum {q['grad_accum']} × "
                f"{q['seqlen']} tokens of the train split (same budget for every QAT row), loss "
                f"`{q.get('loss', 'kl')}` against the FP teacher.", ""]
    out += [ppl_markdown(ppl), "", f"![perplexity](figures/{profile}/perplexity.png)", ""]
    for extra in sorted(d.glob("perplexity_qat_*.csv")):  # optional: QAT rows re-trained with a longer budget
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

        zs = pd.read_csv(zs_path)
        chance = {t: chance_level(t) for t in dict.fromkeys(zs["task"])}
        floor = ", ".join(f"{t} {c:g}" for t, c in chance.items() if c is not None) or "n/a"
        out += [f"Zero-shot accuracy (lm-evaluation-harness, 0-shot, acc ± stderr; random-guess accuracy: {floor}):", "",
                zero_shot_markdown(zs), ""]
    return "\n".join(out)


def update_readme(profile: str = "cpu", readme: Path | None = None, results: Path | None = None) -> Path:
    """Replace the block between the RESULTS-TABLE markers of ``readme`` with :func:`results_markdown`."""
    path = Path(readme) if readme else REPO / "README.md"
    text = path.read_text()
    if BEGIN not in text:
        raise ValueError(f"{path} has no {BEGIN} marker")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1] if END in rest else rest
    block = f"{BEGIN}\n{results_markdown(profile, results)}\n{END}"
    return atomic_write_text(head + block + tail, path)
