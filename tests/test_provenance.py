"""Caches and results must not outlive the code that produced them (fast; no model is loaded)."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import pytest

from rcp_lib import io as rio
from rcp_lib.paths import RESULTS_ENV


# ------------------------------------------------------------------ code fingerprint


def _copy_tree(tmp_path: Path) -> dict[str, Path]:
    roots = {}
    for prefix, src in rio.source_roots().items():
        dst = tmp_path / prefix
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        roots[prefix] = dst
    return roots


def test_fingerprint_covers_code_and_configs(tmp_path):
    roots = _copy_tree(tmp_path)
    assert set(roots) == {"rcp_lib", "kernels", "configs"}
    fp = rio.fingerprint_tree(roots)
    assert len(fp) == 12 and fp == rio.fingerprint_tree(roots)
    assert fp == rio.fingerprint_tree(rio.source_roots())  # a copy of the tree hashes like the tree

    py = roots["rcp_lib"] / "quant" / "quantizers.py"
    py.write_text(py.read_text() + "\n# algorithmic change\n")
    fp_py = rio.fingerprint_tree(roots)
    assert fp_py != fp

    (roots["kernels"] / "new_kernel.py").write_text("X = 1\n")
    fp_k = rio.fingerprint_tree(roots)
    assert fp_k != fp_py

    cfg = roots["configs"] / "cpu.yaml"
    cfg.write_text(cfg.read_text() + "\n# changed\n")
    fp_c = rio.fingerprint_tree(roots)
    assert fp_c != fp_k

    (roots["rcp_lib"] / "notes.txt").write_text("not code")  # non-.py files in the package do not count
    (roots["rcp_lib"] / "__pycache__").mkdir(exist_ok=True)
    (roots["rcp_lib"] / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    assert rio.fingerprint_tree(roots) == fp_c

    prof = roots["rcp_lib"] / "profiles.py"  # settings, keyed where they matter: not part of the fingerprint
    prof.write_text(prof.read_text().replace("qat_steps: int = 40", "qat_steps: int = 80"))
    for name in ("report.py", "progress.py"):  # formatting only
        f = roots["rcp_lib"] / name
        f.write_text(f.read_text() + "\n# reworded\n")
    claims = roots["configs"] / "claims.yaml"  # the README's sentences, filled from rows already computed
    claims.write_text(claims.read_text() + "\n# reworded\n")
    assert rio.fingerprint_tree(roots) == fp_c

    py.rename(py.with_name("quantizers2.py"))  # a rename changes it (paths are hashed)
    assert rio.fingerprint_tree(roots) != fp_c


def test_profile_fields_reach_the_cache_keys():
    """profiles.py is outside the fingerprint, so every Profile field must either be in a row's key or be a table
    selection that changes no number; a student's and a PTQ state's keys carry the fields that change them."""
    from dataclasses import fields

    from rcp_lib import experiments as X
    from rcp_lib.experiments.rows import qat_key, row_key, ptq_key
    from rcp_lib.profiles import Profile, get_profile

    selections = {"name", "overrides", "analysis_layers", "analysis_rotations", "zero_shot_tasks", "zero_shot_limit",
                  "settings", "device", "methods", "full_eval_methods", "ablation_seeds", "sweep_val_windows",
                  "qat_ablation_rows", "notebooks", "gsr_weight_groups", "zero_shot_methods", "search_seeds", "search_points",
                  "search_curve_length"}  # which notebooks / GSR groups run
    P = get_profile("cpu")
    rcp, gptq = X.method("RCP", "W2A4KV4"), X.method("QuaRot-GPTQ", "W2A4KV4")
    assert set(row_key(rcp, P)["profile"]) == {f.name for f in fields(Profile)} - selections
    for field, value in (("qat_steps", 41), ("qat_overrides", {"qat": {"lr_quant": 3e-3}}), ("dtype", "bfloat16"),
                         ("seed", 1), ("qat_overrides", {"quant": {"weight": {"clip_init": "const"}}}),
                         ("qat_recipe", "configs/paper-llama2-7b.yaml"), ("calib_windows", 16)):
        Q = get_profile("cpu", **{field: value})
        assert row_key(rcp, Q) != row_key(rcp, P) and qat_key(rcp, Q) != qat_key(rcp, P), field
    for field, value in (("calib_windows", 16), ("dtype", "bfloat16"), ("seed", 1), ("w_group_size", 32)):
        Q = get_profile("cpu", **{field: value})
        assert ptq_key(gptq, Q) != ptq_key(gptq, P), field


def test_code_fingerprint_is_per_process_and_follows_source_roots(tmp_path, monkeypatch):
    roots = _copy_tree(tmp_path)
    monkeypatch.setattr(rio, "source_roots", lambda: roots)
    rio.code_fingerprint.cache_clear()
    try:
        a = rio.code_fingerprint()
        f = roots["rcp_lib"] / "io.py"
        f.write_text(f.read_text() + "\n# edit\n")
        assert rio.code_fingerprint() == a  # cached per process
        rio.code_fingerprint.cache_clear()
        assert rio.code_fingerprint() != a
    finally:
        rio.code_fingerprint.cache_clear()


def test_cache_keys_contain_the_fingerprint(monkeypatch):
    from rcp_lib import experiments as X
    from rcp_lib.io import config_hash
    from rcp_lib.profiles import get_profile

    P = get_profile("smoke")
    m = X.method("RCP", "W2A4KV4")
    monkeypatch.setattr(rio, "code_fingerprint", lambda: "aaaaaaaaaaaa")
    row_a, qat_a = X.row_key(m, P), X.qat_key(m, P)
    assert "aaaaaaaaaaaa" in str(row_a)
    monkeypatch.setattr(rio, "code_fingerprint", lambda: "bbbbbbbbbbbb")
    assert config_hash(X.row_key(m, P)) != config_hash(row_a)
    assert X.qat_key(m, P) != qat_a


def test_cache_keys_contain_the_cpu_type(monkeypatch):
    """A row, a student and a CLI run computed on one CPU type are not read back on another (the CPU type rounds like a
    seed): the same code on an AVX2 and an AVX-512 machine gives other cache names. A CUDA row is keyed by its GPU,
    not by the host's CPU or thread count (students of a multi-node launch are found by the notebooks)."""
    from rcp_lib import experiments as X
    from rcp_lib.io import config_hash, cpu_info, platform_key
    from rcp_lib.profiles import get_profile
    from rcp_lib.run_config import RunConfig

    assert platform_key().split()[:2] == ["cpu", cpu_info()["torch_cpu_capability"] or "?"]
    assert platform_key("cuda:1").startswith("cuda ") and cpu_info()["cpu_flags"] not in platform_key("cuda")
    P = get_profile("smoke")
    m = X.method("RCP", "W2A4KV4")
    monkeypatch.setattr(rio, "code_fingerprint", lambda: "aaaaaaaaaaaa")
    seen = []
    monkeypatch.setattr(rio, "platform_key", lambda device="cpu": seen.append(device) or f"{device} AVX2 avx avx2 fma")
    row_a, qat_a, run_a = config_hash(X.row_key(m, P)), X.qat_key(m, P), RunConfig().key()
    gpu_row = config_hash(X.row_key(m, P.with_overrides(device="cuda")))
    assert seen == ["cpu", "cpu", "cpu", "cuda"]
    monkeypatch.setattr(rio, "platform_key", lambda device="cpu": "cpu AVX512 avx avx2 fma avx512f")
    assert config_hash(X.row_key(m, P)) != row_a
    assert X.qat_key(m, P) != qat_a
    assert RunConfig().key() != run_a
    assert gpu_row != row_a


