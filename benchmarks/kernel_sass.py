"""Static instruction counts of the W2A4 GEMV kernels' inner loop, from their sm_90 machine code (no GPU needed).

Each kernel of ``kernels/triton_w2a4.py`` is compiled for sm_90 (``triton.compile`` with a ``GPUTarget``; triton's
own ptxas, with the kernel's launch options), its cubin disassembled with triton's ``nvdisasm``, and the body of its
K loop (the backward-branch loop with the most popcounts, or selects for the select kernel) counted by opcode. ``instr_per_weight`` = loop instructions per thread x threads
per program / weights per loop iteration and token, i.e. the issue slots one weight costs at batch 1 (a static
count: not a time, not a speed; latency, occupancy and memory behaviour are not in it). ``bar`` counts ``BAR``
(CTA barriers: every layout conversion through shared memory costs two), ``sts``/``lds`` shared-memory stores and
loads, ``popc`` hardware popcounts, ``ldg_128`` 128-bit global loads (``LDG.E.128``) and ``ldgsts`` asynchronous
copies.

Speed comes only from a GPU (``benchmarks/bench_kernel.py``); this script is how a kernel change is checked on a
machine without one: fewer issue slots per weight and no barrier in the loop is necessary for the memory roofline
at batch 1 (the select kernel spends several slots per weight and 32 barriers per iteration: results/kernel/kernel_sass.csv),
not sufficient; `benchmarks/kernel_bound.py` turns the counts into a floor on a given GPU.

Usage: ``python benchmarks/kernel_sass.py [--out PATH] [--print-only]``: prints the table and writes it, with
provenance, to ``results/kernel/kernel_sass.csv`` (the registry's ``kernel_sass``); about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_INT = ["B", "N", "K", "stride_xb", "stride_wn", "stride_ln", "stride_yb", "B_KEY"]
SIG = {
    "gemv": {"x_ptr": "*u8", "xs_ptr": "*fp32", "xz_ptr": "*fp32", "w_ptr": "*i32", "lut_ptr": "*fp16",
             "wsum_ptr": "*fp32", "bias_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
             **{k: "i32" for k in _INT}},
    "bitplane": {"a_ptr": "*i32", "xs_ptr": "*fp32", "xz_ptr": "*fp32", "w_ptr": "*i32", "lut_ptr": "*fp16",
                 "wsum_ptr": "*fp32", "bias_ptr": "*fp16", "y_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*i32",
                 **{k: "i32" for k in ["B", "N", "K", "stride_ab", "stride_aj", "stride_wn", "stride_wp", "stride_ln",
                                        "stride_yb", "B_KEY"]}, "clip": "fp32"},
}  # fmt: skip

# (kernel, constexprs, num_warps): the select kernel at the configuration measured on the H100, the bit-serial
# kernel at batch 1 and 4
_BP = dict(G=128, ABITS=4, HAS_BIAS=False, QUANT_IN=False, RB=1024, CENTER=7.5, TILED=False, REC=0, LREC=0, LOFF=0,
           ALIGN=1, GLU=False, ROUND=0)
#: the bit-serial kernel on tiles (planes and fp16 levels interleaved per row and pair of groups, .layout "Tiles"),
#: G = 128: records of 20 words (rcp_lib.kernels.triton_w2a4._tile_operands)
_TILED = dict(TILED=True, REC=20, LREC=40, LOFF=32, ALIGN=4)
CASES: list[tuple[str, dict, int]] = [
    ("gemv", dict(G=128, HAS_BIAS=False, BLOCK_B=1, BLOCK_N=32, GPI=1, SPLIT_K=4, NUM_STAGES=2, CENTER=7.5), 2),
    ("gemv", dict(G=128, HAS_BIAS=False, BLOCK_B=4, BLOCK_N=32, GPI=1, SPLIT_K=4, NUM_STAGES=2, CENTER=7.5), 2),
    ("bitplane", dict(_BP, BLOCK_B=1, BLOCK_N=32, GPI=1, SPLIT_K=4, NUM_STAGES=2), 2),
    ("bitplane", dict(_BP, BLOCK_B=1, BLOCK_N=64, GPI=2, SPLIT_K=4, NUM_STAGES=3), 4),
    ("bitplane", dict(_BP, BLOCK_B=1, BLOCK_N=128, GPI=1, SPLIT_K=4, NUM_STAGES=1), 4),
    ("bitplane", dict(_BP, BLOCK_B=4, BLOCK_N=32, GPI=1, SPLIT_K=4, NUM_STAGES=2), 2),
    ("bitplane", dict(_BP, BLOCK_B=4, BLOCK_N=32, GPI=1, SPLIT_K=1, NUM_STAGES=1), 2),
    # one launch: the kernel quantizes fp16 activations itself
    ("bitplane", dict(_BP, QUANT_IN=True, BLOCK_B=1, BLOCK_N=128, GPI=1, SPLIT_K=4, NUM_STAGES=1), 4),
    ("bitplane", dict(_BP, QUANT_IN=True, BLOCK_B=1, BLOCK_N=64, GPI=2, SPLIT_K=4, NUM_STAGES=3), 4),
    ("bitplane", dict(_BP, QUANT_IN=True, BLOCK_B=4, BLOCK_N=32, GPI=1, SPLIT_K=4, NUM_STAGES=2), 2),
    ("bitplane", dict(_BP, **_TILED, BLOCK_B=1, BLOCK_N=64, GPI=2, SPLIT_K=4, NUM_STAGES=3), 4),
    ("bitplane", dict(_BP, **_TILED, QUANT_IN=True, BLOCK_B=1, BLOCK_N=64, GPI=2, SPLIT_K=4, NUM_STAGES=3), 4),
]


def compile_sass(name: str, const: dict, num_warps: int) -> str:
    """sm_90 SASS (``nvdisasm -c`` text) of kernel ``name`` of :mod:`rcp_lib.kernels.triton_w2a4` with ``const``
    (needs ``TRITON_INTERPRET`` unset or 0: the compiled kernels)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rcp_lib.kernels.triton_w2a4 import QUANT_LAUNCH_OPTIONS, _jitted, interpret_mode

    if interpret_mode():
        raise RuntimeError("kernel_sass compiles the GPU kernels: unset TRITON_INTERPRET")
    sig = dict(SIG[name])
    if const.get("QUANT_IN"):
        sig["a_ptr"] = "*fp16"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n.endswith("_ptr") or n.startswith("stride")}
    const = {**const, "INTERPRET": False}
    src = ASTSource(fn=_jitted(name), signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const,
                    attrs=attrs)
    opts = {"num_warps": num_warps, **(QUANT_LAUNCH_OPTIONS if name == "bitplane" else {})}  # as launched
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(k.asm["cubin"])
        return subprocess.run([str(nvdisasm), "-c", str(cubin)], capture_output=True, text=True, check=True).stdout


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)")
_BRA = re.compile(r"/\*([0-9a-f]{4,})\*/.*\bBRA\b.*`\((\.L_x_\d+)\)")
_LABEL = re.compile(r"^(\.L_x_\d+):")


