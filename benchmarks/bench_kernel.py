"""GPU benchmark of the non-uniform W2A4 GEMV kernel (RCP's proof-of-concept kernel, our implementation).

For the linear shapes of LLaMA-2-7B (4096x4096, 11008x4096, 4096x11008) and LLaMA-3.2-1B (2048x2048,
8192x2048, 2048x8192) given as ``N_out x K_in``, at batch 1 (``--batch`` for more), it times with
``triton.testing.do_bench`` (median; do_bench flushes L2 between runs, so weights stream from DRAM):

* ``fp16_cublas``: ``x @ W.T`` with fp16 ``x [B, K]`` and ``W [N, K]`` (torch -> cuBLAS);
* ``triton_w2a4``: the Triton kernel on pre-quantized A4 codes (packed 2-bit weights + fp16 LUT, G=128);
* ``triton_w2a4+actquant``: per-token A4 quantization of ``x`` (``quantize_per_token``, torch ops) + the kernel;
* ``triton_w2a4_tuned``: best of a few block configurations for the kernel (``--tune``, on by default);
* ``dequant_matmul``: unpack + LUT-dequantize the weight to fp16 with torch ops, then cuBLAS.

For each it reports microseconds, the speed-up vs fp16, the bytes the op must move (weights + LUT +
activations + output) and the achieved GB/s against a measured device-to-device copy bandwidth
(``dst.copy_(src)`` of ``--copy-mib`` MiB; read + write counted). Before timing, the kernel's output is
checked against the torch reference (relative error < 1e-3) on every shape and tuned configuration; a
failure aborts without writing. ``bytes_moved`` is the minimum traffic of the op (what it must read and
write), also for ``dequant_matmul``, whose real traffic is larger (it materialises the fp16 weight). Results go to ``results/kernel_speed.csv`` (atomic write) with the GPU name, torch/triton/CUDA
versions, git commit and UTC date.

Without a CUDA GPU the script exits with status 2 and writes nothing: there are no estimated numbers.

Usage: ``python benchmarks/bench_kernel.py [--batch 1 2 4 8] [--group-size 128] [--no-tune] [--out PATH]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

SHAPES: list[tuple[str, int, int]] = [
    ("LLaMA-2-7B", 4096, 4096),  # q/k/v/o
    ("LLaMA-2-7B", 11008, 4096),  # gate/up
    ("LLaMA-2-7B", 4096, 11008),  # down
    ("LLaMA-3.2-1B", 2048, 2048),  # q/o
    ("LLaMA-3.2-1B", 8192, 2048),  # gate/up
    ("LLaMA-3.2-1B", 2048, 8192),  # down
]
# (block_n, block_k, num_warps, word_loads) tried by --tune; block_b follows the batch
TUNE_CONFIGS: list[tuple[int, int, int, bool]] = [
    (bn, bk, nw, wl)
    for bn, bk, nw in [(4, 512, 4), (8, 256, 4), (8, 512, 4), (16, 128, 4), (16, 256, 4), (16, 512, 8), (32, 128, 4), (32, 256, 8)]
    for wl in (False, True)
]  # fmt: skip
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import this checkout's rcp_lib
    sys.path.insert(0, str(REPO))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes (tokens), each <= 8 (default 1)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-tune", action="store_true", help="only the default block configuration")
    p.add_argument("--copy-mib", type=int, default=512, help="buffer size of the copy-bandwidth measurement")
    p.add_argument("--rep", type=int, default=200, help="do_bench repetition time in ms")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV to write (default: results/kernel_speed.csv, the registry's 'kernel_speed' file)")
    return p.parse_args(argv)


class KernelMismatch(RuntimeError):
    """The kernel's output differs from the torch reference: no timing of it is meaningful."""


