"""``make gpu-report`` (benchmarks/gpu_report.py) on the CPU: the refusal without CUDA, the sections and their order,
the budget logic, the orchestration with stand-in sections, and how bench_kernel records a tree without .git.
No GPU body runs here (benchmarks/gpu_sections.py needs CUDA)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gr():
    return _load("gpu_report")


@pytest.fixture(scope="module")
def bk():
    return _load("bench_kernel")


@pytest.mark.heavy
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_refuses_without_cuda_and_writes_nothing(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "from_env")}
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_report.py"), "--out", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["gpu-report: needs a CUDA GPU; nothing run, nothing written"]
    assert not (tmp_path / "x").exists()
    # the make target, with OUT from the environment: the same line and status, nothing written
    r = subprocess.run(["make", "-s", "--no-print-directory", "gpu-report", f"GPU_PY={sys.executable}"], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "gpu-report: needs a CUDA GPU" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_sections_in_order_of_value(gr):
    assert gr.SECTION_NAMES == ("warmup", "export", "kernel", "bench", "peers", "ncu", "qat")
    assert gr.BUDGET_S == 480
    by = {s.name: s for s in gr.SECTIONS}
    assert [s.name for s in gr.SECTIONS if s.background] == ["warmup"]  # overlaps export, which times nothing
    assert by["bench"].outputs == ("kernel_speed.csv", "tuned.json") and by["peers"].outputs == ("peers.json",)
    for s in gr.SECTIONS:
        assert 0 < s.min_s <= s.limit_s < gr.BUDGET_S
    # --list prints the plan without a GPU and writes nothing
    lines = gr.describe(gr.SECTIONS, 480)
    assert "480 s" in lines[0] and len(lines) == len(gr.SECTIONS) + 2


def test_budget_decides_what_fits(gr):
    by = {s.name: s for s in gr.SECTIONS}
    bench = by["bench"]
    assert gr.decide(bench, 0, 480) == (True, float(bench.limit_s), "")
    run, limit, _ = gr.decide(bench, 480 - bench.min_s, 480)  # exactly its minimum left: runs, cut to what is left
    assert run and limit == bench.min_s
    run, limit, reason = gr.decide(bench, 480 - bench.min_s + 1, 480)
    assert not run and limit == 0 and reason.startswith("skipped: needs 100 s")
    assert not gr.decide(by["qat"], 500, 480)[0]  # past the budget
    # the worst case (every section uses its whole limit): warm-up beside export, then kernel and bench; the rest is cut
    worst = gr.plan(gr.SECTIONS, 480)
    assert [n for n, run, _, _ in worst if run] == ["warmup", "export", "kernel", "bench"]
    assert all(lim <= 480 for _, _, lim, _ in worst)
    # a typical visit: everything runs, QAT with the time that is left
    typical = {"warmup": 90, "export": 60, "kernel": 50, "bench": 120, "peers": 90, "ncu": 40}
    got = gr.plan(gr.SECTIONS, 480, typical)
    assert all(run for _, run, _, _ in got)
    assert got[-1][2] == 480 - (90 + 50 + 120 + 90 + 40)  # qat: 90 s left (warm-up and export overlap)
    # only export runs beside the warm-up: a timed section waits for it
    assert gr.plan((by["warmup"], by["kernel"]), 200, {"warmup": 100})[1] == ("kernel", True, 100.0, "")
    # a shorter budget drops the later sections first
    assert [n for n, run, _, _ in gr.plan(gr.SECTIONS, 360, typical) if not run] == ["ncu", "qat"]
    # what is cut inside sections when time is short
    assert gr.bench_layers(300) == 8 and gr.bench_layers(200) == 4
    assert gr.peers_rotating(250) and not gr.peers_rotating(150)
    assert gr.warm_workers(16) == 12 and gr.warm_workers(15) == 12 and gr.warm_workers(2) == 1
    assert gr.warm_workers(None) == 1
    assert gr.default_out().parent == REPO / "results" / "gpu" and gr.default_out().name.startswith("report-")


def test_orchestration_with_stand_in_sections(gr, tmp_path, monkeypatch):
    """The runner on the CPU, each section a tiny Python process: a failure, a timeout and a skip each move on to
    the next section; log.txt, env.json and sections.json are written; ncu is skipped when not found."""
    S = gr.Section
    sections = (S("warmup", 5, 1, ("warmup.json",), "bg", beside=("export",)), S("export", 5, 1, ("e.json",), "ok"),
                S("kernel", 1, 1, (), "hangs"), S("bench", 5, 1, (), "fails"), S("peers", 5, 1000, (), "too long"),
                S("ncu", 5, 1, (), "no ncu"), S("qat", 5, 1, (), "ok"))
    code = {"warmup": "pass", "export": "open(r'%s', 'w').write('{}')" % (tmp_path / "out" / "e.json"),
            "kernel": "import time; time.sleep(30)", "bench": "raise SystemExit(3)", "qat": "print('qat ran')"}
    monkeypatch.setattr(gr, "SECTIONS", sections)
    monkeypatch.setattr(gr, "_commands", lambda name, out, left, env: [(name, [sys.executable, "-c", code[name]])])
    monkeypatch.setattr(gr, "_environment", lambda out, log, env: {"ncu": None})
    monkeypatch.setattr(gr, "_gemlite", lambda env, log: "skipped: wheel missing")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    out = tmp_path / "out"
    assert gr.main(["--out", str(out), "--budget", "60"]) == 1  # kernel timed out, bench failed
    st = json.loads((out / "sections.json").read_text())["sections"]
    assert [st[n]["status"] for n in ("warmup", "export", "qat")] == ["ok", "ok", "ok"]
    assert st["kernel"]["status"] == "timed out after 1 s" and st["bench"]["status"] == "failed (exit 3)"
    assert st["peers"]["status"].startswith("skipped: needs 1000 s") and st["ncu"]["status"] == "skipped: ncu not found"
    assert st["export"]["files"] == ["e.json"]
    log = (out / "log.txt").read_text()
    assert "total budget 60 s" in log and "[qat] qat ran" in log and "gemlite: skipped: wheel missing" in log
    assert json.loads((out / "env.json").read_text())["gemlite_status"] == "skipped: wheel missing"


def test_autotune_choices_from_triton_disk_cache(tmp_path):
    """tuned.json lists what triton's autotuner cached on disk (``cache_results=True``): the fastest configuration."""
    gs = _load("gpu_sections")
    d = tmp_path / "cache" / "3f2a"
    d.mkdir(parents=True)
    fast, slow = {"kwargs": {"BLOCK_N": 64}, "num_warps": 4}, {"kwargs": {"BLOCK_N": 16}, "num_warps": 1}
    timings = [[slow, [0.02, 0.019, 0.021]], [fast, [0.01, 0.009, 0.011]]]
    (d / "_w2a4_gemv_kernel.autotune.json").write_text(json.dumps({"key": [4096, 4096, 1, "torch.float16"],
                                                                   "configs_timings": timings}))
    (d / "broken.autotune.json").write_text("{")
    got = gs.autotune_choices(tmp_path / "cache")
    assert len(got) == 2 and any(g.get("file", "").endswith("broken.autotune.json") and "error" in g for g in got)
    assert next(g for g in got if "kernel" in g) == {"kernel": "_w2a4_gemv_kernel", "key": [4096, 4096, 1, "torch.float16"],
                                                     "best": fast, "best_ms": [0.01, 0.009, 0.011], "candidates": 2}