def loop_opcodes(sass: str, marker: str | None = None) -> Counter:
    """Opcode counts (``LDG.E.128`` keeps its width suffix as ``LDG.128``, other opcodes lose theirs) of one
    backward-branch loop of ``sass``: the one with the most ``marker`` instructions (the K loop's signature: ``POPC``
    for the bit-serial kernel, ``FSEL`` for the select kernel; the one-launch kernel also has a min / max loop over
    the activations), the largest on a tie or without a marker."""
    labels, instrs = {}, []
    pending = []
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending:
                labels[lab] = addr
            pending = []
            instrs.append((addr, m.group(2), m.group(3), line))
    loops: list[Counter] = []
    for addr, op, _, line in instrs:
        b = _BRA.search(line)
        if op == "BRA" and b and b.group(2) in labels and labels[b.group(2)] <= addr:
            lo, hi = labels[b.group(2)], addr
            c: Counter = Counter()
            for a2, op2, suffix, _ in instrs:
                if lo <= a2 <= hi:
                    c["LDG.128" if op2 == "LDG" and ".128" in suffix else op2] += 1
            loops.append(c)
    if not loops:
        raise RuntimeError("no loop found in the SASS")
    return max(loops, key=lambda c: (c[marker] if marker else 0, sum(c.values())))


def weights_per_iteration(name: str, const: dict) -> int:
    """Weights of one row block decoded per loop iteration (per token)."""
    return const["BLOCK_N"] * const["GPI"] * const["G"]


def stats(name: str, const: dict, num_warps: int) -> dict:
    c = loop_opcodes(compile_sass(name, const, num_warps), "POPC" if name == "bitplane" else "FSEL")
    total = sum(c.values())
    threads = 32 * num_warps
    w = weights_per_iteration(name, const)
    fmt = ("bitplane_tiled" if const.get("TILED") else "bitplane") if name == "bitplane" else "select"
    return {"kernel": name, "gemv_format": fmt,
            "quant_in": bool(const.get("QUANT_IN", False)), "G": const["G"], "BLOCK_B": const["BLOCK_B"], "BLOCK_N": const["BLOCK_N"],
            "GPI": const["GPI"], "NUM_STAGES": const["NUM_STAGES"], "num_warps": num_warps,
            "loop_instr_per_thread": total, "weights_per_iter": w,
            "instr_per_weight": round(total * threads / w, 3),
            "instr_per_weight_token": round(total * threads / w / const["BLOCK_B"], 3),
            "bar": c["BAR"], "sts": c["STS"], "lds": c["LDS"] + c["LDSM"], "shfl": c["SHFL"], "popc": c["POPC"],
            "ldg": c["LDG"] + c["LDG.128"], "ldg_128": c["LDG.128"], "ldgsts": c["LDGSTS"],
            "top_ops": " ".join(f"{k}:{v}" for k, v in c.most_common(8))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="CSV to write (default: the registry's kernel_sass file, results/kernel/kernel_sass.csv)")
    p.add_argument("--print-only", action="store_true", help="print the table, write nothing")
    args = p.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        import triton
    except ImportError as e:
        print(f"kernel_sass: needs triton ({e}); nothing written", file=sys.stderr)
        return 2
    from rcp_lib.io import atomic_write_csv, provenance

    prov = {**provenance(), "triton": triton.__version__, "target": "sm_90 (GPUTarget cuda 90, warp 32)"}
    rows = []
    for name, const, nw in CASES:
        r = stats(name, const, nw)
        rows.append({**r, **prov})
        print(f"{r['gemv_format'] + (' +q' if r['quant_in'] else ''):17s} B{r['BLOCK_B']} N{r['BLOCK_N']:<3d} GPI{r['GPI']} S{r['NUM_STAGES']} w{nw}: "
              f"{r['loop_instr_per_thread']:4d} instr/thread/iter, {r['instr_per_weight']:5.2f} per weight "
              f"({r['instr_per_weight_token']:.2f} per weight x token), BAR {r['bar']}, STS {r['sts']}, LDS {r['lds']}, "
              f"POPC {r['popc']}, LDG {r['ldg']} (128-bit {r['ldg_128']}), LDGSTS {r['ldgsts']}  | {r['top_ops']}")
    if not args.print_only:
        from rcp_lib.experiments.registry import result_path

        print(f"wrote {atomic_write_csv(rows, args.out or result_path('kernel_sass'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
