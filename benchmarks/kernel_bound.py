"""A floor under each W2A4 GEMV candidate's own GPU time, from its bytes and static issue slots (no GPU needed; a
bound, not a measurement and not a forecast of what the kernel will reach).

For every kernel configuration of ``results/kernel/kernel_sass.csv`` (static sm_90 counts: ``instr_per_weight``, the
issue slots one weight costs per program's tokens) and every linear shape that ``results/gpu/kernel_speed.csv``
measured at that batch:

    floor_us = max(bytes / copy_peak, warp_instructions / (SMs x 4 schedulers x boost clock))

* ``bytes``: what one call reads and writes (:func:`call_bytes`): the 2-bit weights, the fp16 LUT (four levels per row
  and group), the row sums, the activations as the kernel reads them (uint8 codes, 4 bit planes of int32 words, or
  fp16 for the kernels that quantize their input), their per-token scale and zero, the fp16 output. For the select
  kernel this is the ``bytes_moved`` that ``bench_kernel.py`` recorded (a test holds the two to each other).
* ``copy_peak``: the copy bandwidth the measured run measured on its device (``peak_copy_GBps``), the fastest any
  kernel there moved bytes.
* issue: ``instr_per_weight`` x N x K / 32 warp instructions at most 4 per SM and cycle at the boost clock
  (:data:`DEVICES`, the vendor's figures).

Nothing else is in the floor: no launch or fixed cost, latency, occupancy, split-K epilogue or pre-kernel, and the
counts are the Triton version's that ``kernel_sass.py`` ran (``sass_triton``), not necessarily the device's. So the
floor is below any time the kernel can take on that device. ``ceiling_speedup_vs_fp16`` is fp16's measured time over
(the floor + ``fp16_fixed_us``, the intercept of the line through the run's fp16 rows): an estimate of the most this
GEMV alone could gain over a whole fp16 linear if it paid the same fixed cost, never a measured speed-up.
Usage: ``python benchmarks/kernel_bound.py [--sass CSV] [--speed CSV] [--print-only]`` writes
``results/kernel/kernel_bound.csv`` (the registry's ``kernel_bound``). The inputs default to the registry's
``kernel_sass`` and ``kernel_speed`` files; a ``make gpu-report`` folder holds both from one visit, its
``kernel_sass.csv`` counted with the device's own Triton (``--sass <report>/kernel_sass.csv --speed
<report>/kernel_speed.csv``), so that ``sass_triton`` equals ``measured_triton``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: per device (the name ``torch.cuda.get_device_name`` gives): streaming multiprocessors, warp schedulers per SM (one
#: warp instruction each per cycle) and the boost clock in GHz (NVIDIA's H100 SXM5 figures)
DEVICES = {"NVIDIA H100 80GB HBM3": {"sms": 132, "schedulers": 4, "boost_ghz": 1.98}}
#: weight bits, activation bits and the LUT entries per row and group of the kernels
W_BITS, A_BITS, LEVELS = 2, 4, 4


def call_bytes(kernel: str, N: int, K: int, B: int, G: int, quant_in: bool = False) -> int:
    """Bytes one GEMV call reads and writes: weights ``N·K·2/8``, LUT ``N·(K/G)·4`` fp16, row sums ``N`` fp32,
    activations ``B·K`` fp16 when the kernel quantizes them itself (``quant_in``), else ``B·K`` uint8 codes (select)
    or ``B·4`` bit planes of ``K/32`` int32 words (bitplane), then a scale and a zero per token (fp32), the output
    ``B·N`` fp16."""
    acts = 2 * B * K if quant_in else (B * K if kernel == "gemv" else B * A_BITS * (K // 32) * 4)
    return N * K * W_BITS // 8 + N * (K // G) * LEVELS * 2 + 4 * N + acts + 8 * B + 2 * B * N


def fit_fixed_and_bandwidth(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line ``t_us = fixed_us + bytes / bw`` through ``(bytes, t_us)`` points: ``(fixed_us, bw in bytes
    per µs)``. Needs two distinct byte counts."""
    n = len(points)
    mx = sum(b for b, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((b - mx) ** 2 for b, _ in points)
    if n < 2 or sxx == 0:
        raise ValueError("the fit needs fp16 rows of at least two sizes")
    slope = sum((b - mx) * (t - my) for b, t in points) / sxx
    return my - slope * mx, 1.0 / slope


def bound_rows(sass: list[dict], speed: list[dict]) -> list[dict]:
    """One row per (kernel configuration of ``sass``, linear shape of ``speed``'s fp16 rows at that configuration's
    BLOCK_B): the floor and its parts, fp16's measured time and fixed cost, and the ceiling estimate (module
    docstring)."""
    fp16 = [r for r in speed if r["bench"] == "linear" and r["method"] == "fp16_cublas"]
    fixed, _ = fit_fixed_and_bandwidth([(float(r["bytes_moved"]), float(r["median_us"])) for r in fp16])
    device = fp16[0]["gpu"]
    if device not in DEVICES:
        raise ValueError(f"no issue figures for {device!r}: add it to DEVICES")
    d = DEVICES[device]
    slots_per_us = d["sms"] * d["schedulers"] * d["boost_ghz"] * 1e3  # warp instructions per µs
    out = []
    for s in sass:
        B, G, q = int(s["BLOCK_B"]), int(s["G"]), s["quant_in"] == "True"
        for f in (r for r in fp16 if int(r["batch"]) == B):
            N, K = int(f["N_out"]), int(f["K_in"])
            peak = float(f["peak_copy_GBps"]) * 1e3  # bytes per µs
            nbytes = call_bytes(s["kernel"], N, K, B, G, q)
            t_mem, t_issue = nbytes / peak, N * K * float(s["instr_per_weight"]) / 32 / slots_per_us
            floor = max(t_mem, t_issue)
            out.append({
                "kind": "bound (not a measurement)", "kernel": s["kernel"],
                "gemv_format": s.get("gemv_format") or ("select" if s["kernel"] == "gemv" else "bitplane"),
                "quant_in": q, "G": G, "BLOCK_B": B,
                "BLOCK_N": int(s["BLOCK_N"]), "GPI": int(s["GPI"]), "NUM_STAGES": int(s["NUM_STAGES"]),
                "num_warps": int(s["num_warps"]), "N": N, "K": K, "batch": B, "bytes": nbytes,
                "instr_per_weight": float(s["instr_per_weight"]), "copy_peak_GBps": float(f["peak_copy_GBps"]),
                "mem_us": round(t_mem, 3), "issue_us": round(t_issue, 3), "floor_us": round(floor, 3),
                "limited_by": "memory" if t_mem >= t_issue else "issue",
                "fp16_measured_us": float(f["median_us"]), "fp16_fixed_us": round(fixed, 3),
                "ceiling_speedup_vs_fp16": round(float(f["median_us"]) / (fixed + floor), 3),
                "bound_device": device, "sass_triton": s.get("triton", ""), "measured_triton": f.get("triton", ""),
                "sass_commit": s.get("git_commit", ""), "measured_commit": f.get("git_commit", ""),
            })
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sass", type=Path, default=None,
                   help="static counts (default: the registry's kernel_sass, results/kernel/kernel_sass.csv)")
    p.add_argument("--speed", type=Path, default=None,
                   help="measured times (default: the registry's kernel_speed, results/gpu/kernel_speed.csv)")
    p.add_argument("--print-only", action="store_true", help="print the table, write nothing")
    args = p.parse_args(argv)
    from rcp_lib.experiments.registry import result_path
    from rcp_lib.io import atomic_write_csv, provenance

    sass_p, speed_p = args.sass or result_path("kernel_sass"), args.speed or result_path("kernel_speed")
    for path, cmd in ((sass_p, "python benchmarks/kernel_sass.py"), (speed_p, "make gpu-report on a GPU")):
        if not path.exists():
            print(f"kernel_bound: {path} is missing ({cmd} writes it); nothing written", file=sys.stderr)
            return 2
    rows = bound_rows(list(csv.DictReader(sass_p.open())), list(csv.DictReader(speed_p.open())))
    for r in rows:
        print(f"{r['kernel'] + (' +q' if r['quant_in'] else ''):11s} B{r['batch']} N{r['BLOCK_N']:<3d} GPI{r['GPI']} "
              f"S{r['NUM_STAGES']} w{r['num_warps']}  {r['N']:>5d}x{r['K']:<5d}: floor {r['floor_us']:6.2f} µs "
              f"({r['limited_by']}; memory {r['mem_us']:.2f}, issue {r['issue_us']:.2f}); ceiling estimate "
              f"{r['ceiling_speedup_vs_fp16']:.2f}× fp16's measured {r['fp16_measured_us']:.1f} µs if it paid fp16's "
              f"fixed {r['fp16_fixed_us']:.2f} µs")
    if not args.print_only:
        prov = provenance()
        print(f"wrote {atomic_write_csv([{**r, **prov} for r in rows], result_path('kernel_bound'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
