"""One command that tells what the GPU path does, in minutes, offline, on random weights:
``python benchmarks/gpu_check.py`` (or ``make gpu-check``). Writes ``results/gpu/check.json`` with provenance.

Sections (each records its own error instead of stopping the others; the exit status is 1 if any failed):

* ``kernel``: the fused W2A4 linear, its matmul and the generic ``rcp::w2a4_gemv`` op against a float64 product of
  the dequantized operands, and their speed against torch fp16 (cuBLAS) at 4096x4096, 4096x11008, 11008x4096 for
  batch 1, 4, 16: :func:`benchmarks.bench_kernel.measure` (CUDA graphs, CUDA-event timing, L2 flushed), the same
  function ``bench_kernel.py`` uses; its rows are also written to ``results/gpu/kernel_speed.csv`` unless
  ``--no-speed-csv``.
* ``qat``: bf16 QAT steps (the ``qat`` section of ``configs/paper-llama2-7b.yaml``: KL distillation, bf16 autocast,
  gradient checkpointing; steps cut to ``--qat-steps``) of a random LLaMA of about 1 B parameters (hidden 2048,
  intermediate 8192, 16 layers, 32 heads / 8 KV heads, vocab 32000) with the paper's W2A4KV4 RCP quantization
  (R1-R4, LDP + LWC, group 128), and its peak memory against :func:`rcp_lib.train_memory.qat_memory_per_gpu`.
* ``export``: a small random LLaMA, rotated and quantized (LDP levels perturbed so that the LUT matters), saved with
  :func:`rcp_lib.deploy.save_quantized`, loaded with :func:`~rcp_lib.deploy.load_quantized` on the device, logits
  of the packed model against the fake-quant model, each packed linear against its fake-quant twin on the same input
  (teacher forced, on the 96-token prompt and on 3 of its tokens, the decode kernels; this decides ``fused_path_ok``
  and, for the bit-serial decode kernel, ``fused_bitplane_ok``), the fake-quant model's own sensitivity to a 1e-6
  perturbation, where the packed model first quantizes an activation differently (``first_code_flip_linear``, with
  the input difference there: an end-to-end gap that starts at a rounding-level input is sensitivity, not a bug), and
  the fused quantizer's codes against ``quantize_per_token`` on the fake-quant inputs (``kernel_code_mismatches``,
  required 0; ``kernel_code_mismatches_hadamard`` behind the pre-kernel's own fp32 Hadamard, reported: a GPU may
  round that transform differently from torch), and the same folder loaded with q|k|v and gate|up merged
  (``merge_projections=True``) on the fused select path against it unmerged (``merged_ok``: within the fake-quant
  model's own sensitivity), and loaded with its gated MLPs fused (``fuse_mlps=True``: the SiLU and product in
  down_proj's quantizer) on the bit-serial path against the same path unfused, on the prompt and on 3 tokens
  (``glu_ok``, the same bound).

The report (``--out``, default ``results/gpu/check.json``: settled before the first section) is rewritten after every
section, so a section that fails, hangs past a caller's time limit (SIGTERM is recorded as that section's error) or
takes the process down leaves the finished ones on disk. It records the tree that ran
(:func:`benchmarks.bench_kernel.tree_provenance`): a copy without ``.git`` or a dirty checkout is identified by a
content hash of its sources and written, not refused. ``--no-tune`` runs every Triton launch with its fixed
configuration (the ``kernel`` section always does): no autotuning, minutes of compilation fewer.

``--device cpu --tiny`` runs the same sections with tiny shapes on the CPU (kernel: the torch reference of the op,
no timing; no memory comparison): a self-test of this script for the test suite (``tests/integration/test_gpu_path.py``).
Without CUDA and without ``--device cpu`` it prints one line and exits with status 2, writing nothing.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

GB = 1e9
#: a LLaMA-3.2-1B-like shape (vocab cut to LLaMA-2's 32000): about 1.1 B parameters
QAT_DIMS = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000)
TINY_QAT_DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU self-test)")
    p.add_argument("--sections", nargs="+", default=["kernel", "qat", "export"], choices=["kernel", "qat", "export"])
    p.add_argument("--qat-steps", type=int, default=4)
    p.add_argument("--qat-seqlen", type=int, default=2048)
    p.add_argument("--reps", type=int, default=50, help="timed CUDA-graph replays per kernel measurement")
    p.add_argument("--no-speed-csv", action="store_true", help="do not write results/gpu/kernel_speed.csv")
    p.add_argument("--no-tune", action="store_true",
                   help="fixed kernel configurations in every section (no autotuning)")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default results/gpu/check.json)")
    return p.parse_args(argv)


def _import_rcp():
    """``rcp_lib`` of this checkout, with its ``kernels/`` as ``rcp_lib.kernels`` (installed or not)."""
    import rcp_lib
    import rcp_lib.kernels  # noqa: F401

    return rcp_lib


def _llama(dims: dict, dev, seed: int = 0):
    """A random LlamaForCausalLM (fp32, sdpa, untied) on ``dev`` with RMSNorm weights in U(0.5, 1.5)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**dims, max_position_embeddings=4096, tie_word_embeddings=False, rms_norm_eps=1e-5)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(dev):
        m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.uniform_(0.5, 1.5)
    return m.eval()


