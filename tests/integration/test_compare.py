"""``python -m rcp_lib compare``: every CSV cell of two results folders, numbers by tolerance, text exactly, provenance
and timings skipped (issue 6: results are bit-identical per CPU type only, so a rerun elsewhere needs a tolerance)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rcp_lib.compare import SKIPPED_COLUMNS, cells_equal, compare_folders
from rcp_lib.io import PROVENANCE_KEYS

ROOT = Path(__file__).resolve().parents[2]
HEADER = ["method", "setting", "ppl", "config", "seconds", "git_commit", "cpu_model", "date_utc"]


def _write(path: Path, rows: list[list], header=HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _rows(ppl_rcp=88.77137385765371, config='{"ptq": "none"}', commit="aaa", cpu="AMD EPYC", seconds=230.8):
    return [["FP", "FP", 22.134537, "{}", 26.2, commit, cpu, "2026-11-27T10:32:30+00:00"],
            ["RCP", "W2A4KV4", ppl_rcp, config, seconds, commit, cpu, "2026-11-27T11:00:00+00:00"]]


def test_cells_equal():
    assert cells_equal("1.5", "1.5") == (True, 0.0)
    assert cells_equal("22.134537", "22.134350", rtol=1e-5)[0]
    ok, rel = cells_equal("22.134537", "22.134350")
    assert not ok and rel == pytest.approx(8.45e-6, rel=1e-2)
    assert cells_equal("nan", "nan") == (True, 0.0) and not cells_equal("nan", "1")[0]
    assert cells_equal("0", "1e-9", atol=1e-8)[0] and not cells_equal("0", "1e-9")[0]
    assert cells_equal("True", "True") == (True, None) and cells_equal("RCP", "rcp") == (False, None)
    assert cells_equal("", "") == (True, None) and not cells_equal("", "0")[0]


def test_identical_folders_agree_and_provenance_and_timings_are_skipped(tmp_path):
    _write(tmp_path / "a" / "cpu" / "perplexity.csv", _rows())
    _write(tmp_path / "b" / "cpu" / "perplexity.csv", _rows(commit="bbb", cpu="Intel Xeon", seconds=99.0))
    r = compare_folders(tmp_path / "a", tmp_path / "b")
    assert r.ok and not r.diffs and r.files == 1
    assert r.cells == 2 * 4  # method, setting, ppl, config: seconds, git_commit, cpu_model, date_utc skipped
    assert set(PROVENANCE_KEYS) <= SKIPPED_COLUMNS and "seconds" in SKIPPED_COLUMNS


def test_every_differing_cell_is_reported(tmp_path):
    _write(tmp_path / "a" / "t.csv", _rows())
    _write(tmp_path / "b" / "t.csv", _rows(ppl_rcp=86.99, config='{"ptq": "gptq"}'))
    r = compare_folders(tmp_path / "a", tmp_path / "b", rtol=1e-4)
    assert [(d.file, d.row, d.column) for d in r.diffs] == [("t.csv", 1, "ppl"), ("t.csv", 1, "config")]
    ppl = r.diffs[0]
    assert ppl.label == "method=RCP, setting=W2A4KV4"
    assert ppl.rel == pytest.approx((88.77137385765371 - 86.99) / 88.77137385765371)
    assert "t.csv row 1 (method=RCP, setting=W2A4KV4) ppl: '88.77137385765371' vs '86.99'" in ppl.line()
    assert r.diffs[1].rel is None and "text differs" in r.diffs[1].line()
    assert not r.ok and "2 differ" in r.summary(1e-4, 0)
    assert compare_folders(tmp_path / "a", tmp_path / "b", rtol=0.03).diffs == [r.diffs[1]]  # 2 % is within 3 %


def test_rows_and_files_on_one_side(tmp_path):
    _write(tmp_path / "a" / "t.csv", _rows())
    _write(tmp_path / "b" / "t.csv", _rows()[:1])
    _write(tmp_path / "a" / "only_a.csv", _rows())
    r = compare_folders(tmp_path / "a", tmp_path / "b")
    assert not r.ok and r.row_mismatches == 1 and not r.diffs
    assert any("2 rows in A, 1 in B" in n for n in r.notes) and any("only_a.csv: only in A" in n for n in r.notes)
    with pytest.raises(ValueError, match="no CSV file in common"):
        compare_folders(tmp_path / "a", tmp_path)
    with pytest.raises(FileNotFoundError):
        compare_folders(tmp_path / "a", tmp_path / "nope")


def test_cli_exit_status_and_lines(tmp_path, capsys):
    from rcp_lib.__main__ import main

    _write(tmp_path / "a" / "t.csv", _rows())
    _write(tmp_path / "b" / "t.csv", _rows(ppl_rcp=88.77137385765371 * (1 + 3e-5)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "rcp_lib", "compare", str(tmp_path / "a"), str(tmp_path / "b")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr  # default: bit-identical
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("t.csv row 1 (method=RCP, setting=W2A4KV4) ppl:") and "rel diff 3e-05" in lines[0]
    assert lines[-1].startswith("compared 8 cells in 1 file(s): 1 differ beyond rtol=0")
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--rtol", "1e-4"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "compared 8 cells in 1 file(s): 0 differ beyond rtol=0.0001, atol=0; 0 file(s) with a different row count; "
        "largest relative difference 3e-05 (t.csv row 1 (method=RCP, setting=W2A4KV4) ppl)"]


def test_lists_of_numbers_compare_elementwise_by_tolerance():
    from rcp_lib.compare import cells_equal

    assert cells_equal("[100.0, 200.0]", "[100.001, 200.0]", rtol=1e-4) == (True, pytest.approx(1e-5, rel=1e-3))
    assert cells_equal("[100.0, 200.0]", "[101.0, 200.0]", rtol=1e-4)[0] is False
    assert cells_equal("[1, 2]", "[1, 2, 3]") == (False, None)  # different lengths: text
    assert cells_equal('["a"]', '["a"]') == (True, None)
