"""The table registry, the output roots and the notebook setup (fast; no model is loaded)."""

import ast
import json
import os
import subprocess
import sys

import pytest

from rcp_lib import paths
from rcp_lib.experiments.registry import NOTEBOOKS, TABLES, result_path, table_for_file


def _notebook_calls(name: str, func: str) -> list[str]:
    """First string arguments of the calls ``X.<func>(...)`` in the code cells of a notebook (positional
    argument 3 for write_rows, 1 for result_path)."""
    nb = json.loads((paths.notebooks_dir() / name).read_text())
    tree = ast.parse("\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"))
    pos = {"write_rows": 2, "result_path": 0}[func]
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == func:
            arg = n.args[pos]
            assert isinstance(arg, ast.Constant), f"{name}: {func} with a computed table name"
            out.append(arg.value)
    return out


def test_registry_lists_every_notebook_and_every_table_they_write():
    assert NOTEBOOKS == tuple(sorted(p.name for p in paths.notebooks_dir().glob("*.ipynb")))
    for nb in NOTEBOOKS:
        names = _notebook_calls(nb, "write_rows") + _notebook_calls(nb, "result_path")
        assert names, nb
        for n in names:
            assert n in TABLES and TABLES[n].notebook == nb, (nb, n)
    for t in TABLES.values():
        assert (t.notebook is None) != (t.command is None), t.name  # a notebook or a command writes it
        assert t.per_profile or not t.smoke
        if t.rows:
            import rcp_lib.experiments as X

            assert callable(getattr(X, t.rows)), t.rows


def test_file_lookups():
    assert result_path("perplexity", "cpu") == paths.results_root() / "cpu" / "perplexity.csv"
    assert result_path("kernel_speed") == paths.results_root() / "gpu" / "kernel_speed.csv"
    with pytest.raises(ValueError, match="family"):
        result_path("perplexity_qat", "cpu")
    assert table_for_file("perplexity_qat_160.csv").name == "perplexity_qat"
    assert table_for_file("perplexity_ptq.csv").name == "perplexity_ptq"
    assert table_for_file("perplexity.csv").name == "perplexity"
    assert table_for_file("nothing.csv") is None


def test_report_reads_only_registered_readme_files():
    from rcp_lib import report

    assert report._file("perplexity") == "perplexity.csv"
    with pytest.raises(KeyError, match="readme=True"):
        report._file("kernel_correctness")


def test_output_roots_follow_the_environment(monkeypatch, tmp_path):
    assert paths.in_checkout() and paths.results_root() == paths.REPO_ROOT / "results"
    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path / "r"))
    monkeypatch.setenv(paths.FIGURES_ENV, str(tmp_path / "f"))
    monkeypatch.setenv(paths.RUNS_ENV, "relative-runs")
    assert paths.results_dir("cpu") == tmp_path / "r" / "cpu" and not (tmp_path / "r").exists()
    assert paths.figures_dir("cpu") == tmp_path / "f" / "cpu" and (tmp_path / "f" / "cpu").is_dir()
    assert paths.is_under_results(tmp_path / "r" / "cpu" / "x.csv")
    assert not paths.is_under_results(paths.REPO_ROOT / "results" / "cpu" / "x.csv")
    monkeypatch.chdir(tmp_path)
    paths.absolutize_env()
    assert os.environ[paths.RUNS_ENV] == str(tmp_path / "relative-runs")


def test_no_default_output_root_outside_a_checkout(monkeypatch, tmp_path):
    """An installed package (no pyproject.toml and notebooks/ next to it) never writes next to site-packages."""
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)
    for env in (paths.RESULTS_ENV, paths.FIGURES_ENV, paths.RUNS_ENV):
        monkeypatch.delenv(env, raising=False)
    assert not paths.in_checkout()
    with pytest.raises(paths.OutputRootError, match="RCP_RESULTS_DIR"):
        paths.results_root()
    with pytest.raises(paths.OutputRootError, match="RCP_FIGURES_DIR"):
        paths.figures_dir("cpu")
    assert not paths.is_under_results(tmp_path / "results" / "x.csv")
    monkeypatch.setenv(paths.RESULTS_ENV, str(tmp_path / "out"))
    assert paths.results_dir("cpu") == tmp_path / "out" / "cpu"


def test_setup_does_what_the_first_cell_did(monkeypatch, tmp_path, capsys):
    import torch

    from rcp_lib import experiments as X

    monkeypatch.setenv(paths.FIGURES_ENV, str(tmp_path))
    P, fig = X.setup("smoke", '{"seed": 5, "qat_steps": 3}')  # papermill -p overrides: a JSON string
    assert (P.name, P.seed, P.qat_steps) == ("smoke", 5, 3) and P.overrides == {"qat_steps": 3, "seed": 5}
    # overrides never write into the unmodified profile's folder
    assert P.run_name.startswith("smoke-") and fig == tmp_path / P.run_name and fig.is_dir()
    assert not (tmp_path / "smoke").exists()
    assert torch.initial_seed() == 5
    assert os.environ["HF_HUB_OFFLINE"] and os.environ["HF_DATASETS_OFFLINE"]
    assert "profile 'smoke' with overrides" in capsys.readouterr().out
    P0, fig0 = X.setup("smoke", None, show=False)
    assert P0.seed == 0 and P0.run_name == "smoke" and fig0 == tmp_path / "smoke" and capsys.readouterr().out == ""
    with pytest.raises(ValueError, match="JSON object"):
        X.setup("smoke", "{qat_steps: 3", show=False)


@pytest.mark.heavy
def test_importing_experiments_imports_transformers_for_registration_only():
    """Importing rcp_lib registers its transformers classes explicitly (rcp_lib.deploy.hf), so transformers is imported; the
    data and plotting libraries are not (datasets reads its offline flag on import: reproduce sets it first)."""
    code = ("import sys, rcp_lib.experiments; "
            "print([m for m in ('transformers', 'datasets', 'matplotlib.pyplot') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(paths.REPO_ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['transformers']"