def _paper_quant():
    from rcp_lib.run_config import RunConfig

    return RunConfig.load(REPO / "configs" / "paper-llama2-7b.yaml").recipe


def section_kernel(args, dev) -> dict:
    import torch

    if dev.type != "cuda":  # the CPU self-test: the torch reference of the op against float64, no timing
        from rcp_lib.kernels import dequantize, pack_codes, w2a4_gemv
        from rcp_lib.quant.activations import dequantize_per_token, quantize_per_token

        g = torch.Generator().manual_seed(0)
        rows = []
        for N, K, G, B in ((64, 256, 128, 1), (48, 384, 128, 4)):
            codes = torch.randint(0, 4, (N, K), generator=g, dtype=torch.uint8)
            lut = torch.randn(N, K // G, 4, generator=g).sort(-1).values.half()
            x = torch.randn(B, K, generator=g)
            xc, xs, xz = quantize_per_token(x, 4)
            packed = pack_codes(codes)
            ref = dequantize_per_token(xc, xs, xz).double() @ dequantize(packed, lut, K, G).double().T
            y = w2a4_gemv(xc, xs, xz, packed, lut, K, G, backend="torch")
            rel = float((y.double() - ref).norm() / ref.norm())
            rows.append({"N_out": N, "K_in": K, "batch": B, "method": "torch reference", "rel_err_vs_float64": rel})
        return {"rows": rows, "max_rel_err": max(r["rel_err_vs_float64"] for r in rows),
                "ok": all(r["rel_err_vs_float64"] < 1e-3 for r in rows)}
    import bench_kernel as BK
    from rcp_lib.kernels import triton_w2a4

    triton_w2a4.AUTOTUNE = False  # a fixed configuration: the check stays within minutes
    bench = BK.cuda_graph_timer(dev, args.reps, 256)
    tree = BK.tree_provenance()
    rows = BK.measure(dev, BK.SHAPES, [1, 4, 16], 128, 512, bench, layers=0, tree=tree)  # raises KernelMismatch
    if not args.no_speed_csv:
        from rcp_lib.experiments.registry import result_path

        BK.write_result(rows, result_path("kernel_speed"), tree)
    summary = [{k: r[k] for k in ("N_out", "K_in", "batch", "method", "median_us", "speedup_vs_fp16",
                                  "pct_of_peak_bw", "rel_err_vs_float64")} for r in rows]
    return {"rows": summary, "ok": True, "note": "bench_kernel.measure with --no-tune; fp16 = F.linear (cuBLAS)"}


def section_qat(args, dev) -> dict:
    import torch

    from rcp_lib.qat import train
    from rcp_lib.quant.apply import quantize_model
    from rcp_lib.quant.linear import cached_weight_bytes
    from rcp_lib.rotation.fuse import rotate_model
    from rcp_lib.train_memory import qat_memory_per_gpu

    dims = TINY_QAT_DIMS if args.tiny else QAT_DIMS
    recipe = _paper_quant()
    seqlen = 64 if args.tiny else args.qat_seqlen
    qcfg = type(recipe.qat)(**{**recipe.qat.to_dict(), "steps": args.qat_steps, "seqlen": seqlen, "grad_accum": 1,
                               "warmup_steps": 1, "val_every": args.qat_steps, "val_windows": 1,
                               "checkpoint_every": args.qat_steps})
    t0 = time.time()
    student = _llama(dims, dev)
    n_params = sum(p.numel() for p in student.parameters())
    teacher = copy.deepcopy(student).to(torch.bfloat16)
    rotate_model(student, recipe.rotation)
    quantize_model(student, recipe.quant)
    build_s = time.time() - t0
    data = torch.randint(0, dims["vocab_size"], (1, 40 * seqlen), generator=torch.Generator().manual_seed(0))
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    t0 = time.time()
    res = train(student, teacher, data, qcfg, out_dir=None, progress=False)
    train_s = time.time() - t0
    out = {"model": {**dims, "params": n_params}, "qat": qcfg.to_dict(), "build_s": round(build_s, 1),
           "train_s": round(train_s, 1), "losses": [h["loss"] for h in res.history],
           "val_ppl": [h["val_ppl"] for h in res.history if "val_ppl" in h],
           "tokens_per_s_incl_validation": round(res.tokens / max(train_s, 1e-9), 1),
           "teacher_dtype": str(next(teacher.parameters()).dtype),
           "eval_cache_bytes_after_train": cached_weight_bytes(student)}
    out["ok"] = all(map(lambda v: v == v and abs(v) != float("inf"), out["losses"]))
    if dev.type == "cuda":
        est = qat_memory_per_gpu(dims, n_gpus=1, strategy="ddp", w_bits=2, group_size=128, seq_len=seqlen,
                                 micro_batch=qcfg.batch_size)
        peak = torch.cuda.max_memory_allocated()
        out.update({"peak_allocated_gb": round(peak / GB, 2), "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / GB, 2),
                    "allocated_before_train_gb": round(base_alloc / GB, 2),
                    "estimate": {k: round(v, 3) for k, v in est.items()},
                    "peak_over_estimate": round(peak / GB / est["total_gb"], 3)})
    del student, teacher
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _capture_linear_io(model, names) -> tuple[dict, list]:
    """Forward hooks that record ``(input, output)`` of the named submodules (cloned, no grad)."""
    rec, hooks = {}, []
    for name in names:
        def hook(mod, inp, out, name=name):
            rec[name] = (inp[0].detach().clone(), out.detach().clone())
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    return rec, hooks


def _first_code_flip(model, fq_io: dict, free_io: dict) -> tuple[str | None, float, int]:
    """Where a packed model's free-running forward first quantizes an activation to another code than its fake-quant
    twin did: ``(linear name or None, relative input difference there, codes that differ there)``, linears in
    forward order. A flip whose input differed by float32 rounding only is the model's own sensitivity (a 4-bit code
    boundary crossed by one ULP); a wrong layer shows up first in the teacher-forced comparison instead."""
    from rcp_lib.quant.activations import quantize_per_token

    for name, (x_fq, _) in fq_io.items():
        x_pk = free_io[name][0]
        q = model.get_submodule(name)
        t = getattr(q, "input_transform", None)
        a, b = (t(v) if t is not None else v for v in (x_fq, x_pk))
        ca = quantize_per_token(a.reshape(-1, a.shape[-1]), q.act_bits, q.act_clip_ratio)[0]
        cb = quantize_per_token(b.reshape(-1, b.shape[-1]), q.act_bits, q.act_clip_ratio)[0]
        flips = int((ca != cb).sum())
        if flips:
            return name, _rel(x_pk, x_fq), flips
    return None, 0.0, 0


def _kernel_code_mismatches(model, fq_io: dict) -> tuple[int, int]:
    """Activation codes on which the fused path's quantizer (the pre-kernel, with the layer's Hadamard where the
    pre-kernel applies it; the one-launch bit-serial kernel shares its helpers and launch options) disagrees with
    ``quantize_per_token`` on the inputs the fake-quant model saw, summed over its quantized linears. A free-running
    comparison cannot see this (both sides would be quantized by the reference), so it is checked on its own.
    Returns ``(mismatches where the kernel quantizes the same input, mismatches behind the pre-kernel's own
    Hadamard)``: the first must be 0; the second compares an fp32 ``tl.dot`` transform with torch's, equal up to
    rounding (under the interpreter exactly for a power-of-two order; a code may sit at a tie for a ``base · P``
    order such as SmolLM2's 1536, whose layers now count here instead of in the first number)."""
    import torch

    from rcp_lib.kernels.triton_w2a4 import hadamard_supported, quantize_activations_triton
    from rcp_lib.quant.activations import quantize_per_token

    total = [0, 0]
    for name, (x, _) in fq_io.items():
        q = model.get_submodule(name)
        if q.act_bits is None:
            continue
        x2 = x.reshape(-1, x.shape[-1])
        t = q.input_transform
        had = t is not None and hadamard_supported(t.n, t.block)
        xin = x2 if (t is None or had) else t(x2)
        ref_in = t(x2) if t is not None else x2
        with torch.no_grad():
            got = quantize_activations_triton(xin, q.act_bits, q.act_clip_ratio, None, t.block if had else None,
                                              apply_hadamard=had)[0]
            # on the CPU: torch on CUDA divides by the Python scalar 15 as a product with its reciprocal, one ULP off
            # the kernel's division on most tokens (tests/quant/test_activations.py), enough to move a code at a tie
            want = quantize_per_token(ref_in.cpu(), q.act_bits, q.act_clip_ratio)[0]
        total[int(had)] += int((got.cpu() != want.to(got.dtype)).sum())
    return total[0], total[1]


#: input difference below which a first code flip counts as rounding (float32 eps 1.2e-7, accumulated over a few ops)
ROUNDING_REL = 1e-5


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def section_export(args, dev) -> dict:
    """Packed save -> load on ``dev`` against the fake-quant model, end to end and teacher-forced per linear.

    End to end, a W2A4 model amplifies rounding-level differences: an activation that moves by one ULP can cross a
    4-bit code boundary, and the code that flips moves the next layer's input by a whole quantization step. So the
    report also gives the fake-quant model's own sensitivity (its logits when the embeddings are perturbed by a
    relative 1e-6) and, per packed linear, the output for the *same* input the fake-quant linear saw (teacher forced):
    a path that computes every layer right agrees there to float32 rounding, whatever the end-to-end number."""
    import tempfile

    import torch

    from rcp_lib.deploy import PackedLinear, load_quantized, save_quantized
    from rcp_lib.quant.apply import quantize_model, quantized_linears
    from rcp_lib.rotation.fuse import rotate_model

    dims = TINY_QAT_DIMS if args.tiny else dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                                                 num_attention_heads=8, num_key_value_heads=4, vocab_size=4096)
    recipe = _paper_quant()
    m = _llama(dims, dev, seed=1)
    rotate_model(m, recipe.rotation)
    quantize_model(m, recipe.quant)
    with torch.no_grad():
        for _, q in quantized_linears(m):
            for prm in q.quant_parameters():
                prm.add_(0.3 * torch.randn_like(prm))  # non-uniform levels: the LUT must really matter
    m.eval()
    names = [n for n, _ in quantized_linears(m)]
    ids = torch.randint(0, dims["vocab_size"], (1, 96), generator=torch.Generator().manual_seed(3)).to(dev)
    fq_io, hooks = _capture_linear_io(m, names)
    with torch.no_grad():
        ref = m(input_ids=ids, use_cache=False).logits.double()
    for h in hooks:
        h.remove()
    g = torch.Generator(device=dev).manual_seed(7)
    h = m.get_input_embeddings().register_forward_hook(
        lambda mod, i, o: o * (1 + 1e-6 * torch.randn(o.shape, generator=g, device=o.device, dtype=o.dtype)))
    with torch.no_grad():
        perturbed = m(input_ids=ids, use_cache=False).logits.double()
    h.remove()
    out = {"model": dims, "fakequant_sensitivity_rel_logits_1e-6": _rel(perturbed, ref),
           "fakequant_sensitivity_top1_agreement_1e-6": float((perturbed.argmax(-1) == ref.argmax(-1)).double().mean())}
    fused = dev.type == "cuda"
    if not fused:  # on CPU the fused path runs in the triton interpreter only (TRITON_INTERPRET=1; slow)
        try:
            from rcp_lib.kernels.triton_gemv import interpret_mode

            fused = interpret_mode()
        except ImportError:
            pass
    if fused:
        out["kernel_code_mismatches"], out["kernel_code_mismatches_hadamard"] = _kernel_code_mismatches(m, fq_io)
    logits = {}
    with tempfile.TemporaryDirectory() as d:
        save_quantized(m, d, dtype=torch.float32)
        # the default backend ("auto": the reference op), then the fused Triton path (opt-in until this passes),
        # with its select and its bit-serial decode kernel
        variants = (((None, "select"), ("triton", "select"), ("triton", "bitplane"), ("triton", "bitplane_tiled"))
                    if fused else ((None, "select"),))
        for backend, fmt in variants:
            pk, _ = load_quantized(d, device=dev, backend=backend, gemv_format=fmt)
            key = "" if backend is None else f"_{backend}" + ("" if fmt == "select" else f"_{fmt}")
            out[f"packed_linears{key}"] = sum(isinstance(x, PackedLinear) for x in pk.modules())
            out[f"tensors_not_on_device{key}"] = [n for n, t in list(pk.named_parameters()) + list(pk.named_buffers())
                                                  if t.device.type != dev.type][:5]
            free_io, hooks = _capture_linear_io(pk, names)
            with torch.no_grad():
                got = pk(input_ids=ids, use_cache=False).logits.double()
                for hk in hooks:
                    hk.remove()
                per = {n: _rel(pk.get_submodule(n)(x), y) for n, (x, y) in fq_io.items()}
                # 3 tokens: the decode kernels (GEMV / bit-serial) rather than the GEMM of a 96-token prompt
                dec = {n: _rel(pk.get_submodule(n)(x[:, :3]), y[:, :3]) for n, (x, y) in fq_io.items()}
                flip_at, flip_rel, flips = _first_code_flip(m, fq_io, free_io)
            out[f"first_code_flip_linear{key}"] = flip_at
            out[f"input_rel_at_first_code_flip{key}"] = flip_rel
            out[f"code_flips_there{key}"] = flips
            del free_io
            out[f"rel_logits_vs_fakequant{key}"] = _rel(got, ref)
            out[f"top1_agreement_vs_fakequant{key}"] = float((got.argmax(-1) == ref.argmax(-1)).double().mean())
            worst = max(per, key=lambda n: (not math.isfinite(per[n]), per[n]))  # a NaN is the worst
            out[f"teacher_forced_max_rel{key}"] = per[worst]
            out[f"teacher_forced_worst_linear{key}"] = worst
            out[f"teacher_forced_decode_max_rel{key}"] = max(dec.values(), key=lambda v: (not math.isfinite(v), v))
            logits[key] = got
            del pk
        if fused:  # q|k|v and gate|up merged (merge_shared_inputs) on the fused select path, against it unmerged
            from rcp_lib.kernels.packed_linear import SharedInputLinear

            pk, _ = load_quantized(d, device=dev, backend="triton", merge_projections=True)
            with torch.no_grad():
                got = pk(input_ids=ids, use_cache=False).logits.double()
            out["merged_groups_triton"] = sum(isinstance(x, SharedInputLinear) for x in pk.modules())
            out["rel_logits_merged_vs_unmerged_triton"] = _rel(got, logits["_triton"])
            out["rel_logits_vs_fakequant_triton_merged"] = _rel(got, ref)
            del pk
            # the gated MLPs fused (fuse_gated_mlps) on the bit-serial path: the SiLU, the product and the R4 in the
            # kernel that quantizes down_proj's input; the prompt (pre-kernel + GEMM) and 3 tokens (decode kernels)
            from rcp_lib.kernels.packed_linear import GatedMLP

            pk, _ = load_quantized(d, device=dev, backend="triton", gemv_format="bitplane", merge_projections=True,
                                   fuse_mlps=True)
            with torch.no_grad():
                got = pk(input_ids=ids, use_cache=False).logits.double()
                dec = pk(input_ids=ids[:, :3], use_cache=False).logits.double()
            out["glu_mlps_triton"] = sum(isinstance(x, GatedMLP) for x in pk.modules())
            out["glu_in_kernel_mlps_triton"] = sum(isinstance(x, GatedMLP) and x.glu_in_kernel for x in pk.modules())
            out["glu_quantizer_mismatches"] = _glu_quantizer_mismatches(dims["intermediate_size"], dev)
            out["rel_logits_glu_vs_unfused_triton_bitplane"] = _rel(got, logits["_triton_bitplane"])
            out["rel_logits_glu_decode_vs_unfused_triton_bitplane"] = _rel(dec, logits["_triton_bitplane"][:, :3])
            del pk
    # Every layer right on the same input (teacher forced), and end to end either no further from the fake-quant
    # model than that model moves under a 1e-6 perturbation of its own embeddings (3x margin; 1 % when it hardly
    # moves), or departing from it only where an activation code first flipped on an input that agreed to rounding
    # (ROUNDING_REL): one such flip in the first layer moves a tiny W2A4 model's logits by several per cent (seen on
    # CPU: 1 flipped code of 24576 at layer 0's o_proj, input difference 3e-7, logits 9 %).
    floor = max(1e-2, 3 * out["fakequant_sensitivity_rel_logits_1e-6"])

    def end_to_end_ok(key: str) -> bool:
        return (out[f"rel_logits_vs_fakequant{key}"] <= floor
                or (out[f"first_code_flip_linear{key}"] is not None
                    and out[f"input_rel_at_first_code_flip{key}"] < ROUNDING_REL))

    out["ok"] = (out["packed_linears"] == 7 * dims["num_hidden_layers"] and not out["tensors_not_on_device"]
                 and max(out["teacher_forced_max_rel"], out["teacher_forced_decode_max_rel"]) < 1e-4
                 and end_to_end_ok(""))
    if "teacher_forced_max_rel_triton" in out:
        out["fused_path_ok"] = (max(out["teacher_forced_max_rel_triton"], out["teacher_forced_decode_max_rel_triton"])
                                < 1e-4 and end_to_end_ok("_triton") and out["kernel_code_mismatches"] == 0
                                and out["packed_linears_triton"] == out["packed_linears"]
                                and not out["tensors_not_on_device_triton"])
        # merged: the same rows from one launch per group; a tuned configuration of another N may round differently,
        # which end to end is bounded like any rounding difference (the model's own sensitivity)
        out["merged_ok"] = (out["merged_groups_triton"] == 2 * dims["num_hidden_layers"]
                            and out["rel_logits_merged_vs_unmerged_triton"] <= floor)
        # fused gated MLPs: the merged layout plus the MLP's own two torch ops moved into the quantizer, bounded the
        # same way (prompt and decode)
        # and the SiLU and product in the kernel on every block; on CUDA the kernel's product quantized exactly as
        # torch's (codes, scale, zero); the interpreter's exp is numpy's, which may differ from torch's CPU exp by a bit
        out["glu_ok"] = (out["glu_mlps_triton"] == dims["num_hidden_layers"]
                         and out["glu_in_kernel_mlps_triton"] == dims["num_hidden_layers"]
                         and (dev.type != "cuda" or not any(out["glu_quantizer_mismatches"].values()))
                         and max(out["rel_logits_glu_vs_unfused_triton_bitplane"],
                                 out["rel_logits_glu_decode_vs_unfused_triton_bitplane"]) <= floor)
        out["fused_bitplane_ok"] = (max(out["teacher_forced_max_rel_triton_bitplane"],
                                        out["teacher_forced_decode_max_rel_triton_bitplane"]) < 1e-4
                                    and end_to_end_ok("_triton_bitplane") and out["kernel_code_mismatches"] == 0)
        out["fused_bitplane_tiled_ok"] = (max(out["teacher_forced_max_rel_triton_bitplane_tiled"],
                                              out["teacher_forced_decode_max_rel_triton_bitplane_tiled"]) < 1e-4
                                          and end_to_end_ok("_triton_bitplane_tiled")
                                          and out["kernel_code_mismatches"] == 0)
    return out


