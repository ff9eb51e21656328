"""scripts/ablation_from_rows.py: rows computed by the table command become the ablation's files, nothing recomputed;
rows of two code versions or duplicate (method, seed) pairs are refused."""

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ablation_from_rows", ROOT / "scripts" / "ablation_from_rows.py")
S = importlib.util.module_from_spec(spec)
spec.loader.exec_module(S)


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_rows_are_taken_as_they_are(tmp_path):
    from rcp_lib.experiments.ablation import ABLATION_COLUMNS
    from rcp_lib.stats import order

    qat = [{**{k: "" for k in ABLATION_COLUMNS}, "method": "RCP", "setting": "W2A4KV4", "seed": s, "ppl": v,
            "step0_ppl": 190.0, "git_commit": "abc"} for s, v in enumerate((92.0, 118.0, 88.0))]
    abl = _write(tmp_path / "a" / "ablation.csv", qat)
    ppl = [_write(tmp_path / f"p{s}" / "perplexity.csv",
                  [{"method": m, "setting": st, "seed": s, "ppl": v, "git_commit": "abc", "code_fingerprint": "f1"}
                   for m, st, v in (("QuaRot-GPTQ static", "W2A4KV4", 190.0 + 10 * s), ("FP", "FP", 22.1),
                                    ("QuaRot-GPTQ static", "W4A4KV4", 40.0))])
           for s in range(3)]
    rows, summary = S.build([abl], ppl, ["QuaRot-GPTQ static"])
    got = {(r["method"], r["seed"]): r["ppl"] for r in rows}
    assert got == {**{("RCP", s): v for s, v in enumerate((92.0, 118.0, 88.0))},
                   **{("QuaRot-GPTQ static", s): 190.0 + 10 * s for s in range(3)}}  # W2A4KV4 rows only, as read
    ptq = next(s for s in summary if s["method"] == "QuaRot-GPTQ static")
    assert ptq["vs_RCP"] == order("RCP", [92.0, 118.0, 88.0], "QuaRot-GPTQ static", [190.0, 200.0, 210.0], kind="paired")
    assert ptq["git_commit"] == "abc" and ptq["vs_start"] == ""
    with pytest.raises(SystemExit, match="duplicate"):
        S.build([abl], [ppl[0], ppl[0]], ["QuaRot-GPTQ static"])
    other = _write(tmp_path / "q" / "perplexity.csv", [{"method": "QuaRot-GPTQ static", "setting": "W2A4KV4",
                                                       "seed": 5, "ppl": 1.0, "git_commit": "x", "code_fingerprint": "f2"}])
    with pytest.raises(SystemExit, match="code versions"):
        S.build([abl], [ppl[0], other], ["QuaRot-GPTQ static"])
