"""The README results block is formatted from result rows, and replacing it is idempotent."""

import json

import pandas as pd
import pytest

from rcp_lib.report import BEGIN, END, longer_qat_markdown, ppl_markdown, update_readme, zero_shot_markdown


def _ppl_rows():
    common = {"model": "m", "corpus": "c", "seqlen": 8, "windows": 2, "tokens_scored": 14, "git_commit": "abc",
              "date_utc": "d", "device": "cpu"}
    qat = json.dumps({"qat": {"steps": 3, "batch_size": 1, "grad_accum": 1, "seqlen": 8}})
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
    assert md[4] == "| RCP | qat | 30.25 | – |"


def test_zero_shot_markdown_layout():
    df = pd.DataFrame([
        {"method": "FP", "setting": "FP", "task": "t1", "metric": "acc", "value": 0.5, "stderr": 0.05, "n_examples": 100},
        {"method": "FP", "setting": "FP", "task": "t1", "metric": "acc_norm", "value": 0.6, "stderr": 0.05, "n_examples": 100},
        {"method": "RCP", "setting": "W2A4KV4", "task": "t1", "metric": "acc", "value": 0.25, "stderr": 0.04, "n_examples": 100},
    ])
    md = zero_shot_markdown(df).splitlines()
    assert md[0] == "| method | setting | t1 acc (n=100) |"
    assert md[2:] == ["| FP | FP | 0.500 ± 0.050 |", "| RCP | W2A4KV4 | 0.250 ± 0.040 |"]


def test_update_readme_replaces_block_idempotently(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _ppl_rows().to_csv(res / "perplexity.csv", index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{BEGIN}\n\n## next section\n")
    update_readme("cpu", readme=readme, results=res)
    once = readme.read_text()
    assert once.startswith("intro\n\n" + BEGIN) and once.count(END) == 1 and once.endswith("\n\n## next section\n")
    assert "| RCP | qat | 30.25 | – |" in once and "3 steps" in once and "loss `kl`" in once
    update_readme("cpu", readme=readme, results=res)
    assert readme.read_text() == once


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
    text = update_readme("cpu", readme=readme, results=res).read_text()
    assert "perplexity_qat_12steps.csv" in text and "12 steps × 16 tokens" in text and "| RCP | W2A4KV4 | 3: 30.25 | 12: 25.00 |" in text