def _glu_quantizer_mismatches(K: int, dev) -> dict:
    """Per activation dtype, how many codes, scales and zeros of the activation quantizer differ between the GLU
    computed in the kernel (``glu=True`` on ``[gate | up]``) and torch's ``F.silu(gate) * up`` quantized by the same
    kernel: 0 where the kernel's SiLU and product round as torch's (8 tokens of width ``K``, 4 bits)."""
    import torch

    from rcp_lib.kernels.reference import glu_input
    from rcp_lib.kernels.triton_w2a4 import quantize_activations_triton

    out = {}
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        gu = (torch.randn(8, 2 * K, generator=gen) * 3).to(dev, dtype)
        fused = quantize_activations_triton(gu, 4, 1.0, None, glu=True)
        plain = quantize_activations_triton(glu_input(gu), 4, 1.0, None)
        out[str(dtype).replace("torch.", "")] = int(sum((a != b).sum().item() for a, b in zip(fused, plain)))
    return out


SECTIONS = {"kernel": section_kernel, "qat": section_qat, "export": section_export}


def default_out() -> Path:
    """``results/gpu/check.json`` of this checkout (or of ``$RCP_RESULTS_DIR``)."""
    from rcp_lib.paths import results_root

    return results_root() / "gpu" / "check.json"


