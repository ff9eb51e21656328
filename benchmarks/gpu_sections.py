"""The GPU bodies of ``benchmarks/gpu_report.py`` (``make gpu-report``), one per subcommand, each run in its own process
under the report's time limits; every one writes its output into ``--out`` as soon as it has something:

* ``warm --worker I --workers P``: worker ``I`` of ``P`` launches its share of every (kernel, shape, batch,
  configuration, output dtype) that the later sections compile, once, with an explicit configuration, so that
  Triton's on-disk cache (``$TRITON_CACHE_DIR``) holds the binaries before the timed sections ask for them. The
  candidates are the kernels' own :func:`~rcp_lib.kernels.triton_w2a4.gemv_configs` /
  :func:`~rcp_lib.kernels.triton_w2a4.bitplane_configs` (launched with ``num_stages=1``, as the autotuner's configs
  are) and :func:`~rcp_lib.kernels.triton_w2a4.default_config` (the fixed configurations of ``gpu_check.py``).
* ``bench``: the autotuned batch-1 table of :func:`bench_kernel.measure` (cuBLAS fp16, the select path, the bit-serial
  path in one and in two launches, the generic op) and its decode stack (``--layers``, one CUDA graph per token):
  ``kernel_speed.csv`` after every shape; ``tuned.json``: what the autotuner chose (:func:`autotune_choices`).
* ``peers``: batch 1 beside other low-bit kernels: gemlite A16W2 and A16W4 (group 128, fp16; from the carried wheel),
  torch's tinygemm int4 (``torch._weight_int4pack_mm``, group 128, bf16), the project's select and one-launch
  bit-serial paths, cuBLAS fp16. Two timers: ``bench_kernel.cuda_graph_timer`` (one op, L2 flushed: comparable with
  ``kernel_speed.csv``) and, unless ``--no-rotating``, a steady-decode timer (one CUDA graph cycling over weight
  copies larger than L2). ``peers.json`` after every shape.
* ``ncu-target``: one launch of every path at 4096 x 11008 between ``cudaProfilerStart`` / ``Stop``, for
  ``ncu --profile-from-start off`` (the report runs Nsight Compute around it).

Nothing here runs without CUDA; no test runs these bodies (``tests/test_gpu_report.py`` checks the report's plan).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import bench_kernel as BK  # noqa: E402  (light: no torch at import)

G = 128
#: the shapes whose binaries the warm-up compiles: (11008, 4096) shares every binary with (4096, 4096) (N enters the
#: kernels only through its divisibility by 16, the strides through K)
WARM_SHAPES = ((4096, 4096), (4096, 11008))
NCU_SHAPE = (4096, 11008)


def _setup(autotune: bool = True):
    """torch, the checkout's kernels, ``triton_w2a4.AUTOTUNE`` set; returns the CUDA device."""
    import torch

    BK.import_checkout_kernels()
    from rcp_lib.kernels import triton_w2a4

    triton_w2a4.AUTOTUNE = autotune
    return torch.device("cuda")