def measure(
    dev,
    shapes: list[tuple[str, int, int]],
    batches: list[int],
    G: int,
    tune: bool,
    copy_mib: int,
    bench: Callable[[Callable[[], object]], float],
) -> list[dict]:
    """Run every measurement and return the result rows (nothing is written here).

    Args:
        dev: torch device ("cuda" for real numbers; "cpu" under TRITON_INTERPRET=1 only smoke-tests the logic).
        shapes: ``(model, N_out, K_in)``. batches: token counts. G: group size. tune: try TUNE_CONFIGS.
        copy_mib: copy-bandwidth buffer size. bench: ``fn -> median milliseconds``.

    Raises:
        KernelMismatch: a kernel configuration disagrees with the reference (rel. error >= 1e-3).
    """
    import torch
    import triton

    from rcp_lib.io import provenance
    from rcp_lib.kernels import dequantize, pack_codes, w2a4_gemv_reference
    from rcp_lib.kernels.triton_gemv import _default_blocks, w2a4_gemv_triton
    from rcp_lib.quant.activations import quantize_per_token

    # device-to-device copy bandwidth (read + write)
    nbytes = copy_mib * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    t_copy_ms = bench(lambda: dst.copy_(src))
    copy_gbps = 2 * nbytes / (t_copy_ms * 1e-3) / 1e9
    del src, dst
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s ({copy_mib} MiB buffer)")

    prov = provenance()
    common = {
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} (smoke test)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_commit": prov["git_commit"],
        "date_utc": prov["date_utc"],
        "copy_GBps": round(copy_gbps, 1),
        "group_size": G,
    }
    rows: list[dict] = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for model, N, K in shapes:
        codes = torch.randint(0, 4, (N, K), dtype=torch.uint8, device=dev, generator=gen)
        lut = torch.randn(N, -(-K // G), 4, device=dev, generator=gen).sort(-1).values.mul_(0.02).half()
        packed = pack_codes(codes, 2)
        w16 = dequantize(packed, lut, K, G, 2, dtype=torch.float16)
        del codes
        for B in batches:
            x = torch.randn(B, K, device=dev, dtype=torch.float16, generator=gen)
            xc, xs, xz = quantize_per_token(x, 4)
            ref = w2a4_gemv_reference(xc, xs, xz, packed, lut, K, G)
            y = w2a4_gemv_triton(xc, xs, xz, packed, lut, K, G)
            rel = float((y - ref).norm() / ref.norm())
            if not rel < 1e-3:
                raise KernelMismatch(f"kernel disagrees with the reference on {N}x{K} B={B} (rel {rel:.2e})")
            act_bytes = xc.nbytes + xs.nbytes + xz.nbytes
            w2_bytes = packed.nbytes + lut.nbytes + act_bytes + B * N * 4
            fp16_bytes = w16.nbytes + x.nbytes + B * N * 2

            db = _default_blocks(B, dev.type == "cpu")
            default_cfg = f"default: block_b={db[0]} block_n={db[1]} block_k={db[2]} num_warps=4 word_loads=False"
            results: list[tuple[str, float, int, str]] = []
            t_fp16 = bench(lambda: x @ w16.t())
            results.append(("fp16_cublas", t_fp16, fp16_bytes, ""))
            results.append(("triton_w2a4", bench(lambda: w2a4_gemv_triton(xc, xs, xz, packed, lut, K, G)), w2_bytes, default_cfg))

            def with_actquant():
                c, s, z = quantize_per_token(x, 4)
                return w2a4_gemv_triton(c, s, z, packed, lut, K, G)

            results.append(("triton_w2a4+actquant", bench(with_actquant), w2_bytes, default_cfg))
            if tune:
                best = None
                for bn, bk, nw, wl in TUNE_CONFIGS:
                    fn = lambda: w2a4_gemv_triton(  # noqa: E731
                        xc, xs, xz, packed, lut, K, G, block_n=bn, block_k=bk, num_warps=nw, word_loads=wl
                    )
                    yt = fn()
                    if not float((yt - ref).norm() / ref.norm()) < 1e-3:
                        raise KernelMismatch(f"config {(bn, bk, nw, wl)} is wrong on {N}x{K}")
                    t = bench(fn)
                    if best is None or t < best[0]:
                        best = (t, f"block_n={bn} block_k={bk} num_warps={nw} word_loads={wl}")
                results.append(("triton_w2a4_tuned", best[0], w2_bytes, best[1]))
            results.append(("dequant_matmul", bench(lambda: x @ dequantize(packed, lut, K, G, 2, dtype=torch.float16).t()), w2_bytes, ""))

            for method, t_ms, moved, cfg in results:
                gbps = moved / (t_ms * 1e-3) / 1e9
                row = {
                    "model": model, "N_out": N, "K_in": K, "batch": B, "method": method, "config": cfg,
                    "median_us": round(t_ms * 1e3, 2), "speedup_vs_fp16": round(t_fp16 / t_ms, 3),
                    "bytes_moved": moved, "achieved_GBps": round(gbps, 1),
                    "pct_of_copy_bw": round(100 * gbps / copy_gbps, 1), "rel_err_vs_reference": f"{rel:.2e}",
                    **common,
                }  # fmt: skip
                rows.append(row)
                print(f"{model:13s} {N:6d}x{K:<6d} B={B} {method:22s} {row['median_us']:9.1f} us  "
                      f"x{row['speedup_vs_fp16']:.2f} vs fp16  {gbps:7.1f} GB/s ({row['pct_of_copy_bw']:.0f}% of copy)  {cfg}")  # fmt: skip
        del packed, lut, w16
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_kernel: needs a CUDA GPU; no numbers written", file=sys.stderr)
        return 2
    try:
        import triton.testing  # noqa: F401
    except ImportError as e:
        print(f"bench_kernel: needs triton ({e}); no numbers written", file=sys.stderr)
        return 2
    if any(not 1 <= b <= 8 for b in args.batch):
        print("bench_kernel: batch sizes must be in 1..8", file=sys.stderr)
        return 2

    from rcp_lib.io import atomic_write_csv
    from rcp_lib.kernels.triton_gemv import interpret_mode

    if interpret_mode():
        print("bench_kernel: TRITON_INTERPRET is set; unset it to time the compiled kernel", file=sys.stderr)
        return 2

    import triton.testing as tt

    bench = lambda fn: tt.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")  # noqa: E731
    try:
        rows = measure(torch.device("cuda"), SHAPES, args.batch, args.group_size, not args.no_tune, args.copy_mib, bench)
    except KernelMismatch as e:
        print(f"bench_kernel: {e}; no numbers written", file=sys.stderr)
        return 1
    from rcp_lib.experiments.registry import result_path

    path = atomic_write_csv(rows, args.out or result_path("kernel_speed"))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
