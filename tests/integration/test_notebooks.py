"""Notebooks are committed clean, and every one runs end to end with the smoke profile (papermill): its executed
copy shows figures, no progress-bar redraws, and an HTML copy is written next to it."""

import csv
import json
import os
import subprocess
import sys

import pytest

from rcp_lib.experiments.registry import (NOTEBOOKS, SEARCH_NOTEBOOK, SEEDED_NOTEBOOK, TABLES, profile_notebooks,
                                         result_path)
from rcp_lib.profiles import PROFILES
from rcp_lib.paths import cache_dir, figures_dir, notebooks_dir, results_dir, runs_dir

NB_DIR = notebooks_dir()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs(name):
    nb = json.loads((NB_DIR / name).read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{name} has outputs"
    tagged = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "profile" in "".join(tagged[0]["source"])
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert f'X.setup(profile, overrides, notebook="{name}")' in code[1]  # the first cell after the parameters
    assert not any("matplotlib.use(" in c for c in code)  # no backend forced: figures inline
    prose = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert len(prose) >= 3 and any("abstract, arXiv" in "".join(c["source"]) for c in prose)  # the claim, attributed


def _outputs(nb: dict) -> list[dict]:
    return [o for c in nb["cells"] for o in c.get("outputs", [])]


def _text(o: dict) -> str:
    t = o.get("text", "")
    return t if isinstance(t, str) else "".join(t)


def test_all_notebooks_run_with_smoke_profile(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("RCP_PROGRESS_LOG", None)
    main = profile_notebooks(PROFILES["smoke"])  # the main run: every notebook but the seeded ablation's and the search's
    assert not {SEEDED_NOTEBOOK, SEARCH_NOTEBOOK} & set(main) and set(main) | {SEEDED_NOTEBOOK, SEARCH_NOTEBOOK} == set(NOTEBOOKS)
    r = subprocess.run([sys.executable, "-m", "rcp_lib", "reproduce", "--profile", "smoke"], env=env,
                       capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    for i, name in enumerate(main):  # per-notebook progress on the terminal, with the time left
        assert f"({i + 1}/{len(main)}) {name} ..." in r.stderr and f"({i + 1}/{len(main)}) {name} done" in r.stderr
    assert "[rcp_lib cache]" in r.stderr  # the kernels' log reaches the terminal
    # the notebooks run only when named: the seeded ablation (the ablation profile's run) on the smoke budget, one
    # seed, no GSR weight part; the recipe search (hours on the cpu profile) at one seed
    r6 = subprocess.run([sys.executable, "-m", "rcp_lib", "reproduce", "--profile", "smoke", "--notebooks",
                         SEEDED_NOTEBOOK, SEARCH_NOTEBOOK], env=env, capture_output=True, text=True, timeout=900)
    assert r6.returncode == 0, r6.stderr[-3000:]
    assert "[search 3/3] qat_tokens" in (runs_dir("smoke") / SEARCH_NOTEBOOK).read_text()  # every search ran
    for name in NOTEBOOKS:
        path = runs_dir("smoke") / name
        executed = json.loads(path.read_text())
        outs = _outputs(executed)
        assert not [o for o in outs if o.get("output_type") == "error"], name
        assert any("image/png" in o.get("data", {}) for o in outs), f"{name}: no inline figure"
        streams = [o for o in outs if o.get("output_type") == "stream"]
        assert not [o for o in streams if o.get("name") == "stderr"], f"{name}: stderr in the executed copy"
        text = "".join(_text(o) for o in streams)
        assert "\r" not in text and "it/s]" not in text and "[rcp_lib cache]" not in text, name  # no bar redraws
        shown = "".join("".join(o.get("data", {}).get("text/plain", "")) for o in outs)
        assert "it/s]" not in shown, f"{name}: a progress bar displayed as output"  # transformers' "Loading weights"
        assert "expected run time" in text, name  # the first cell says what to expect
        assert path.stat().st_size < 2_000_000, f"{name}: {path.stat().st_size} bytes"
        html = path.with_suffix(".html")
        assert html.exists() and "<html" in html.read_text()[:2000].lower(), name
    timing = json.loads(result_path("reproduce_timing", "smoke").read_text())
    assert set(timing["notebooks"]) == set(main) and set(timing["rows"]) == set(main)  # the 06 run alone: not a full run
    assert any(name in v for v in timing["measured"].values() for name in main)
    smoke = [t for t in TABLES.values() if t.smoke]  # what a smoke run writes, from the table registry
    for t in smoke:
        assert result_path(t.name, "smoke").stat().st_size > 100, t.file
        if t.file.endswith(".csv"):  # every row carries the code and commit that computed it
            rows = list(csv.DictReader(result_path(t.name, "smoke").open()))
            assert rows and all(r.get("git_commit") and r.get("code_fingerprint") for r in rows), t.file
        for stem in t.figures:
            assert (figures_dir("smoke") / f"{stem}.png").exists(), stem
    # a finished QAT student keeps student.pt and drops its checkpoint (optimizer state, ~2.3x the student on disk)
    from rcp_lib.experiments import all_methods
    from rcp_lib.experiments.rows import qat_key
    from rcp_lib.profiles import get_profile

    smoke_p = get_profile("smoke")
    dirs = [cache_dir() / "qat" / qat_key(m, smoke_p) for m in all_methods(smoke_p) if m.recipe(smoke_p).qat]
    assert dirs and all((d / "student.pt").exists() and not (d / "checkpoint").exists() for d in dirs), dirs


def test_papermill_overrides_json_string_write_to_their_own_folder(tmp_path):
    """The papermill convention of docs/reproducing.md: ``-p overrides '<JSON>'``; the run writes to
    ``<profile>-<hash>/`` and leaves the unmodified profile's results untouched."""
    cpu = results_dir("smoke")  # the unmodified profile's folder (smoke: the 4-layer model, seconds, not a minute)
    before = {p.name: p.stat().st_mtime_ns for p in cpu.iterdir()} if cpu.exists() else {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RCP_ALLOW_DIRTY="1",
               RCP_RESULTS_DIR=str(tmp_path / "results"), RCP_FIGURES_DIR=str(tmp_path / "figures"))
    env.pop("RCP_PROGRESS_LOG", None)
    out = tmp_path / "out.ipynb"
    r = subprocess.run([sys.executable, "-m", "papermill", str(NB_DIR / "04_memory.ipynb"), str(out),
                        "-p", "profile", "smoke", "-p", "overrides", '{"qat_steps": 80}', "--cwd", str(NB_DIR)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    written = [p for p in (tmp_path / "results").iterdir()]
    assert [p.name for p in written] != ["smoke"] and len(written) == 1 and written[0].name.startswith("smoke-")
    import pandas as pd

    rows = pd.read_csv(written[0] / "memory.csv")
    assert set(rows.run_name) == {written[0].name} and set(rows.overrides) == {'{"qat_steps": 80}'}
    assert (tmp_path / "figures" / written[0].name / "memory.png").exists()
    after = {p.name: p.stat().st_mtime_ns for p in cpu.iterdir()} if cpu.exists() else {}
    assert after == before
