"""The W2A4 GEMV kernel (notebook 05): correctness on any machine, speed from the GPU benchmark's file."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..profiles import Profile
from .build import base_model
from .registry import result_path

if TYPE_CHECKING:
    import pandas as pd


def kernel_correctness(profile: Profile, interpret: bool = True) -> list[dict]:
    """W2A4 op vs a float64 dense product of the dequantized operands, on random and on real exported weights.

    Backends: the torch reference always; the Triton kernel on CUDA, or under ``TRITON_INTERPRET=1`` on CPU
    (small shapes only: the interpreter is slow).
    """
    import os

    from ..kernels import dequantize, pack_codes, triton_available, w2a4_gemv
    from ..quant.activations import dequantize_per_token, quantize_per_token

    cases = []
    g = torch.Generator().manual_seed(profile.seed)
    for (B, N, K, G) in ((1, 33, 200, 40), (3, 17, 72, 8)):
        codes = torch.randint(0, 4, (N, K), generator=g, dtype=torch.uint8)
        lut = torch.sort(torch.randn(N, -(-K // G), 4, generator=g), dim=-1).values.half()
        cases.append((f"random {N}x{K} g{G}", B, codes, lut, G))
    # a real layer of the profile's model, quantized to 2 bits with a Lloyd-initialised LDP grid and exported
    fp, _ = base_model(profile)
    layer = copy.deepcopy(fp.model.layers[0].self_attn.k_proj).float().cpu()  # the cases are built on the CPU
    holder = nn.Module()
    holder.lin = layer
    from ..quant.linear import QuantLinear
    from ..quant.quantizers import WeightQuantConfig

    q = QuantLinear.from_linear(layer, WeightQuantConfig(bits=2, group_size=profile.w_group_size, method="ldp", lwc=False,
                                                         ldp_init="lloyd"))
    codes, levels = q.export()
    cases.append((f"real {profile.model} layer0.k_proj {codes.shape[0]}x{codes.shape[1]}", 1, codes, levels.half(),
                  profile.w_group_size))
    rows = []
    use_triton = triton_available() and (torch.cuda.is_available() or interpret)
    for name, B, codes, lut, G in cases:
        N, K = codes.shape
        x = torch.randn(B, K, generator=g)
        xc, xs, xz = quantize_per_token(x, 4)
        packed = pack_codes(codes)
        ref = dequantize_per_token(xc, xs, xz).double() @ dequantize(packed, lut, K, G).double().T
        backends = ["torch"] + (["triton"] if use_triton else [])
        for be in backends:
            small = N * K <= 20_000
            if be == "triton" and not torch.cuda.is_available() and not small:
                continue  # the interpreter is too slow for big shapes
            if be == "triton" and not torch.cuda.is_available():
                os.environ["TRITON_INTERPRET"] = "1"
            dev = "cuda" if (be == "triton" and torch.cuda.is_available()) else "cpu"
            y = w2a4_gemv(xc.to(dev), xs.to(dev), xz.to(dev), packed.to(dev), lut.to(dev), K, G, backend=be).cpu()
            rel = ((y.double() - ref).norm() / ref.norm()).item()
            rows.append({"case": name, "backend": be + ("" if dev == "cuda" or be == "torch" else " (TRITON_INTERPRET)"),
                         "B": B, "N": N, "K": K, "G": G, "rel_err_vs_float64": rel, "ok": rel < 1e-3})
    return rows


def kernel_speed_table() -> "pd.DataFrame | None":
    """The speed table ``benchmarks/bench_kernel.py`` writes on a GPU (``results/gpu/kernel_speed.csv``), or None."""
    import pandas as pd

    p = result_path("kernel_speed")
    return pd.read_csv(p) if p.exists() else None
