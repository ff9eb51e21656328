"""Build ``results/ablation/ablation.csv`` and ``ablation_summary.csv`` from rows computed elsewhere.

The seeded ablation (:func:`rcp_lib.experiments.ablation_table`) is one perplexity row per (method, seed), each the
cached row of :func:`rcp_lib.experiments.ppl_row`. When those rows were computed by the ``table`` command of an
earlier commit (e.g. the PTQ rows at seeds 1 and 2 through ``table --profile ablation --set seed=1 --set
'methods=[...]' --table perplexity``, or the QAT rows through ``--table ablation``), this script puts them in the
ablation's layout without recomputing anything:

* ``--ablation``: ``ablation.csv`` files (the QAT rows, already in :data:`~rcp_lib.experiments.ABLATION_COLUMNS`);
* ``--perplexity``: ``perplexity.csv`` files whose rows of ``--methods`` at W2A4KV4 become ablation rows through
  :func:`rcp_lib.experiments.ablation.ablation_row` (their ``seed`` column is the row's seed).

Every row keeps the commit and code fingerprint that computed it; the script refuses rows of more than one code
fingerprint (rows of different code are not one table) and duplicate (method, seed) pairs. The summary is
:func:`~rcp_lib.experiments.ablation.summarize_ablation` with the orders of
:func:`~rcp_lib.experiments.ablation.refresh_orders` (t-tests recomputed from the per-seed values).

    python scripts/ablation_from_rows.py --ablation results/ablation-<hash>/ablation.csv \\
        --perplexity results/cpu/perplexity.csv results/ablation-<hash1>/perplexity.csv \\
        --methods "QuaRot-GPTQ static" --out results/ablation
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from rcp_lib.experiments.ablation import (ABLATION_COLUMNS, ABLATION_SETTING, ablation_row, refresh_orders,
                                          summarize_ablation)
from rcp_lib.io import atomic_write_csv

#: provenance columns copied from a source row into the summary (from the first row of each method)
PROVENANCE = ("rcp_lib", "torch", "transformers", "python", "machine", "device", "cpu_model", "cpu_flags",
              "torch_cpu_capability", "torch_threads", "blas", "git_commit", "code_fingerprint", "allow_dirty",
              "date_utc")


def _read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(v: str | None):
    if v is None or v == "":
        return None
    try:
        return float(v)
    except ValueError:
        return v


def build(ablation: list[Path], perplexity: list[Path], methods: list[str]) -> tuple[list[dict], list[dict]]:
    """(per-seed rows, summary rows) from the given files (module docstring)."""
    rows, prov, codes = [], {}, set()
    for p in ablation:
        summ = p.parent / "ablation_summary.csv"  # an older ablation.csv has no code_fingerprint: its summary's
        code_of = {r["method"]: r.get("code_fingerprint") for r in (_read(summ) if summ.exists() else [])}
        for r in _read(p):
            rows.append({k: (_num(r.get(k)) if k not in ("method", "setting", "git_commit", "code_fingerprint")
                             else r.get(k)) for k in ABLATION_COLUMNS})
            rows[-1]["seed"] = int(rows[-1]["seed"])
            rows[-1]["code_fingerprint"] = rows[-1]["code_fingerprint"] or code_of.get(r["method"])
            codes.add(rows[-1]["code_fingerprint"])
    for p in perplexity:
        for r in _read(p):
            if r["method"] in methods and r["setting"] == ABLATION_SETTING:
                codes.add(r["code_fingerprint"])
                prov.setdefault(r["method"], {k: r.get(k) for k in PROVENANCE})
                rows.append(ablation_row({k: _num(v) if k not in ("method", "setting", "git_commit",
                                                                 "code_fingerprint") else v for k, v in r.items()}))
    order_of = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in rows))}
    rows.sort(key=lambda r: (order_of[r["method"]], r["seed"]))  # seeds in order: rows of one seed pair up
    seen = [(r["method"], r["seed"]) for r in rows]
    dup = {x for x in seen if seen.count(x) > 1}
    if dup:
        raise SystemExit(f"duplicate (method, seed) rows: {sorted(dup)}")
    for p in ablation:
        for r in _read(p.parent / "ablation_summary.csv") if (p.parent / "ablation_summary.csv").exists() else []:
            codes.add(r.get("code_fingerprint"))
            prov.setdefault(r["method"], {k: r.get(k) for k in PROVENANCE})
    codes.discard(None)
    if len(codes) > 1:
        raise SystemExit(f"rows of {len(codes)} code versions {sorted(codes)}: not one table")
    summary = refresh_orders(summarize_ablation(rows), rows)
    sources = json.dumps([str(p) for p in [*ablation, *perplexity]])
    for s in summary:
        s.update(prov.get(s["method"], {}))
        s["sources"] = sources  # the files the rows were taken from (nothing recomputed)
        for k in ("ppl_values", "seeds"):
            s[k] = json.dumps(s[k])
    return rows, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ablation", nargs="*", type=Path, default=[])
    ap.add_argument("--perplexity", nargs="*", type=Path, default=[])
    ap.add_argument("--methods", nargs="*", default=[])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    rows, summary = build(a.ablation, a.perplexity, a.methods)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(rows, a.out / "ablation.csv")
    atomic_write_csv(summary, a.out / "ablation_summary.csv")
    print(f"{len(rows)} rows, {len(summary)} methods -> {a.out}")


if __name__ == "__main__":
    main()