def operands(N: int, K: int, dev, seed: int = 0):
    """Random 2-bit operands of one ``N x K`` layer in the deployed format: ``(packed, lut, wsum, wplanes)``."""
    import torch

    from rcp_lib.kernels import pack_codes
    from rcp_lib.kernels.layout import weight_bitplanes, weight_row_sums

    g = torch.Generator(device=dev).manual_seed(seed)
    codes = torch.randint(0, 4, (N, K), dtype=torch.uint8, device=dev, generator=g)
    lut = torch.randn(N, K // G, 4, device=dev, generator=g).sort(-1).values.mul_(0.02).half()
    packed = pack_codes(codes, 2)
    return packed, lut, weight_row_sums(packed, lut, K, G), weight_bitplanes(packed, K)


# ------------------------------------------------------------------------------------------------------ warm-up
def warm_tasks() -> list[tuple]:
    """Every launch the later sections compile: ``(N, K, kind, batch, config or None, out dtype name or None)``;
    ``kind`` in select (pre-kernel + select GEMV), gemm, bitplane_one (one-launch bit-serial), bitplane_tiled_one (the
    same on tiles, fp16 out), bitplane_two (planes pre-kernel + bit-serial GEMV), generic (the generic op)."""
    from rcp_lib.kernels.triton_w2a4 import bitplane_configs, default_config, gemv_configs, prune_split_k

    def tuned(cfgs, K):  # as the autotuner launches them (triton.Config(..., num_stages=1)), pruned as it prunes
        return [dict(c, num_stages=1) for c in prune_split_k(cfgs, K, G)]

    tasks = []
    for N, K in WARM_SHAPES:
        for od in ("float16", "float32"):  # timed in fp16, checked in fp32
            tasks += [(N, K, "select", 1, c, od) for c in tuned(gemv_configs(G), K)]
            for c in tuned(bitplane_configs(G), K):
                tasks += [(N, K, "bitplane_one", 1, c, od), (N, K, "bitplane_two", 1, c, od)]
                if od == "float16":  # the tiled kernel: timed in fp16 by the bench section only
                    tasks.append((N, K, "bitplane_tiled_one", 1, c, od))
            for B in (1, 4):  # gpu_check's fixed configurations (decode batches)
                tasks += [(N, K, "select", B, default_config("gemv", G), od),
                          (N, K, "bitplane_one", B, default_config("bitplane", G), od),
                          (N, K, "bitplane_two", B, default_config("bitplane", G), od)]
            tasks.append((N, K, "gemm", 16, default_config("gemm", G), od))
        tasks += [(N, K, "generic", B, None, None) for B in (1, 4, 16)]
    return tasks


def run_warm(worker: int, workers: int) -> int:
    import torch

    dev = _setup(autotune=False)  # first: it makes the checkout's kernels/ importable as rcp_lib.kernels

    from rcp_lib.kernels import w2a4_gemv
    from rcp_lib.kernels.triton_w2a4 import (quantize_activations_triton, w2a4_bitplane_linear_triton,
                                             w2a4_bitplane_matmul_triton, w2a4_matmul_triton)
    from rcp_lib.quant.activations import quantize_per_token
    mine = warm_tasks()[worker::workers]
    ops: dict = {}
    t0, ok = time.time(), 0
    for N, K, kind, B, cfg, od in mine:
        try:
            if (N, K) not in ops:
                ops[(N, K)] = operands(N, K, dev)
            packed, lut, wsum, wplanes = ops[(N, K)]
            x = torch.randn(B, K, device=dev, dtype=torch.float16)
            out_dtype = getattr(torch, od) if od else None
            if kind in ("select", "gemm"):
                c, s, z = quantize_activations_triton(x, 4, 1.0, G)
                w2a4_matmul_triton(c, s, z, packed, lut, wsum, K, G, None, out_dtype, config=cfg)
            elif kind == "bitplane_one":
                w2a4_bitplane_linear_triton(x, wplanes, lut, wsum, K, G, 4, 1.0, None, out_dtype, config=cfg)
            elif kind == "bitplane_tiled_one":
                from rcp_lib.kernels.layout import weight_tiles

                if ("tiles", N, K) not in ops:
                    ops[("tiles", N, K)] = weight_tiles(wplanes, lut, G)
                w2a4_bitplane_linear_triton(x, ops[("tiles", N, K)], lut, wsum, K, G, 4, 1.0, None, out_dtype,
                                            config=cfg)
            elif kind == "bitplane_two":
                a, s, z = quantize_activations_triton(x, 4, 1.0, G, planes=True)
                w2a4_bitplane_matmul_triton(a, s, z, wplanes, lut, wsum, K, G, None, out_dtype, config=cfg)
            else:
                xc, xs, xz = (t.to(dev) for t in quantize_per_token(x.cpu(), 4))
                w2a4_gemv(xc, xs, xz, packed, lut, K, G)
            ok += 1
        except Exception as e:  # a configuration that does not compile: the autotuner skips it too
            print(f"warm[{worker}] {N}x{K} {kind} B={B} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch.cuda.synchronize()
    print(f"warm[{worker}/{workers}]: {ok}/{len(mine)} launches compiled or found in the cache in "
          f"{time.time() - t0:.0f} s", flush=True)
    return 0 if ok == len(mine) else 1


# ------------------------------------------------------------------------------------------------------- bench
def autotune_choices(cache_dir: str | os.PathLike) -> list[dict]:
    """What triton's autotuner chose, from its on-disk cache (``*.autotune.json`` under ``cache_dir``; the kernels
    tune with ``cache_results=True``): per file the kernel, the tuning key, the fastest configuration and its timing."""
    out = []
    for f in sorted(Path(cache_dir).rglob("*.autotune.json")):
        try:
            d = json.loads(f.read_text())
            timed = [(cfg, t) for cfg, t in d.get("configs_timings", [])]
            best_cfg, best_t = min(timed, key=lambda ct: ct[1] if isinstance(ct[1], list) else [ct[1]])
            out.append({"kernel": f.name[: -len(".autotune.json")], "key": d.get("key"), "best": best_cfg,
                        "best_ms": best_t, "candidates": len(timed)})
        except Exception as e:  # a file of another triton version: listed, not fatal
            out.append({"file": str(f), "error": f"{type(e).__name__}: {e}"})
    return out


def run_bench(out: Path, layers: int, reps: int) -> int:
    dev = _setup(autotune=True)
    tree = BK.tree_provenance()
    csv_path = out / "kernel_speed.csv"

    def keep(rows):
        for r in rows:
            r["tuning"] = "autotuned (gemv_configs / bitplane_configs)"
        BK.write_result(rows, csv_path, tree)

    bench = BK.cuda_graph_timer(dev, reps, 256)
    rc = 0
    try:
        BK.measure(dev, BK.SHAPES, [1], G, 512, bench, layers=layers, kv_len=512, on_rows=keep,
                   bitplane_two_launch=True, tree=tree)
    except Exception:
        traceback.print_exc()
        rc = 1
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")
    BK.write_result({"triton_cache_dir": str(cache), "choices": autotune_choices(cache)}, out / "tuned.json", tree)
    return rc


# ------------------------------------------------------------------------------------------------------- peers
def _rotating_us(make, per_copy_bytes: float, total_bytes: float = 256e6, rounds: int = 10) -> tuple[float, int]:
    """Steady decode: ``make(i)`` gives a call on weight copy ``i``; one CUDA graph runs every copy twice (copies
    together ``>= total_bytes``, more than L2); returns (median us per call, copies)."""
    import torch

    copies = max(2, math.ceil(total_bytes / per_copy_bytes))
    fns = [make(i) for i in range(copies)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(2):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / (2 * copies))
    del g, fns
    return round(statistics.median(ts), 2), copies


def _rel(y, ref) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def _gemlite_layer(nbits: int, N: int, K: int, dev, seed: int, dequantized: bool = True):
    """A gemlite A16W<nbits> layer (group G, fp16, HQQ convention ``W = (W_q - zero) * scale``) and its dequantized
    float weights (None unless ``dequantized``)."""
    import torch
    from gemlite import DType, GemLiteLinearTriton

    g = torch.Generator(device=dev).manual_seed(seed)
    wq = torch.randint(0, 2**nbits, (N, K), dtype=torch.uint8, device=dev, generator=g)
    scale = (torch.rand(N, K // G, device=dev, generator=g) * 0.02 + 0.005).half()
    zero = torch.full((N, K // G), (2**nbits - 1) / 2, device=dev).half()
    m = GemLiteLinearTriton(nbits, group_size=G, in_features=K, out_features=N, input_dtype=DType.FP16,
                            output_dtype=DType.FP16)
    m.pack(wq, scale, zero, None)
    if not dequantized:
        return m, None
    w = ((wq.float().view(N, K // G, G) - zero.float()[..., None]) * scale.float()[..., None]).view(N, K)
    return m, w


def _tinygemm_layer(N: int, K: int, dev, seed: int, dequantized: bool = True):
    """torch's tinygemm int4 operands (group G, bf16, ``W = (q - 8) * scale + zero``): (packed, scales_and_zeros,
    dequantized float weights or None)."""
    import torch

    g = torch.Generator(device=dev).manual_seed(seed)
    q = torch.randint(0, 16, (N, K), dtype=torch.int32, device=dev, generator=g)
    scale = torch.rand(N, K // G, device=dev, generator=g) * 0.02 + 0.005
    zero = torch.randn(N, K // G, device=dev, generator=g) * 0.01
    nib = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    packed, err = None, None
    for inner_k_tiles in (8, 4, 2):
        try:
            packed = torch._convert_weight_to_int4pack(nib, inner_k_tiles)
            break
        except Exception as e:
            err = e
    if packed is None:
        raise RuntimeError(f"_convert_weight_to_int4pack: {err}")
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)  # [K / G, N, 2]
    if not dequantized:
        return packed, sz, None
    w = ((q.float() - 8).view(N, K // G, G) * scale[..., None] + zero[..., None]).view(N, K)
    return packed, sz, w


def run_peers(out: Path, rotating: bool, reps: int) -> int:
    import torch
    import torch.nn.functional as F

    dev = _setup(autotune=True)
    from rcp_lib.kernels.triton_w2a4 import w2a4_linear_triton

    tree = BK.tree_provenance()
    single = BK.cuda_graph_timer(dev, reps, 256)
    try:
        import gemlite

        gemlite_status = f"gemlite {gemlite.__version__}"
    except Exception as e:
        gemlite = None
        gemlite_status = os.environ.get("RCP_GEMLITE_STATUS") or f"skipped: {type(e).__name__}: {e}"
    res = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "gemlite": gemlite_status,
           "timers": {"single_op_us": "bench_kernel.cuda_graph_timer: one op per CUDA-graph replay, L2 flushed",
                      "rotating_us": "one CUDA graph cycling over weight copies > 256 MB (steady decode), per call"},
           **tree, "rows": []}
    for _, N, K in BK.SHAPES:
        gen = torch.Generator(device=dev).manual_seed(1)
        x16 = torch.randn(1, K, device=dev, dtype=torch.float16, generator=gen)
        rows: list[dict] = []

        def add(method, fn, make, per_copy, err, note=""):
            r = {"N_out": N, "K_in": K, "batch": 1, "method": method, "rel_err": err, "note": note}
            try:
                r["single_op_us"] = round(single(fn) * 1e3, 2)
                if rotating:
                    r["rotating_us"], r["copies"] = _rotating_us(make, per_copy)
            except Exception as e:
                r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            rows.append(r)
            print(json.dumps(r), flush=True)

        def failed(method, e):
            rows.append({"N_out": N, "K_in": K, "batch": 1, "method": method,
                         "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(json.dumps(rows[-1]), flush=True)

        w16 = torch.randn(N, K, device=dev, dtype=torch.float16, generator=gen) * K**-0.5
        add("fp16_cublas", lambda: F.linear(x16, w16), lambda i: (lambda w=w16.clone(): F.linear(x16, w)), w16.nbytes,
            0.0, "F.linear")
        del w16
        try:
            packed, lut, wsum, wplanes = operands(N, K, dev)
            per = packed.nbytes + lut.nbytes
            add("w2a4_select_fused", lambda: w2a4_linear_triton(x16, packed, lut, wsum, K, G),
                lambda i: (lambda o=operands(N, K, dev, i + 10): w2a4_linear_triton(x16, o[0], o[1], o[2], K, G)),
                per, None, "pre-kernel + select GEMV (autotuned)")
            add("w2a4_bitplane_one_launch", lambda: w2a4_linear_triton(x16, packed, lut, wsum, K, G, wplanes=wplanes),
                lambda i: (lambda o=operands(N, K, dev, i + 10):
                           w2a4_linear_triton(x16, o[0], o[1], o[2], K, G, wplanes=o[3])),
                wplanes.nbytes + lut.nbytes, None, "quantize + bit-serial GEMV in one launch (autotuned)")
            del packed, lut, wsum, wplanes
        except Exception as e:
            failed("w2a4", e)
        if gemlite is not None:
            for nbits in (2, 4):
                try:
                    m, w = _gemlite_layer(nbits, N, K, dev, 0)
                    err = _rel(m(x16), x16.double() @ w.double().T)
                    del w
                    add(f"gemlite_A16W{nbits}_g128", lambda m=m: m(x16),
                        lambda i, nb=nbits: (lambda m=_gemlite_layer(nb, N, K, dev, i + 10, False)[0]: m(x16)),
                        N * K * nbits / 8 + N * K // G * 4, err, "gemlite GemLiteLinearTriton, fp16")
                    del m
                except Exception as e:
                    failed(f"gemlite_A16W{nbits}_g128", e)
        else:
            rows.append({"N_out": N, "K_in": K, "batch": 1, "method": "gemlite", "error": gemlite_status})
        try:
            xb = x16.to(torch.bfloat16)
            packed4, sz, w = _tinygemm_layer(N, K, dev, 0)
            err = _rel(torch._weight_int4pack_mm(xb, packed4, G, sz), xb.double() @ w.double().T)
            del w
            add("tinygemm_int4_g128_bf16", lambda: torch._weight_int4pack_mm(xb, packed4, G, sz),
                lambda i: (lambda o=_tinygemm_layer(N, K, dev, i + 10, False):
                           torch._weight_int4pack_mm(xb, o[0], G, o[1])),
                N * K / 2 + N * K // G * 4, err, "torch._weight_int4pack_mm")
            del packed4, sz
        except Exception as e:
            failed("tinygemm_int4_g128_bf16", e)
        base = next((r for r in rows if r["method"] == "fp16_cublas"), {})
        for r in rows:
            for t in ("single_op_us", "rotating_us"):
                if r.get(t) and base.get(t):
                    r[t.replace("_us", "_speedup_vs_fp16")] = round(base[t] / r[t], 3)
        res["rows"] += rows
        torch.cuda.empty_cache()
        BK.write_result(res, out / "peers.json", tree)  # after every shape
    return 0 if not any("error" in r for r in res["rows"] if r["method"] != "gemlite") else 1


# ------------------------------------------------------------------------------------------------- ncu target
def run_ncu_target() -> int:
    import torch
    import torch.nn.functional as F

    dev = _setup(autotune=True)  # the tuned configurations come from triton's disk cache (the bench section's)
    from rcp_lib.kernels.triton_w2a4 import quantize_activations_triton, w2a4_bitplane_matmul_triton, w2a4_linear_triton

    N, K = NCU_SHAPE
    x16 = torch.randn(1, K, device=dev, dtype=torch.float16)
    w16 = torch.randn(N, K, device=dev, dtype=torch.float16)
    packed, lut, wsum, wplanes = operands(N, K, dev)
    paths = {"fp16_cublas": lambda: F.linear(x16, w16),
             "w2a4_select_fused": lambda: w2a4_linear_triton(x16, packed, lut, wsum, K, G),
             "w2a4_bitplane_one_launch": lambda: w2a4_linear_triton(x16, packed, lut, wsum, K, G, wplanes=wplanes),
             "w2a4_bitplane_two_launch": lambda: w2a4_bitplane_matmul_triton(
                 *quantize_activations_triton(x16, 4, 1.0, G, planes=True), wplanes, lut, wsum, K, G, None,
                 torch.float16)}
    try:
        m2, _ = _gemlite_layer(2, N, K, dev, 0, False)
        paths["gemlite_A16W2_g128"] = lambda: m2(x16)
    except Exception as e:
        print(f"gemlite: {type(e).__name__}: {e}", flush=True)
    try:
        p4, sz, _ = _tinygemm_layer(N, K, dev, 0, False)
        xb = x16.to(torch.bfloat16)
        paths["tinygemm_int4_g128_bf16"] = lambda: torch._weight_int4pack_mm(xb, p4, G, sz)
    except Exception as e:
        print(f"tinygemm: {type(e).__name__}: {e}", flush=True)
    for f in paths.values():  # compile / tune outside the profiled range
        f()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, f in paths.items():
        torch.cuda.nvtx.range_push(name)
        f()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled {len(paths)} paths at {N}x{K} in this order: {', '.join(paths)}; instructions per weight = "
          f"smsp__inst_executed.sum * 32 / {N * K}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("warm")
    w.add_argument("--worker", type=int, required=True)
    w.add_argument("--workers", type=int, required=True)
    b = sub.add_parser("bench")
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--layers", type=int, default=8)
    b.add_argument("--reps", type=int, default=50)
    q = sub.add_parser("peers")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--no-rotating", action="store_true")
    q.add_argument("--reps", type=int, default=40)
    sub.add_parser("ncu-target")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_sections: needs a CUDA GPU; nothing written", file=sys.stderr)
        return 2
    if args.cmd == "warm":
        return run_warm(args.worker, args.workers)
    if args.cmd == "bench":
        return run_bench(args.out, args.layers, args.reps)
    if args.cmd == "peers":
        return run_peers(args.out, not args.no_rotating, args.reps)
    return run_ncu_target()


if __name__ == "__main__":
    sys.exit(main())
