"""Speed of the fast Hadamard transform ``apply_hadamard`` against the dense product ``x @ hadamard(n)``.

python benchmarks/bench_hadamard.py [--sizes 576 4096 11008] [--rows 2048] [--repeats 5] [--json PATH]

For each size, both ways are timed on the same float32 batch ``[rows, n]`` (the dense matrix is built before
timing), interleaved repeat by repeat so that machine load affects both alike; the script prints the median
times, their ratio (the issue's target: at least 5x at n = 4096 on a CPU) and the max abs difference between
the two results. Times are machine- and load-dependent; only ratios from one run should be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from rcp_lib.rotation.hadamard import apply_hadamard, hadamard


def bench(n: int, rows: int, repeats: int, seed: int = 0) -> dict:
    """Median seconds of the dense and the fast transform on ``[rows, n]`` float32, and their agreement."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    H = hadamard(n, dtype=torch.float32)
    dense, fast = [], []
    apply_hadamard(x[:8])  # warm the factor cache
    for _ in range(repeats):
        t = time.perf_counter()
        yd = x @ H
        dense.append(time.perf_counter() - t)
        t = time.perf_counter()
        yf = apply_hadamard(x)
        fast.append(time.perf_counter() - t)
    d, f = statistics.median(dense), statistics.median(fast)
    return {"n": n, "rows": rows, "repeats": repeats, "dense_s": d, "fast_s": f, "speedup": d / f,
            "max_abs_diff": float((yd - yf).abs().max()), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[576, 4096, 11008])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    out = []
    for n in args.sizes:
        r = bench(n, args.rows, args.repeats)
        out.append(r)
        print(f"n={n:6d}  dense {r['dense_s'] * 1e3:9.1f} ms   fast {r['fast_s'] * 1e3:8.1f} ms   "
              f"speed-up {r['speedup']:5.1f}x   max|diff| {r['max_abs_diff']:.1e}", flush=True)
    if args.json:
        from rcp_lib.io import atomic_write_json, provenance

        atomic_write_json({"rows": out, **provenance()}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
