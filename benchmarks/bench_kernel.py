"""GPU benchmark of the fused W2A4 linear (``kernels/triton_w2a4.py``) against torch fp16 (cuBLAS), side by side in one
run. Writes ``results/gpu/kernel_speed.csv`` (the registry's ``kernel_speed`` file).

Per shape ``N_out x K_in`` in (4096 x 4096, 4096 x 11008, 11008 x 4096: LLaMA-2-7B's q/k/v/o, down, gate/up) and batch
(1, 4, 16 tokens), every method is captured in a CUDA graph once (after warm-up, which also autotunes), then timed
by CUDA events around single graph replays, with the L2 cache flushed (a ``--flush-mib`` MiB buffer written)
before each replay and outside the timed interval; the median over ``--reps`` replays is reported:

* ``fp16_cublas``: ``F.linear(x, W)`` with fp16 ``x [B, K]``, ``W [N, K]``;
* ``w2a4_fused``: the deployed path, two launches (activation pre-kernel + GEMV/GEMM), fp16 in, fp16 out;
* ``w2a4_matmul``: launch 2 alone, on pre-quantized codes (the weight-streaming kernel);
* ``w2a4_generic_op``: the generic ``torch.ops.rcp.w2a4_gemv`` kernel (``kernels/triton_gemv.py``) on the same
  weights, natural-order codes (the previous path of PackedLinear on CUDA);
* ``w2a4_bitplane_tiled_fused`` (decode batches): the one-launch bit-serial kernel on tiles, the planes and levels
  interleaved per row and pair of groups (``PackedLinear(gemv_format="bitplane_tiled")``, ``.layout`` "Tiles");
* ``w2a4_bitplane_fused`` / ``w2a4_bitplane_matmul`` (decode batches, ``B <= GEMV_MAX_BATCH``): the bit-serial
  kernel (``PackedLinear(gemv_format="bitplane")``): one launch that quantizes the fp16 activations itself and runs
  the popcount GEMV on weight bit planes (derived once per layer), and the GEMV alone on pre-computed activation
  planes; with ``measure(..., bitplane_two_launch=True)`` (``benchmarks/gpu_report.py``) also
  ``w2a4_bitplane_two_launch``: the pre-kernel writing activation planes, then the bit-serial GEMV (the path of a layer
  whose Hadamard runs in the pre-kernel).

``bytes_moved`` is the minimum traffic of the op (weights + LUT + row sums + activations + output); achieved
bandwidth is ``bytes_moved / time`` and ``pct_of_peak_bw`` divides it by the peak measured in the same run: a
device-to-device copy of ``--copy-mib`` MiB (read + write counted). ``speedup_vs_fp16`` is the fp16 time of the same
shape and batch over the method's time.

Decode (``--layers``, default 32): a LLaMA-2-7B-shaped stack of random weights, *not* a Hugging Face model: per layer
RMSNorm, q/k/v/o (4096 x 4096), an attention stand-in (scaled-dot-product attention of the one new query over a
fixed random fp16 KV cache of ``--kv-len`` tokens, no RoPE, cache not appended), residual, RMSNorm, gate/up
(11008 x 4096), SiLU gating, down (4096 x 11008), residual; no embedding / lm_head. ``fp16`` uses ``nn.Linear``
fp16 weights, ``w2a4`` uses :class:`rcp_lib.kernels.packed_linear.PackedLinear` (random codes and LUTs, G = 128, A4, the online
R4 Hadamard on down_proj's input: 11008 = 172 · 64 is beyond the pre-kernel's row mixing (``hadamard_supported``),
so that transform runs in torch before the fused pre-kernel); ``w2a4_bitplane`` is the same stack with the bit-serial decode kernel. The ``*_merged`` stacks
(:data:`DECODE_VARIANTS`) compute q | k | v and gate | up as one linear each (for W2A4 the layout of
``rcp_lib.deploy.merge_shared_inputs``); their ``speedup_vs_fp16`` is against ``fp16_merged``. ``w2a4_bitplane_glu``
is the merged bit-serial stack with each MLP as ``rcp_lib.deploy.fuse_gated_mlps`` builds it (``down.forward_glu``:
the SiLU and product inside the kernel that quantizes down_proj's input, where that kernel applies the R4 itself; at
11008 the R4 stays in torch, and so do the SiLU and product: ``--decode-dims 576 1536 9 --group-size 64``, SmolLM2-135M's shape, is one
where the fusion acts). One token step is
captured in a CUDA graph; tokens/s = 1 / median step time (no L2 flush: the weights exceed L2).

Rows carry provenance (:func:`rcp_lib.io.provenance`: git commit, device, torch version, date), the tree that ran
(:func:`tree_provenance`: ``tree_state`` clean / dirty / no-git and ``source_hash``, a content hash of the source
files, which identifies a device copy without ``.git`` or a dirty checkout: such a tree is recorded, not refused)
plus the triton version and the measured copy bandwidth. Without a CUDA GPU the script prints one line and exits with
status 2, writing nothing; a kernel that disagrees with the reference aborts without writing. The output path and the
tree are settled before the first measurement and the rows are written before anything else that can fail; another
error during the measurements writes the rows measured until then beside the output (``<name>.partial.csv``, so
that the registry's file is never replaced by a partial table; exit status 1).

Usage: ``python benchmarks/bench_kernel.py [--batch 1 4 16] [--layers 32] [--no-tune] [--out PATH]``
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

SHAPES: list[tuple[str, int, int]] = [
    ("LLaMA-2-7B q/k/v/o", 4096, 4096),
    ("LLaMA-2-7B down", 4096, 11008),
    ("LLaMA-2-7B gate/up", 11008, 4096),
]
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: import this checkout's rcp_lib
    sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------------- the tree that ran
#: what :func:`source_hash` reads: the code and configs whose change could change a number (relative to the root)
SOURCE_DIRS = ("rcp_lib", "kernels", "benchmarks", "configs")
SOURCE_FILES = ("pyproject.toml", "requirements.txt", "Makefile")


def source_files(root: str | os.PathLike) -> list[str]:
    """Root-relative POSIX paths of the source files under ``root``: ``*.py`` under ``rcp_lib/``, ``kernels/`` and
    ``benchmarks/``, every file under ``configs/``, and :data:`SOURCE_FILES`; byte caches skipped; sorted."""
    root = Path(root)
    out = [f for f in SOURCE_FILES if (root / f).is_file()]
    for d in SOURCE_DIRS:
        for f in (root / d).rglob("*") if (root / d).is_dir() else ():
            if not f.is_file() or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            if d != "configs" and f.suffix != ".py":
                continue
            out.append(f.relative_to(root).as_posix())
    return sorted(out)


def source_hash(root: str | os.PathLike) -> str:
    """16-hex-digit SHA-256 of :func:`source_files` (names and bytes): the same tree gives the same hash on any
    machine, with or without ``.git``."""
    root = Path(root)
    h = hashlib.sha256()
    for rel in source_files(root):
        data = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()[:16]


def tree_provenance(root: str | os.PathLike = REPO) -> dict[str, Any]:
    """How the source tree that ran is identified: ``{"tree_state", "tree_commit", "source_hash", "tree_id"}``.

    ``tree_state`` is ``"clean"`` (a git checkout without uncommitted changes to code or configs:
    :func:`rcp_lib.io.dirty_files`), ``"dirty"``, or ``"no-git"`` (no ``.git`` in ``root``: the copy of a working
    tree that a GPU machine receives). ``tree_id`` is ``git:<commit>`` for a clean tree and ``content:<source_hash>``
    otherwise: a copied or dirty tree is recorded by its content, not refused (:func:`write_result`)."""
    root = Path(root).resolve()
    state, commit = "no-git", ""
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                    timeout=10).stdout.strip()
        except Exception:
            commit = ""
        if commit:
            from rcp_lib.io import dirty_files  # the project's definition of "dirty" (outputs do not count)

            state = "dirty" if dirty_files(root) else "clean"
    digest = source_hash(root)
    return {"tree_state": state, "tree_commit": commit, "source_hash": digest,
            "tree_id": f"git:{commit}" if state == "clean" else f"content:{digest}"}


@contextlib.contextmanager
def _allow_dirty_writes(allow: bool):
    from rcp_lib.io import ALLOW_DIRTY_ENV

    old = os.environ.get(ALLOW_DIRTY_ENV)
    if allow:
        os.environ[ALLOW_DIRTY_ENV] = "1"
    try:
        yield
    finally:
        if allow:
            if old is None:
                os.environ.pop(ALLOW_DIRTY_ENV, None)
            else:
                os.environ[ALLOW_DIRTY_ENV] = old


def write_result(data: list[dict] | dict, path: str | os.PathLike, tree: dict[str, Any]) -> Path:
    """Write rows (CSV) or a dict (JSON) atomically with :mod:`rcp_lib.io`. A tree that :func:`tree_provenance`
    recorded by content (dirty, or a copy without ``.git``) may write under ``results/``: the rows carry its
    ``source_hash``, which is what the dirty-tree guard asks a commit for."""
    from rcp_lib.io import atomic_write_csv, atomic_write_json

    with _allow_dirty_writes(tree.get("tree_state") != "clean"):
        if isinstance(data, dict):
            return atomic_write_json(data, path)
        return atomic_write_csv(data, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16], help="tokens per call (default 1 4 16)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--no-tune", action="store_true", help="a fixed configuration instead of autotuning")
    p.add_argument("--copy-mib", type=int, default=1024, help="buffer of the copy-bandwidth (peak) measurement")
    p.add_argument("--flush-mib", type=int, default=256, help="buffer written to flush L2 before each replay")
    p.add_argument("--reps", type=int, default=100, help="timed graph replays per method")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the decode benchmark (0: skip)")
    p.add_argument("--kv-len", type=int, default=512, help="KV-cache length of the attention stand-in")
    p.add_argument("--decode-dims", type=int, nargs=3, default=[4096, 11008, 32], metavar=("HIDDEN", "INTER", "HEADS"),
                   help="the decode stack's shape (default LLaMA-2-7B's; e.g. 576 1536 9 with --group-size 64, "
                        "SmolLM2-135M's, whose MLP width is one the pre-kernel fuses with the SiLU and product)")
    p.add_argument("--out", type=Path, default=None,
                   help="CSV to write (default: results/gpu/kernel_speed.csv, the registry's 'kernel_speed' file)")
    return p.parse_args(argv)


class KernelMismatch(RuntimeError):
    """The kernel's output differs from the reference: no timing of it is meaningful."""