def test_tree_without_git_is_recorded_by_content(bk, tmp_path):
    """A device copy has no .git: bench_kernel identifies it by a hash of its source files instead of refusing."""
    def tree(root: Path, body: str = "x = 1\n") -> Path:
        for rel, text in {"rcp_lib/a.py": body, "kernels/k.py": "k = 2\n", "benchmarks/b.py": "b = 3\n",
                          "configs/c.yaml": "c: 4\n", "pyproject.toml": "[project]\n", "notes.txt": "not source\n",
                          "rcp_lib/__pycache__/a.cpython-311.pyc": "bytes", "results/r.csv": "a,b\n"}.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return root

    a = tree(tmp_path / "a")
    prov = bk.tree_provenance(a)
    assert prov["tree_state"] == "no-git" and prov["tree_commit"] == ""
    assert prov["tree_id"] == f"content:{prov['source_hash']}" and len(prov["source_hash"]) == 16
    assert bk.source_files(a) == ["benchmarks/b.py", "configs/c.yaml", "kernels/k.py", "pyproject.toml", "rcp_lib/a.py"]
    assert bk.tree_provenance(tree(tmp_path / "b"))["source_hash"] == prov["source_hash"]  # same content, same id
    (a / "notes.txt").write_text("changed\n")
    (a / "results" / "r.csv").write_text("changed\n")
    assert bk.source_hash(a) == prov["source_hash"]  # outputs and other files do not count
    (a / "rcp_lib" / "a.py").write_text("x = 2\n")
    assert bk.source_hash(a) != prov["source_hash"]


def test_content_recorded_tree_writes_under_results(bk, tmp_path, monkeypatch):
    """The dirty-tree guard still refuses a clean-recorded write from a dirty checkout, but a tree recorded by its
    content (dirty, or no .git) writes its rows, and the allowance does not outlive the write."""
    import rcp_lib.io as rio

    monkeypatch.delenv(rio.ALLOW_DIRTY_ENV, raising=False)
    monkeypatch.setenv("RCP_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setattr(rio, "dirty_files", lambda repo=None: ["kernels/triton_w2a4.py"])
    path = tmp_path / "results" / "gpu" / "kernel_speed.csv"
    with pytest.raises(rio.DirtyTreeError):
        bk.write_result([{"a": 1}], path, {"tree_state": "clean"})
    assert bk.write_result([{"a": 1}], path, {"tree_state": "dirty"}) == path and path.read_text() == "a\n1\n"
    assert bk.write_result({"b": 2}, path.with_suffix(".json"), {"tree_state": "no-git"}).exists()
    assert rio.ALLOW_DIRTY_ENV not in os.environ


def test_warmup_counts_sass_with_the_devices_triton(gr, tmp_path):
    """Beside the compile workers, the warm-up runs kernel_sass.py into the report folder, so that the static counts
    of a visit are its device's Triton's (kernel_bound.py --sass takes them)."""
    cmds = dict(gr._commands("warmup", tmp_path, 480.0, {}))
    assert cmds["sass"][1:] == [str(REPO / "benchmarks" / "kernel_sass.py"), "--out", str(tmp_path / "kernel_sass.csv")]
    assert len([t for t in cmds if t.startswith("warm")]) == gr.warm_workers(os.cpu_count())
    assert "kernel_sass.csv" in {s.name: s for s in gr.SECTIONS}["warmup"].outputs
