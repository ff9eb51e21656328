"""benchmarks/kernel_bound.py: the byte count is the measured run's own, the fit recovers a known line, and the bound
is a lower bound on every time the H100 run measured."""

import csv
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _kb():
    spec = importlib.util.spec_from_file_location("kernel_bound", REPO / "benchmarks" / "kernel_bound.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _speed() -> list[dict]:
    return list(csv.DictReader((REPO / "results" / "gpu" / "kernel_speed.csv").open()))


def test_bytes_are_what_the_benchmark_counted():
    """bench_kernel.py counted the select path's bytes from its tensors' nbytes; call_bytes is a formula."""
    kb = _kb()
    rows = [r for r in _speed() if r["bench"] == "linear" and r["method"] == "w2a4_matmul"]
    assert len(rows) >= 6
    for r in rows:
        N, K, B = int(r["N_out"]), int(r["K_in"]), int(r["batch"])
        assert kb.call_bytes("gemv", N, K, B, int(r["group_size"])) == int(r["bytes_moved"]), (N, K, B)
    # bit planes: 4 planes of K/32 int32 words per token instead of K uint8 codes
    assert kb.call_bytes("bitplane", 64, 256, 2, 128) - kb.call_bytes("gemv", 64, 256, 2, 128) == 2 * 4 * 8 * 4 - 2 * 256


def test_fit_recovers_a_line():
    kb = _kb()
    fixed, bw = kb.fit_fixed_and_bandwidth([(b, 8.0 + b / 2000.0) for b in (1e6, 3e6, 9e6)])
    assert fixed == pytest.approx(8.0, abs=1e-9) and bw == pytest.approx(2000.0, rel=1e-9)
    with pytest.raises(ValueError, match="two sizes"):
        kb.fit_fixed_and_bandwidth([(1e6, 9.0), (1e6, 9.5)])


def test_bound_by_hand_and_below_every_measurement():
    """One synthetic row worked by hand; then on the committed files: every measured time of the configuration the
    H100 ran is at or above its bound (a lower bound that a measurement beats is wrong)."""
    kb = _kb()
    speed = [{"bench": "linear", "method": "fp16_cublas", "gpu": "NVIDIA H100 80GB HBM3", "N_out": str(n), "K_in": "4096",
              "batch": "1", "bytes_moved": str(b), "median_us": str(10.0 + b / 2e6)}
             for n, b in ((4096, 33_000_000), (8192, 66_000_000))]
    sass = [{"kernel": "bitplane", "quant_in": "False", "G": "128", "BLOCK_B": "1", "BLOCK_N": "64", "GPI": "1",
             "NUM_STAGES": "1", "num_warps": "4", "instr_per_weight": "64.0"}]
    rows = kb.bound_rows(sass, speed)
    assert len(rows) == 2
    r = rows[0]
    issue = 4096 * 4096 * 64.0 / 32 / (132 * 4 * 1.98e3)
    mem = kb.call_bytes("bitplane", 4096, 4096, 1, 128) / 2e6  # 2 TB/s, in bytes per µs
    assert r["issue_us"] == pytest.approx(issue, abs=1e-3) and r["mem_us"] == pytest.approx(mem, abs=1e-3)
    assert r["bound_us"] == pytest.approx(10.0 + max(issue, mem), abs=2e-3) and r["limited_by"] == "issue"
    assert r["measured_us"] is None  # not the configuration the H100 ran
    committed = kb.bound_rows(list(csv.DictReader((REPO / "results" / "kernel" / "kernel_sass.csv").open())), _speed())
    measured = [r for r in committed if r["measured_us"] is not None]
    assert len(measured) >= 6
    assert all(r["measured_us"] >= r["bound_us"] for r in measured), [(r["N"], r["K"], r["batch"]) for r in measured]