def test_gptq_and_rotation_keys_contain_the_fingerprint(monkeypatch):
    """The GPTQ and rotation-analysis caches (keys built inline) are keyed by the fingerprint too."""
    from rcp_lib import experiments as X
    from rcp_lib.experiments import rows
    from rcp_lib.profiles import get_profile

    class Stop(Exception):
        pass

    seen: list[dict] = []

    def capture(*parts):
        seen.append(parts[0])
        raise Stop

    monkeypatch.setattr(rio, "code_fingerprint", lambda: "cccccccccccc")
    monkeypatch.setattr(rows, "config_hash", capture)  # every cache name is rows.cache_name
    P = get_profile("smoke")
    with pytest.raises(Stop):
        X._ptq_cached(None, X.method("QuaRot-GPTQ", "W2A4KV4"), P, False)
    with pytest.raises(Stop):
        X.rotation_analysis(P, progress=False)
    assert [k.get("code").split()[0] for k in seen] == ["cccccccccccc"] * 2
    assert not any("rcp_lib" in k for k in seen)  # no longer keyed by the never-changing __version__


def test_row_cache_logs_hit_and_miss(monkeypatch, tmp_path, capsys):
    from rcp_lib import experiments as X

    monkeypatch.setenv("RCP_CACHE", str(tmp_path))
    key = {"method": {"name": "RCP", "setting": "W2A4KV4"}, "code": "x"}
    calls = []
    row = X.cached_row("ppl", key, lambda: calls.append(1) or {"ppl": 1.0})
    assert X.cached_row("ppl", key, lambda: calls.append(1) or {"ppl": 2.0}) == row and calls == [1]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    # a computed row is what a later cached read gives: same values, types and key order (tuple -> list, NaN kept)
    computed = X.cached_row("ppl", {**key, "code": "y"}, lambda: {"z": 1, "a": (1, 2), "n": float("nan")})
    again = X.cached_row("ppl", {**key, "code": "y"}, lambda: {})
    assert list(computed) == list(again) == ["a", "n", "z"] and computed["a"] == again["a"] == [1, 2]
    assert computed["n"] != computed["n"]
    assert err[0].startswith("[rcp_lib cache] miss ppl-") and "(RCP W2A4KV4)" in err[0]
    assert err[1].startswith("[rcp_lib cache] hit ppl-") and "(RCP W2A4KV4)" in err[1]


