"""Cell-by-cell comparison of two results folders (``python -m rcp_lib compare RESULTS_A RESULTS_B --rtol R``).

Every CSV file present in both folders (same path relative to each folder) is read as text; rows are matched by
position (the tables are written in a fixed order) and named by their label columns (:data:`LABEL_COLUMNS`: method,
setting, seed, ...). A cell present in both is compared

* as numbers when both parse as floats: equal when ``|a - b| <= atol + rtol * max(|a|, |b|)`` (NaN equals NaN);
* elementwise as numbers when both are JSON lists of numbers of the same length (e.g. per-seed values);
* as text otherwise (other JSON cells, booleans, names): equal when identical. Order phrases (``vs_*``: "A < B (paired
  p = 0.01, n = 3, 3)") carry p-values of their own and are compared as text: a rerun within tolerance can still
  print another p; read those lines as notes on the numbers they derive from.

Columns that say where, when and how fast a row was computed rather than what it measured are skipped:
:data:`SKIPPED_COLUMNS` (the provenance keys of :func:`rcp_lib.io.provenance`: commit, date, CPU, versions...; the
folder bookkeeping; wall-clock timings). Files, columns and rows present on one side only are reported too: rows
missing on one side count as differences, files and columns as notes.

With the default ``rtol = atol = 0`` the comparison asks "bit-identical?", which holds between runs of the same code
on the same CPU type; between CPU types see docs/reproducing.md ("Reproducibility across machines") for the
measured differences.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .io import PROVENANCE_KEYS

#: wall-clock measurements: they differ on every run, so they are not compared
TIMING_COLUMNS = ("seconds", "seconds_mean", "build_seconds", "eval_seconds", "qat_seconds", "gptq_seconds",
                  "median_us", "tokens_per_s", "tokens_per_second", "achieved_GBps", "pct_of_peak_bw",
                  "speedup_vs_fp16", "peak_copy_GBps", "measured_tree", "command")
#: every column :func:`compare_folders` skips (one place): provenance, output-folder bookkeeping, timings
SKIPPED_COLUMNS = frozenset(PROVENANCE_KEYS) | {"run_name", "lm_eval_version", "cuda", "gpu"} | set(TIMING_COLUMNS)
#: columns that name a row in the report (the first four present, in this order)
LABEL_COLUMNS = ("method", "setting", "seed", "task", "metric", "point", "variant", "case", "bench", "kernel",
                 "gemv_format", "model", "scheme", "rotation", "block", "proj", "layer", "step", "batch", "N_out",
                 "K_in", "backend")


@dataclass
class CellDiff:
    """One cell that differs: the file (relative path), the row (index and label), the column, both values and
    their relative difference (None for text cells)."""

    file: str
    row: int
    label: str
    column: str
    a: str
    b: str
    rel: float | None

    def line(self) -> str:
        rel = "text differs" if self.rel is None else f"rel diff {self.rel:.3g}"
        return f"{self.file} row {self.row} ({self.label}) {self.column}: {self.a!r} vs {self.b!r} ({rel})"


@dataclass
class Comparison:
    """The result of :func:`compare_folders`: the differing cells, how many cells were compared, the largest
    relative difference of a numeric cell (and where), and notes (files / columns / rows on one side only)."""

    diffs: list[CellDiff] = field(default_factory=list)
    cells: int = 0
    files: int = 0
    max_rel: float = 0.0
    max_rel_at: str = ""
    notes: list[str] = field(default_factory=list)
    row_mismatches: int = 0

    @property
    def ok(self) -> bool:
        return not self.diffs and not self.row_mismatches

    def summary(self, rtol: float, atol: float) -> str:
        where = f" ({self.max_rel_at})" if self.max_rel_at else ""
        return (f"compared {self.cells} cells in {self.files} file(s): {len(self.diffs)} differ beyond rtol={rtol:g}, "
                f"atol={atol:g}; {self.row_mismatches} file(s) with a different row count; largest relative difference "
                f"{self.max_rel:.3g}{where}")


def _float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _number_list(s: str) -> list[float] | None:
    """A JSON list of numbers (``"[88.7, 119.2]"``), else None."""
    import json

    if not s.startswith("["):
        return None
    try:
        v = json.loads(s)
    except ValueError:
        return None
    ok = isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    return [float(x) for x in v] if ok else None


def cells_equal(a: str, b: str, rtol: float = 0.0, atol: float = 0.0) -> tuple[bool, float | None]:
    """Whether two CSV cells agree (numbers within ``atol + rtol * max(|a|, |b|)``, NaN == NaN; text identical) and
    their relative difference ``|a - b| / max(|a|, |b|)`` (0 for equal values, None for text)."""
    fa, fb = _float(a), _float(b)
    if fa is None or fb is None:
        la, lb = _number_list(a), _number_list(b)
        if la is not None and lb is not None and len(la) == len(lb) and la:  # e.g. ppl_values: elementwise
            pairs = [cells_equal(repr(x), repr(y), rtol, atol) for x, y in zip(la, lb)]
            rels = [r for _, r in pairs if r is not None]
            return all(e for e, _ in pairs), (max(rels) if rels else None)
        return a == b, None
    if math.isnan(fa) or math.isnan(fb):
        return math.isnan(fa) and math.isnan(fb), (0.0 if math.isnan(fa) and math.isnan(fb) else math.inf)
    if fa == fb:
        return True, 0.0
    if math.isinf(fa) or math.isinf(fb):
        return False, math.inf
    diff, scale = abs(fa - fb), max(abs(fa), abs(fb))
    return diff <= atol + rtol * scale, diff / scale


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def _label(row: dict[str, str]) -> str:
    parts = [f"{c}={row[c]}" for c in LABEL_COLUMNS if row.get(c) not in (None, "")][:4]
    return ", ".join(parts) or "-"


def compare_csv(a: Path, b: Path, name: str, out: Comparison, rtol: float = 0.0, atol: float = 0.0) -> None:
    """Compare two CSV files into ``out`` (see the module docstring); ``name`` is how the report names the file."""
    cols_a, rows_a = _read(a)
    cols_b, rows_b = _read(b)
    out.files += 1
    only_a = [c for c in cols_a if c not in cols_b and c not in SKIPPED_COLUMNS]
    only_b = [c for c in cols_b if c not in cols_a and c not in SKIPPED_COLUMNS]
    if only_a or only_b:
        out.notes.append(f"{name}: columns only in A {only_a}, only in B {only_b} (not compared)")
    if len(rows_a) != len(rows_b):
        out.row_mismatches += 1
        n = min(len(rows_a), len(rows_b))
        out.notes.append(f"{name}: {len(rows_a)} rows in A, {len(rows_b)} in B (the first {n} compared by position)")
    cols = [c for c in cols_a if c in cols_b and c not in SKIPPED_COLUMNS]
    for i, (ra, rb) in enumerate(zip(rows_a, rows_b)):
        for c in cols:
            va, vb = ra.get(c) or "", rb.get(c) or ""
            equal, rel = cells_equal(va, vb, rtol, atol)
            out.cells += 1
            if rel is not None and rel > out.max_rel:
                out.max_rel, out.max_rel_at = rel, f"{name} row {i} ({_label(ra)}) {c}"
            if not equal:
                out.diffs.append(CellDiff(name, i, _label(ra), c, va, vb, rel))


def _csv_files(root: Path) -> dict[str, Path]:
    if root.is_file():
        return {root.name: root}
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*.csv")) if p.is_file()}


def compare_folders(a: str | os.PathLike, b: str | os.PathLike, rtol: float = 0.0, atol: float = 0.0) -> Comparison:
    """Compare every CSV cell present in both results folders (or two CSV files); see the module docstring.

    Raises:
        FileNotFoundError: ``a`` or ``b`` does not exist. ValueError: a negative tolerance, or no CSV file in common.
    """
    if rtol < 0 or atol < 0:
        raise ValueError(f"tolerances must be >= 0, got rtol={rtol}, atol={atol}")
    a, b = Path(a), Path(b)
    for p in (a, b):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
    if a.is_file() and b.is_file():
        files_a, files_b = {a.name: a}, {a.name: b}
    else:
        files_a, files_b = _csv_files(a), _csv_files(b)
    common = [k for k in files_a if k in files_b]
    if not common:
        raise ValueError(f"no CSV file in common between {a} ({len(files_a)} CSV files) and {b} ({len(files_b)})")
    out = Comparison()
    for k in sorted(set(files_a) ^ set(files_b)):
        out.notes.append(f"{k}: only in {'A' if k in files_a else 'B'} (not compared)")
    for k in common:
        compare_csv(files_a[k], files_b[k], k, out, rtol, atol)
    return out