class _Terminated(BaseException):
    """SIGTERM (a caller's time limit) while a section runs: recorded as that section's error."""


def _on_sigterm(signum, frame):
    raise _Terminated("terminated (SIGTERM; a caller's time limit?)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: needs a CUDA GPU (or --device cpu --tiny for the self-test); nothing written", file=sys.stderr)
        return 2
    if dev.type != "cuda" and not args.tiny:
        print("gpu_check: --device cpu runs only with --tiny (the self-test)", file=sys.stderr)
        return 2
    _import_rcp()
    import signal

    import bench_kernel as BK
    from rcp_lib.io import provenance

    path = args.out if args.out is not None else default_out()  # settled before anything runs
    tree = BK.tree_provenance()
    report: dict = {"tiny": args.tiny, "device_type": dev.type, "sections": list(args.sections)}

    def write() -> None:
        BK.write_result(report, path, tree)

    failed: list[str] = []
    t_all = time.time()
    try:
        old_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: no handler
        old_handler = None
    try:
        report.update({**provenance(), **tree})
        if dev.type == "cuda":
            import triton

            report.update({"gpu": torch.cuda.get_device_name(dev), "cuda": torch.version.cuda,
                           "triton": triton.__version__,
                           "gpu_memory_gb": round(torch.cuda.get_device_properties(dev).total_memory / GB, 1)})
            if args.no_tune:
                from rcp_lib.kernels import triton_w2a4

                triton_w2a4.AUTOTUNE = False
                report["autotune"] = False
        write()
        for name in args.sections:
            t0 = time.time()
            print(f"[gpu_check] {name} ...", flush=True)
            try:
                report[name] = SECTIONS[name](args, dev)
            except (Exception, _Terminated) as e:  # record and go on: one broken section must not hide the others
                report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                "traceback": traceback.format_exc()[-3000:]}
            report[name]["seconds"] = round(time.time() - t0, 1)
            if not report[name].get("ok"):
                failed.append(name)
            report["total_seconds"] = round(time.time() - t_all, 1)
            report["failed_sections"] = failed
            write()  # after every section: what finished stays on disk
            shown = {k: v for k, v in report[name].items() if k not in ("rows", "traceback", "qat")}
            print(f"[gpu_check] {name}: {json.dumps(shown, default=str)[:1500]}", flush=True)
            if isinstance(report[name].get("error"), str) and report[name]["error"].startswith("_Terminated"):
                break
    except (Exception, _Terminated) as e:  # outside a section (provenance, device query): still write the report
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()[-3000:]
        failed.append("setup")
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
        report["total_seconds"] = round(time.time() - t_all, 1)
        report["failed_sections"] = failed
        write()
    print(f"[gpu_check] wrote {path}; failed sections: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