# ------------------------------------------------------------------ dirty = code or configs, not outputs


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                   cwd=repo, check=True, capture_output=True)


@pytest.fixture()
def git_repo(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    for rel in ("rcp_lib/a.py", "configs/cpu.yaml", "results/cpu/perplexity.csv", "figures/cpu/perplexity.pdf",
                "README.md"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("v1\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    return repo


def test_outputs_do_not_make_the_tree_dirty(git_repo):
    clean = rio.git_commit(git_repo)
    assert len(clean) == 40 and not clean.endswith("+dirty")
    (git_repo / "results/cpu/perplexity.csv").write_text("v2\n")
    (git_repo / "figures/cpu/perplexity.pdf").write_text("v2\n")
    (git_repo / "README.md").write_text("v2\n")  # rewritten by `rcp_lib readme` after a run
    (git_repo / "runs").mkdir()
    (git_repo / "runs/x.ipynb").write_text("{}")
    (git_repo / "rcp_lib/untracked.py").write_text("x = 1\n")
    assert rio.dirty_files(git_repo) == []
    assert rio.git_commit(git_repo) == clean


@pytest.mark.parametrize("rel", ["rcp_lib/a.py", "configs/cpu.yaml"])
def test_code_or_config_change_makes_the_tree_dirty(git_repo, rel):
    (git_repo / rel).write_text("v2\n")
    assert rio.dirty_files(git_repo) == [rel]
    assert rio.git_commit(git_repo).endswith("+dirty")


def test_no_git_checkout_is_not_dirty(tmp_path):
    assert rio.dirty_files(tmp_path) == []
    assert rio.git_commit(tmp_path) in ("unknown",) or not rio.git_commit(tmp_path).endswith("+dirty")


# ------------------------------------------------------------------ refusal to write results from a dirty tree


@pytest.fixture()
def dirty(monkeypatch, tmp_path):
    """A dirty checkout whose results root is tmp_path/results, with dirty runs not allowed."""
    monkeypatch.delenv(rio.ALLOW_DIRTY_ENV, raising=False)
    monkeypatch.setattr(rio, "dirty_files", lambda repo=None: ["rcp_lib/quant/quantizers.py"])
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results"))
    return tmp_path


def test_write_rows_refuses_a_dirty_tree(dirty):
    from rcp_lib import experiments as X
    from rcp_lib.profiles import get_profile

    P = get_profile("smoke")
    with pytest.raises(rio.DirtyTreeError, match=r"uncommitted changes to code or configs \(rcp_lib/quant/"
                                                 r"quantizers\.py\); commit them, or pass --allow-dirty / set "
                                                 r"RCP_ALLOW_DIRTY=1"):
        X.write_rows([{"a": 1}], P, "t")
    assert not (dirty / "results").exists()
    with pytest.raises(rio.DirtyTreeError):  # any atomic write under results/ (e.g. the quickstart JSON)
        rio.atomic_write_json({"a": 1}, dirty / "results" / "smoke" / "quickstart.json")
    rio.atomic_write_json({"a": 1}, dirty / "elsewhere" / "x.json")  # outside results/: not guarded


def test_allow_dirty_env_accepts_and_is_recorded(dirty, monkeypatch):
    from rcp_lib import experiments as X
    from rcp_lib.profiles import get_profile

    monkeypatch.setenv(rio.ALLOW_DIRTY_ENV, "1")
    p = X.write_rows([{"a": 1}], get_profile("smoke"), "t")
    assert p == dirty / "results" / "smoke" / "t.csv"
    (row,) = list(csv.DictReader(p.open()))
    assert (row["a"], row["run_name"], row["overrides"]) == ("1", "smoke", "{}")
    # a row computed here gets this process's provenance, a (cached) row with its own keeps it
    assert row["code_fingerprint"] == rio.code_fingerprint() and row["git_commit"] == rio.git_commit()
    p = X.write_rows([{"a": 1, "git_commit": "abc", "code_fingerprint": "old"}, {"a": 2, "device": "mine"}],
                     get_profile("smoke"), "t")
    rows = list(csv.DictReader(p.open()))
    assert (rows[0]["git_commit"], rows[0]["code_fingerprint"]) == ("abc", "old")
    assert rows[1]["code_fingerprint"] == rio.code_fingerprint() and rows[1]["device"] == "mine"  # its own column wins
    monkeypatch.setattr(rio, "git_commit", lambda repo=None: "0" * 40 + "+dirty")
    prov = rio.provenance()
    assert prov["allow_dirty"] is True and prov["code_fingerprint"] == rio.code_fingerprint()


def test_clean_tree_writes_without_the_flag(monkeypatch, tmp_path):
    from rcp_lib import experiments as X
    from rcp_lib.profiles import get_profile

    monkeypatch.delenv(rio.ALLOW_DIRTY_ENV, raising=False)
    monkeypatch.setattr(rio, "dirty_files", lambda repo=None: [])
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "results"))
    assert X.write_rows([{"a": 1}], get_profile("smoke"), "t").exists()
    monkeypatch.setattr(rio, "git_commit", lambda repo=None: "0" * 40)
    assert rio.provenance()["allow_dirty"] is False


def test_cli_allow_dirty_flag(dirty, monkeypatch, capsys):
    import os

    from rcp_lib import __main__ as M
    from rcp_lib import reproduce as R

    for cmd in ("reproduce", "table"):
        assert M.build_parser().parse_args([cmd, "--allow-dirty"]).allow_dirty
        assert not M.build_parser().parse_args([cmd]).allow_dirty
    ran = []
    monkeypatch.setattr(R, "run_notebook", lambda path, *a, **k: ran.append(path.name) or path)
    assert M.main(["reproduce", "--profile", "smoke", "--notebooks", "04_memory.ipynb"]) == 1
    assert ran == [] and "--allow-dirty" in capsys.readouterr().err
    assert M.main(["table", "--profile", "smoke"]) == 1
    assert "uncommitted changes" in capsys.readouterr().err
    # --no-html: the stub returns the source notebook, whose HTML copy would land in notebooks/
    assert M.main(["reproduce", "--profile", "smoke", "--notebooks", "04_memory.ipynb", "--allow-dirty", "--no-html"]) == 0
    assert ran == ["04_memory.ipynb"] and os.environ[rio.ALLOW_DIRTY_ENV] == "1"  # inherited by the kernels


# ------------------------------------------------------------------ deterministic figures


def test_save_figure_is_byte_identical(tmp_path, monkeypatch):
    """The same figure saved twice, at different (simulated) dates, gives identical bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 3, 2], label="x")
    ax.set_title("perplexity")
    ax.legend()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000000000")  # matplotlib's clock for embedded dates
    a = rio.save_figure(fig, tmp_path / "a", "fig", exts=("png", "pdf", "svg"))
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    b = rio.save_figure(fig, tmp_path / "b", "fig", exts=("png", "pdf", "svg"))
    plt.close(fig)
    assert [p.name for p in a] == ["fig.png", "fig.pdf", "fig.svg"]
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert b"CreationDate" not in a[1].read_bytes()
    assert b"Software" not in a[0].read_bytes()



# ------------------------------------------------------------------ what decides float rounding (issue 6)

AVX512_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni sha_ni
processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse
"""
AVX2_CPUINFO = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 ssse3 fma sse4_1 avx avx2 bmi2\n"
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sve sve2 i8mm bf16\nCPU part\t: 0xd4f\n"


def test_parse_cpuinfo_names_the_vector_extensions():
    assert rio.parse_cpuinfo(AVX512_CPUINFO) == (
        "AMD EPYC 9R14 96-Core Processor", "avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16")
    assert rio.parse_cpuinfo(AVX2_CPUINFO) == ("AMD EPYC", "avx avx2 fma")
    assert rio.parse_cpuinfo(ARM_CPUINFO) == ("", "asimd sve sve2 i8mm bf16")
    assert rio.parse_cpuinfo("") == ("", "")


def test_provenance_records_cpu_threads_and_blas():
    import torch

    prov = rio.provenance()
    assert tuple(prov) == rio.PROVENANCE_KEYS
    assert prov["torch_threads"] == torch.get_num_threads()
    assert prov["cpu_model"] and prov["blas"]  # never empty: "unknown" when nothing could be read
    assert prov["cpu_flags"] == " ".join(f for f in prov["cpu_flags"].split() if f in rio.VECTOR_FLAGS)
    assert prov["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
