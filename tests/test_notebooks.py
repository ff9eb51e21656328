"""Notebooks are committed clean, and every one runs end to end with the smoke profile (papermill)."""

import json
import os
import subprocess
import sys

import pytest

from rcp_lib.experiments.registry import NOTEBOOKS, TABLES, result_path
from rcp_lib.paths import figures_dir, notebooks_dir, runs_dir

NB_DIR = notebooks_dir()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = json.loads((NB_DIR / name).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{name} has outputs"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "profile" in "".join(tagged[0]["source"])


def test_all_notebooks_run_with_smoke_profile(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "rcp_lib", "reproduce", "--profile", "smoke"], env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in NOTEBOOKS:
        executed = json.loads((runs_dir("smoke") / name).read_text())
        errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, name
    smoke = [t for t in TABLES.values() if t.smoke]  # what a smoke run writes, from the table registry
    for t in smoke:
        assert result_path(t.name, "smoke").stat().st_size > 100, t.file
        for stem in t.figures:
            assert (figures_dir("smoke") / f"{stem}.png").exists(), stem
