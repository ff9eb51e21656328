"""benchmarks/kernel_bound.py: the byte count is the measured run's own, the fit recovers a known line, and the floor
of a worked example equals numbers computed by hand."""

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


def test_bytes_are_what_the_benchmark_counted():
    """bench_kernel.py counted the select path's bytes from its tensors' nbytes; call_bytes is a formula."""
    kb = _kb()
    rows = [r for r in csv.DictReader((REPO / "results" / "gpu" / "kernel_speed.csv").open())
            if r["bench"] == "linear" and r["method"] == "w2a4_matmul"]
    assert len(rows) >= 6
    for r in rows:
        N, K, B = int(r["N_out"]), int(r["K_in"]), int(r["batch"])
        assert kb.call_bytes("gemv", N, K, B, int(r["group_size"])) == int(r["bytes_moved"]), (N, K, B)
    # by hand, N = 64, K = 256, B = 2, G = 128: weights 4096, LUT 64·2·8 = 1024, row sums 256, scale / zero 16,
    # output 256; activations 512 codes, 2·4·8 words of 4 bytes = 256 as planes, 1024 as fp16
    assert [kb.call_bytes(k, 64, 256, 2, 128, q) for k, q in (("gemv", False), ("bitplane", False), ("bitplane", True))] \
        == [6160, 5904, 6672]


def test_fit_recovers_a_line():
    kb = _kb()
    fixed, bw = kb.fit_fixed_and_bandwidth([(b, 8.0 + b / 2000.0) for b in (1e6, 3e6, 9e6)])
    assert fixed == pytest.approx(8.0, abs=1e-9) and bw == pytest.approx(2000.0, rel=1e-9)
    with pytest.raises(ValueError, match="two sizes"):
        kb.fit_fixed_and_bandwidth([(1e6, 9.0), (1e6, 9.5)])


def test_floor_of_a_worked_example():
    """4096 x 4096 at batch 1, G 128, bit planes, 64 issue slots per weight on an H100: 33,554,432 warp instructions
    over 132 · 4 · 1980 per µs = 32.096 µs of issue; 5,269,512 bytes at a 2000 GB/s copy peak = 2.635 µs; fp16 rows
    at 10 µs + bytes / (2e6 bytes per µs): fixed 10 µs, fp16's 4096² time 26.5 µs."""
    kb = _kb()
    speed = [{"bench": "linear", "method": "fp16_cublas", "gpu": "NVIDIA H100 80GB HBM3", "N_out": str(n), "K_in": "4096",
              "batch": "1", "bytes_moved": str(b), "median_us": str(10.0 + b / 2e6), "peak_copy_GBps": "2000"}
             for n, b in ((4096, 33_000_000), (8192, 66_000_000))]
    sass = [{"kernel": "bitplane", "quant_in": "False", "G": "128", "BLOCK_B": "1", "BLOCK_N": "64", "GPI": "1",
             "NUM_STAGES": "1", "num_warps": "4", "instr_per_weight": "64.0"}]
    r = kb.bound_rows(sass, speed)[0]
    assert (r["N"], r["bytes"]) == (4096, 5_269_512)
    assert r["issue_us"] == pytest.approx(32.096, abs=1e-3) and r["mem_us"] == pytest.approx(2.635, abs=1e-3)
    assert r["floor_us"] == r["issue_us"] and r["limited_by"] == "issue" and r["kind"].startswith("bound")
    assert r["fp16_fixed_us"] == pytest.approx(10.0, abs=1e-6)
    assert r["ceiling_speedup_vs_fp16"] == pytest.approx(26.5 / (10.0 + 32.096), abs=1e-3)


def test_inputs_from_a_report_folder(tmp_path, capsys):
    """--sass / --speed read a gpu-report folder's two files instead of the registry's; a missing one is named, and
    nothing is written."""
    kb = _kb()
    missing = tmp_path / "kernel_sass.csv"
    assert kb.main(["--sass", str(missing), "--print-only"]) == 2
    assert str(missing) in capsys.readouterr().err
    sass, speed = REPO / "results" / "kernel" / "kernel_sass.csv", REPO / "results" / "gpu" / "kernel_speed.csv"
    assert kb.main(["--sass", str(sass), "--speed", str(speed), "--print-only"]) == 0
    assert "floor" in capsys.readouterr().out