def cuda_graph_timer(dev, reps: int, flush_mib: int, flush: bool = True) -> Callable[[Callable[[], object]], float]:
    """``bench(fn) -> median ms`` of one CUDA-graph replay of ``fn`` (captured after 3 warm-up calls), with L2
    flushed before every replay (outside the timed interval)."""
    import torch

    buf = torch.empty(flush_mib * 2**20, dtype=torch.uint8, device=dev) if flush else None

    def bench(fn):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            if buf is not None:
                buf.fill_(1)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return statistics.median(times)

    return bench


def _rmsnorm(x, w, eps=1e-5):
    import torch

    v = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(v + eps)).to(x.dtype) * w


def build_decoder(dev, packed: bool, layers: int, hidden: int, inter: int, heads: int, kv_len: int, G: int,
                  gemv_format: str = "select", merged: bool = False, glu: bool = False):
    """The decode stand-in of the module docstring: returns ``step(x [1, hidden]) -> [1, hidden]``. ``merged``: q | k | v
    and gate | up as one linear each (``3 hidden x hidden``, ``2 inter x hidden``; for W2A4 the layout of
    :func:`rcp_lib.deploy.merge_shared_inputs`: one activation quantization and one launch per group), their outputs
    split as the separate projections' would be. ``glu`` (W2A4, merged): down_proj takes the merged ``[gate | up]``
    (:meth:`rcp_lib.deploy.PackedLinear.forward_glu`, the MLP of :func:`rcp_lib.deploy.fuse_gated_mlps`)."""
    if glu and not (packed and merged):
        raise ValueError("glu needs a merged W2A4 stack")
    import torch
    import torch.nn.functional as F
    from torch import nn

    from rcp_lib.deploy import PackedLinear
    from rcp_lib.rotation.online import OnlineHadamard

    gen = torch.Generator(device=dev).manual_seed(1)
    hd = hidden // heads

    def linear(N, K, r4=False):
        if not packed:
            m = nn.Linear(K, N, bias=False, device=dev, dtype=torch.float16)
            with torch.no_grad():
                m.weight.normal_(0, K**-0.5, generator=gen)
            return m
        q = torch.randint(-(2**31), 2**31 - 1, (N, K // 16), dtype=torch.int32, device=dev, generator=gen)
        lut = torch.randn(N, K // G, 4, device=dev, generator=gen).sort(-1).values.mul_(K**-0.5).half()
        return PackedLinear(q, lut, K, G, 2, None, 4, 1.0, OnlineHadamard(K) if r4 else None, backend="triton",
                            gemv_format=gemv_format)  # the fused path ("auto" keeps the reference op for now)

    def group(*parts):  # the separate projections, or (merged) the same weights stacked into one linear
        if not merged:
            return parts
        if packed:
            return (PackedLinear.concat(parts),)
        m = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=False, device=dev,
                      dtype=torch.float16)
        with torch.no_grad():
            m.weight.copy_(torch.cat([p.weight for p in parts]))
        return (m,)

    blocks = []
    for _ in range(layers):  # the same draws in the same order with and without merging: the same weights
        attn = group(linear(hidden, hidden), linear(hidden, hidden), linear(hidden, hidden))
        o = linear(hidden, hidden)
        mlp = group(linear(inter, hidden), linear(inter, hidden))
        blocks.append(dict(
            attn=attn, o=o, mlp=mlp, down=linear(hidden, inter, r4=True),
            kc=torch.randn(1, heads, kv_len, hd, device=dev, dtype=torch.float16, generator=gen),
            vc=torch.randn(1, heads, kv_len, hd, device=dev, dtype=torch.float16, generator=gen),
            n1=torch.ones(hidden, device=dev, dtype=torch.float16), n2=torch.ones(hidden, device=dev, dtype=torch.float16),
        ))  # fmt: skip
    if packed:  # the derived operands, once per layer, before any capture
        for m in (m for b in blocks for m in (*b["attn"], b["o"], *b["mlp"], b["down"])):
            m.kernel_weights()
            if gemv_format == "bitplane":
                m.kernel_planes()

    def run(mods, h, sizes):  # the outputs of a group (the new key / value are computed, as in decode; the stand-in
        return [m(h) for m in mods] if len(mods) > 1 else list(mods[0](h).split(sizes, dim=-1))  # cache is fixed)

    @torch.no_grad()
    def step(x):
        for b in blocks:
            h = _rmsnorm(x, b["n1"])
            q, _, _ = run(b["attn"], h, hidden)
            a = F.scaled_dot_product_attention(q.reshape(1, heads, 1, hd), b["kc"], b["vc"]).reshape(1, hidden)
            x = x + b["o"](a)
            h = _rmsnorm(x, b["n2"])
            if glu:
                x = x + b["down"].forward_glu(b["mlp"][0](h))
                continue
            gate, up = run(b["mlp"], h, inter)
            x = x + b["down"](F.silu(gate) * up)
        return x

    return step


#: the decode stacks (method, packed, gemv_format, merged, glu): each separate and with q | k | v and gate | up merged
#: (``build_decoder(merged=True)``), fp16 merged too so that the merged W2A4 stacks meet a merged fp16 peer; the last
#: with the gated MLP fused (``glu``)
DECODE_VARIANTS: tuple[tuple[str, bool, str, bool, bool], ...] = (
    ("fp16", False, "select", False, False), ("w2a4", True, "select", False, False),
    ("w2a4_bitplane", True, "bitplane", False, False), ("fp16_merged", False, "select", True, False),
    ("w2a4_merged", True, "select", True, False), ("w2a4_bitplane_merged", True, "bitplane", True, False),
    ("w2a4_bitplane_glu", True, "bitplane", True, True))


def measure(dev, shapes, batches, G: int, copy_mib: int, bench, layers: int = 0, decode_dims=(4096, 11008, 32),
            kv_len: int = 512, on_rows: Callable[[list[dict]], object] | None = None,
            bitplane_two_launch: bool = False, tree: dict[str, Any] | None = None) -> list[dict]:
    """Run every measurement; return the rows (nothing is written here). ``bench(fn) -> median ms``.

    ``on_rows(rows)``, when given, receives a copy of the rows measured so far after each shape and after the decode
    stack (a caller that writes them keeps what was measured if a later step fails). ``bitplane_two_launch`` adds the
    ``w2a4_bitplane_two_launch`` rows (decode batches). ``tree``: :func:`tree_provenance` of the source tree (computed
    when None).

    Raises:
        KernelMismatch: the fused kernel or the generic op disagrees with the float64 reference (rel. >= 1e-3).
    """
    import torch
    import torch.nn.functional as F
    import triton

    from rcp_lib.io import provenance
    from rcp_lib.kernels import dequantize, pack_codes, w2a4_gemv
    from rcp_lib.kernels.layout import (activation_bitplanes, unpermute_activations, weight_bitplanes, weight_row_sums,
                                        weight_tiles)
    from rcp_lib.kernels.triton_w2a4 import (GEMV_MAX_BATCH, pop_launch_config, quantize_activations_triton,
                                             w2a4_bitplane_matmul_triton, w2a4_linear_triton, w2a4_matmul_triton)
    from rcp_lib.quant.activations import quantize_per_token

    nbytes = copy_mib * 2**20
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    peak_gbps = 2 * nbytes / (bench(lambda: dst.copy_(src)) * 1e-3) / 1e9
    del src, dst
    print(f"peak (device-to-device copy, {copy_mib} MiB, read + write): {peak_gbps:.0f} GB/s")
    launched: list[str] = []

    def timed(fn) -> float:
        """``bench(fn)``, and the configuration of the last GEMV / GEMM launch in it (the CUDA-graph capture comes
        after the warm-up and its autotuning; replays run no Python) appended to ``launched`` ("" for none)."""
        pop_launch_config()
        t = bench(fn)
        launched.append(pop_launch_config())
        return t

    prov = provenance()
    tree = tree if tree is not None else tree_provenance()
    common = {**prov, **tree, "triton": triton.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} (smoke test)",
              "peak_copy_GBps": round(peak_gbps, 1), "group_size": G}
    rows: list[dict] = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for model, N, K in shapes:
        codes = torch.randint(0, 4, (N, K), dtype=torch.uint8, device=dev, generator=gen)
        lut = torch.randn(N, K // G, 4, device=dev, generator=gen).sort(-1).values.mul_(0.02).half()
        packed = pack_codes(codes, 2)
        del codes
        wsum = weight_row_sums(packed, lut, K, G)
        wplanes = weight_bitplanes(packed, K)
        wtiles = weight_tiles(wplanes, lut, G)  # the same planes and levels, interleaved per row (.layout "Tiles")
        w16 = dequantize(packed, lut, K, G, 2, dtype=torch.float16)
        w64 = None
        for B in batches:
            x = torch.randn(B, K, device=dev, dtype=torch.float16, generator=gen)
            # the reference codes: quantize_per_token on the CPU (measured on an H100: torch's CUDA ops round a few
            # fp16-input codes per batch differently from the same formula on the CPU; the pre-kernel matches the CPU)
            xc, xs, xz = (t.to(dev) for t in quantize_per_token(x.cpu(), 4))  # natural order (the generic op)
            pc, ps, pz = quantize_activations_triton(x, 4, 1.0, G)  # permuted order (the fused kernel)
            if w64 is None:
                w64 = dequantize(packed, lut, K, G, 2, dtype=torch.float64)
            ref = ((xc.double() - xz.double()[:, None]) * xs.double()[:, None]) @ w64.T
            checks = {"w2a4_fused": w2a4_linear_triton(x, packed, lut, wsum, K, G, out_dtype=torch.float32),
                      "w2a4_matmul": w2a4_matmul_triton(pc, ps, pz, packed, lut, wsum, K, G),
                      "w2a4_generic_op": w2a4_gemv(xc, xs, xz, packed, lut, K, G)}
            decode = B <= GEMV_MAX_BATCH
            if decode:
                ac, as_, az = quantize_activations_triton(x, 4, 1.0, G, planes=True)
                if not torch.equal(ac, activation_bitplanes(xc)):
                    raise KernelMismatch(f"{N}x{K} B={B}: the pre-kernel's bit planes differ from quantize_per_token's")
                checks["w2a4_bitplane_fused"] = w2a4_linear_triton(x, packed, lut, wsum, K, G, out_dtype=torch.float32,
                                                                   wplanes=wplanes)
                checks["w2a4_bitplane_matmul"] = w2a4_bitplane_matmul_triton(ac, as_, az, wplanes, lut, wsum, K, G)
                checks["w2a4_bitplane_tiled_fused"] = w2a4_linear_triton(x, packed, lut, wsum, K, G,
                                                                         out_dtype=torch.float32, wplanes=wtiles)
                if bitplane_two_launch:
                    checks["w2a4_bitplane_two_launch"] = w2a4_bitplane_matmul_triton(
                        *quantize_activations_triton(x, 4, 1.0, G, planes=True), wplanes, lut, wsum, K, G)
            rel = {k: float((v.double() - ref).norm() / ref.norm()) for k, v in checks.items()}
            code_diff = int((unpermute_activations(pc, G) != xc).sum())
            if code_diff:
                raise KernelMismatch(f"{N}x{K} B={B}: the pre-kernel's codes differ from quantize_per_token in "
                                     f"{code_diff} places")
            bad = {k: v for k, v in rel.items() if not v < 1e-3}
            if bad:
                raise KernelMismatch(f"{N}x{K} B={B}: {bad} against the float64 reference")
            path = "gemv" if B <= GEMV_MAX_BATCH else "gemm"
            act = B * K + 8 * B  # codes + scale/zero
            w2_bytes = packed.nbytes + lut.nbytes + wsum.nbytes + act + B * N * 2
            results = [
                ("fp16_cublas", timed(lambda: F.linear(x, w16)), w16.nbytes + x.nbytes + B * N * 2, "", float("nan")),
                ("w2a4_fused", timed(lambda: w2a4_linear_triton(x, packed, lut, wsum, K, G)), w2_bytes + x.nbytes,
                 f"pre-kernel + {path}", rel["w2a4_fused"]),
                ("w2a4_matmul", timed(lambda: w2a4_matmul_triton(pc, ps, pz, packed, lut, wsum, K, G, None, torch.float16)),
                 w2_bytes, path, rel["w2a4_matmul"]),
                ("w2a4_generic_op", timed(lambda: w2a4_gemv(xc, xs, xz, packed, lut, K, G)),
                 packed.nbytes + lut.nbytes + act + B * N * 4, "torch.ops.rcp.w2a4_gemv", rel["w2a4_generic_op"]),
            ]  # fmt: skip
            if decode:
                wp_bytes = wplanes.nbytes + lut.nbytes + wsum.nbytes + B * N * 2  # weights + output
                results += [
                    ("w2a4_bitplane_fused", timed(lambda: w2a4_linear_triton(x, packed, lut, wsum, K, G, wplanes=wplanes)),
                     wp_bytes + x.nbytes, "one launch (quantize + bitplane)", rel["w2a4_bitplane_fused"]),
                    ("w2a4_bitplane_matmul", timed(lambda: w2a4_bitplane_matmul_triton(ac, as_, az, wplanes, lut, wsum, K, G,
                                                                                      None, torch.float16)),
                     wp_bytes + ac.nbytes + 8 * B, "bitplane", rel["w2a4_bitplane_matmul"]),
                    ("w2a4_bitplane_tiled_fused",
                     timed(lambda: w2a4_linear_triton(x, packed, lut, wsum, K, G, wplanes=wtiles)),
                     wtiles.nbytes + wsum.nbytes + B * N * 2 + x.nbytes, "one launch (quantize + bitplane), tiles",
                     rel["w2a4_bitplane_tiled_fused"]),
                ]  # fmt: skip
                if bitplane_two_launch:
                    def two_launch():
                        planes, ps_, pz_ = quantize_activations_triton(x, 4, 1.0, G, planes=True)
                        return w2a4_bitplane_matmul_triton(planes, ps_, pz_, wplanes, lut, wsum, K, G, None,
                                                           torch.float16)

                    results.append(("w2a4_bitplane_two_launch", timed(two_launch), wp_bytes + x.nbytes,
                                    "pre-kernel (planes) + bitplane", rel["w2a4_bitplane_two_launch"]))
            t_fp16 = results[0][1]
            configs = list(launched)  # one per result, in order
            launched.clear()
            for (method, t_ms, moved, cfg, err), kcfg in zip(results, configs):
                gbps = moved / (t_ms * 1e-3) / 1e9
                row = {"bench": "linear", "model": model, "N_out": N, "K_in": K, "batch": B, "method": method,
                       "config": cfg, "kernel_config": kcfg, "median_us": round(t_ms * 1e3, 2), "speedup_vs_fp16": round(t_fp16 / t_ms, 3),
                       "bytes_moved": moved, "achieved_GBps": round(gbps, 1),
                       "pct_of_peak_bw": round(100 * gbps / peak_gbps, 1), "tokens_per_s": "",
                       "rel_err_vs_float64": f"{err:.2e}", **common}  # fmt: skip
                rows.append(row)
                print(f"{N:6d}x{K:<6d} B={B:<3d} {method:16s} {row['median_us']:9.1f} us  x{row['speedup_vs_fp16']:.2f} "
                      f"vs fp16  {gbps:7.1f} GB/s ({row['pct_of_peak_bw']:.0f}% of peak)  {cfg}")  # fmt: skip
        del packed, lut, w16, w64, wsum, wplanes, wtiles
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        if on_rows is not None:
            on_rows(list(rows))

    if layers:
        from rcp_lib.kernels.triton_w2a4 import hadamard_supported

        hidden, inter, heads = decode_dims
        glu_note = ("; SiLU and product in down_proj's quantizer" if hadamard_supported(inter, None) else
                    f"; forward_glu, but the R4 of {inter} runs in torch and so do the SiLU and product")
        x = torch.randn(1, hidden, device=dev, dtype=torch.float16, generator=gen)
        t = {}
        for method, packed_model, fmt, merged, glu in DECODE_VARIANTS:  # each row written as soon as it is measured
            step = build_decoder(dev, packed_model, layers, hidden, inter, heads, kv_len, G, fmt, merged, glu)
            t[method] = bench(lambda: step(x))
            del step
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            ref = "fp16_merged" if merged else "fp16"  # against the fp16 stack of the same layout, measured before
            shape = ("LLaMA-2-7B-shaped" if tuple(decode_dims) == (4096, 11008, 32) else
                     f"hidden {hidden} / MLP {inter} / {heads} heads")
            row = {"bench": "decode", "model": f"{shape} stack, {layers} layers, attention stand-in "
                   f"(kv {kv_len})", "N_out": hidden, "K_in": inter, "batch": 1, "method": method,
                   "config": ("q|k|v and gate|up merged" + (glu_note if glu else "") + "; vs fp16_merged")
                   if merged else "",
                   "median_us": round(t[method] * 1e3, 2), "speedup_vs_fp16": round(t[ref] / t[method], 3),
                   "bytes_moved": "", "achieved_GBps": "", "pct_of_peak_bw": "",
                   "tokens_per_s": round(1e3 / t[method], 1), "rel_err_vs_float64": "", **common}  # fmt: skip
            rows.append(row)
            print(f"decode {method:5s} {row['median_us']:10.1f} us/token  {row['tokens_per_s']:8.1f} tokens/s  "
                  f"x{row['speedup_vs_fp16']:.2f} vs {ref}")
            if on_rows is not None:
                on_rows(list(rows))
    return rows


def import_checkout_kernels() -> None:
    """``rcp_lib.kernels`` of this checkout's ``kernels/``, installed or not (a bare copy of the repository on a GPU
    machine: ``PYTHONPATH=.``; ``rcp_lib/__init__.py`` searches the checkout root for it)."""
    import rcp_lib.kernels  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench_kernel: needs a CUDA GPU; no numbers written", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError as e:
        print(f"bench_kernel: needs triton ({e}); no numbers written", file=sys.stderr)
        return 2
    import_checkout_kernels()
    from rcp_lib.kernels import triton_w2a4
    from rcp_lib.kernels.triton_gemv import interpret_mode

    if interpret_mode():
        print("bench_kernel: TRITON_INTERPRET is set; unset it to time the compiled kernels", file=sys.stderr)
        return 2
    # settled before the first measurement: where the rows go and which tree they come from
    if args.out is not None:
        out = args.out
    else:
        from rcp_lib.experiments.registry import result_path

        out = result_path("kernel_speed")
    tree = tree_provenance()
    if tree["tree_state"] != "clean":
        print(f"bench_kernel: {tree['tree_state']} tree, recorded as {tree['tree_id']}")
    triton_w2a4.AUTOTUNE = not args.no_tune
    dev = torch.device("cuda")
    bench = cuda_graph_timer(dev, args.reps, args.flush_mib)
    done: list[dict] = []
    try:
        rows = measure(dev, SHAPES, args.batch, args.group_size, args.copy_mib, bench, args.layers,
                       decode_dims=tuple(args.decode_dims), kv_len=args.kv_len,
                       on_rows=lambda r: done.__setitem__(slice(None), r), tree=tree)
    except KernelMismatch as e:
        print(f"bench_kernel: {e}; no numbers written", file=sys.stderr)
        return 1
    except Exception as e:  # not a wrong kernel: keep what was measured, beside the registry's file
        import traceback

        traceback.print_exc()
        if not done:
            print(f"bench_kernel: {type(e).__name__}: {e}; nothing measured, no numbers written", file=sys.stderr)
            return 1
        partial = Path(out).with_name(Path(out).stem + ".partial" + Path(out).suffix)
        path = write_result(done, partial, tree)
        print(f"bench_kernel: {type(e).__name__}: {e}; wrote the {len(done)} rows measured before it to {path}",
              file=sys.stderr)
        return 1
    path = write_result(rows, out, tree)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
