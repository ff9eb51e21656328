"""W2A4 op: torch reference, the registered ``torch.ops.rcp.w2a4_gemv`` and the Triton kernel (CPU interpreter) vs
float64 dense products; the deployed layer (PackedLinear) on either backend."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rcp_lib.kernels as rk
from rcp_lib.kernels import pack_codes, unpack_codes, w2a4_gemv, w2a4_gemv_reference
from rcp_lib.deploy import PackedLinear
from rcp_lib.quant.activations import quantize_per_token

REPO = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not rk.triton_available(), reason="triton not installed")


def _random_problem(B, N, K, G, bits=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (N, K), dtype=torch.uint8, generator=g)
    lut = torch.randn(N, -(-K // G), 1 << bits, generator=g).sort(-1).values.half()  # fp16 rounding is the format
    x = torch.randn(B, K, generator=g) * 3
    return codes, lut, x


def _dense64_weight(codes, lut, G):
    """float64 W_hat[n, k] = lut[n, k // G, codes[n, k]], by plain indexing (independent of the packing)."""
    N, K = codes.shape
    n = torch.arange(N)[:, None].expand(N, K)
    k = torch.arange(K)[None, :].expand(N, K)
    return lut.double()[n, k // G, codes.long()]


def _dense64_act(c, s, z):
    return (c.double() - z.double()[:, None]) * s.double()[:, None]


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


SHAPES = [(1, 33, 200, 40), (3, 33, 200, 40), (1, 8, 64, 32), (3, 8, 64, 32), (2, 17, 72, 8), (8, 5, 70, 32)]


# --------------------------------------------------------------------------------------------- reference op
@pytest.mark.parametrize("B,N,K,G", SHAPES)
def test_reference_matches_float64(B, N, K, G):
    codes, lut, x = _random_problem(B, N, K, G)
    c, s, z = quantize_per_token(x, 4)
    y = w2a4_gemv_reference(c, s, z, pack_codes(codes), lut, K, G)
    assert y.dtype == torch.float32 and y.shape == (B, N)
    ref = _dense64_act(c, s, z) @ _dense64_weight(codes, lut, G).T
    assert _rel(y, ref) < 1e-3


def test_dispatcher_auto_on_cpu_uses_reference():
    codes, lut, x = _random_problem(2, 8, 64, 32)
    c, s, z = quantize_per_token(x, 4)
    args = (c, s, z, pack_codes(codes), lut, 64, 32)
    assert torch.equal(w2a4_gemv(*args), w2a4_gemv_reference(*args))
    assert torch.equal(w2a4_gemv(*args, backend="torch"), w2a4_gemv_reference(*args))
    with pytest.raises(ValueError):
        w2a4_gemv(*args, backend="cuda")


def test_registered_torch_library_op():
    """``torch.ops.rcp.w2a4_gemv``: the reference is its CPU implementation; the fake implementation infers shapes
    on meta tensors; the op passes torch.library's registration checks."""
    codes, lut, x = _random_problem(3, 8, 64, 32)
    c, s, z = quantize_per_token(x, 4)
    args = (c, s, z, pack_codes(codes), lut, 64, 32, 2)
    assert torch.equal(torch.ops.rcp.w2a4_gemv(*args), w2a4_gemv_reference(*args))
    meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    y = torch.ops.rcp.w2a4_gemv(*meta)
    assert y.device.type == "meta" and y.shape == (3, 8) and y.dtype == torch.float32
    torch.library.opcheck(torch.ops.rcp.w2a4_gemv.default, args, test_utils=("test_schema", "test_faketensor"))


def test_top_level_kernels_import_stays_empty():
    """With the repository root on sys.path, transformers imports this folder as a top-level ``kernels`` (probing for
    the Hugging Face package): that import must neither fail nor register the op a second time."""
    import importlib

    spec = importlib.util.find_spec("kernels")
    if spec is None or spec.origin is None or Path(spec.origin).resolve() != REPO / "kernels" / "__init__.py":
        pytest.skip("the repository root is not on sys.path")
    top = importlib.import_module("kernels")
    assert top is not rk and top.__all__ == [] and not hasattr(top, "w2a4_gemv")
    assert rk.w2a4_gemv is not None and hasattr(torch.ops.rcp, "w2a4_gemv")


# --------------------------------------------------------------------------------------------- Triton kernel
@needs_triton
@pytest.mark.parametrize("B,N,K,G", SHAPES)
def test_triton_interpreter_matches_float64(B, N, K, G):
    codes, lut, x = _random_problem(B, N, K, G, seed=1)
    c, s, z = quantize_per_token(x, 4)
    y = w2a4_gemv(c, s, z, pack_codes(codes), lut, K, G, backend="triton")
    assert y.dtype == torch.float32 and y.shape == (B, N)
    ref = _dense64_act(c, s, z) @ _dense64_weight(codes, lut, G).T
    assert _rel(y, ref) < 1e-3


@needs_triton
@pytest.mark.parametrize("word_loads", [False, True])
@pytest.mark.parametrize(
    "B,N,K,G,bits,blocks",
    [
        (9, 33, 200, 40, 2, (8, 16, 64)),  # two token blocks, 3 row blocks, groups straddle K chunks
        (1, 33, 200, 40, 2, (1, 8, 32)),  # BLOCK_B = 1, many K iterations
        (3, 12, 96, 24, 4, (4, 16, 64)),  # 4-bit weights: 8 codes per word, 16-entry LUT
    ],
)
def test_triton_block_shapes_and_bits(B, N, K, G, bits, blocks, word_loads):
    from rcp_lib.kernels.triton_gemv import w2a4_gemv_triton

    codes, lut, x = _random_problem(B, N, K, G, bits=bits, seed=2)
    c, s, z = quantize_per_token(x, 4)
    bb, bn, bk = blocks
    y = w2a4_gemv_triton(
        c, s, z, pack_codes(codes, bits), lut, K, G, bits, block_b=bb, block_n=bn, block_k=bk, word_loads=word_loads
    )
    ref = _dense64_act(c, s, z) @ _dense64_weight(codes, lut, G).T
    assert _rel(y, ref) < 1e-3


@needs_triton
def test_triton_float_activations_weight_only():
    """scale = 1, zero = 0 with float inputs gives the W2A16 product."""
    codes, lut, x = _random_problem(3, 33, 200, 40, seed=3)
    one, zero = torch.ones(3), torch.zeros(3)
    y = w2a4_gemv(x, one, zero, pack_codes(codes), lut, 200, 40, backend="triton")
    ref = x.double() @ _dense64_weight(codes, lut, 40).T
    assert _rel(y, ref) < 1e-3


@needs_triton
def test_env_forces_triton_and_cpu_without_interpreter_fails(monkeypatch):
    codes, lut, x = _random_problem(1, 8, 64, 32)
    c, s, z = quantize_per_token(x, 4)
    args = (c, s, z, pack_codes(codes), lut, 64, 32)
    monkeypatch.setenv("RCP_KERNEL_BACKEND", "triton")
    y = w2a4_gemv(*args)  # forced Triton path under the interpreter
    assert _rel(y, _dense64_act(c, s, z) @ _dense64_weight(codes, lut, 32).T) < 1e-3
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        w2a4_gemv(*args)


def _run_py(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    # PYTHONPATH first: this checkout's rcp_lib, and with it its kernels/ (rcp_lib/__init__.py), even next to an
    # editable install of another checkout
    env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO)}
    code = textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.heavy
@needs_triton
def test_triton_in_subprocess_with_env_set_before_import():
    code = """
        import torch
        from rcp_lib.kernels import pack_codes, w2a4_gemv, w2a4_gemv_reference
        from rcp_lib.quant.activations import quantize_per_token
        torch.manual_seed(0)
        codes = torch.randint(0, 4, (33, 200), dtype=torch.uint8)
        lut = torch.randn(33, 5, 4).half()
        c, s, z = quantize_per_token(torch.randn(3, 200), 4)
        args = (c, s, z, pack_codes(codes), lut, 200, 40)
        y, r = w2a4_gemv(*args, backend="triton"), w2a4_gemv_reference(*args)
        print("REL", float((y - r).norm() / r.norm()))
    """
    out = _run_py(code, {"TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    rel = float(out.stdout.split("REL")[1])
    assert rel < 1e-5


@pytest.mark.heavy
def test_import_without_triton_falls_back():
    code = """
        import sys
        sys.modules["triton"] = None  # make `import triton` fail
        import torch
        import rcp_lib.kernels as rk
        from rcp_lib.deploy import PackedLinear
        assert not rk.triton_available()
        packed = rk.pack_codes(torch.randint(0, 4, (4, 32), dtype=torch.uint8))
        m = PackedLinear(packed, torch.randn(4, 1, 4).half(), 32, 32, 2, None, 4, 1.0)
        print("SHAPE", tuple(m(torch.randn(2, 32)).shape))
        try:
            rk.w2a4_gemv_triton
        except ImportError:
            print("NO-TRITON-OK")
    """
    out = _run_py(code, {})
    assert out.returncode == 0, out.stderr
    assert "SHAPE (2, 4)" in out.stdout and "NO-TRITON-OK" in out.stdout


# --------------------------------------------------------------------------------------------- deployed layer
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("act_bits", [4, None])
def test_packed_linear_matches_dense(backend, act_bits):
    N, K, G = 33, 200, 40
    codes, lut, _ = _random_problem(1, N, K, G, seed=4)
    bias = torch.randn(N)
    m = PackedLinear(pack_codes(codes), lut, K, G, 2, bias, act_bits, 1.0, backend=backend)
    assert m.qweight.dtype == torch.int32 and m.lut.dtype == torch.float16
    assert torch.equal(unpack_codes(m.qweight, K), codes)
    x = torch.randn(2, 3, K)
    y = m(x)
    assert y.shape == (2, 3, N) and y.dtype == x.dtype
    w64 = _dense64_weight(codes, lut, G)
    if act_bits:
        c, s, z = quantize_per_token(x, 4)
        x64 = (c.double() - z.double().unsqueeze(-1)) * s.double().unsqueeze(-1)
    else:
        x64 = x.double()
    ref = F.linear(x64, w64, bias.double())
    assert _rel(y, ref) < 1e-3
    assert torch.equal(m.dequantized_weight(torch.float64), w64)


# --------------------------------------------------------------------------------------------- benchmark script
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_benchmark_refuses_without_gpu(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernel", REPO / "benchmarks" / "bench_kernel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "kernel_speed.csv"
    assert mod.main(["--out", str(out)]) == 2
    assert "needs a CUDA GPU; no numbers written" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.heavy
@needs_triton
def test_benchmark_measurement_logic_smoke(tmp_path):
    """The measurement code runs end to end on CPU (interpreter, one tiny shape, a tiny decoder, a fake timer); rows
    are returned to the test only: the script itself never writes numbers without a GPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernel_smoke", REPO / "benchmarks" / "bench_kernel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.measure(torch.device("cpu"), [("tiny", 24, 64)], [1], 32, 1, lambda fn: (fn(), 1.0)[1],
                       layers=1, decode_dims=(32, 64, 2), kv_len=4)
    linear = [r for r in rows if r["bench"] == "linear"]
    assert [r["method"] for r in linear] == ["fp16_cublas", "w2a4_fused", "w2a4_matmul", "w2a4_generic_op",
                                             "w2a4_bitplane_fused", "w2a4_bitplane_matmul", "w2a4_bitplane_tiled_fused"]
    assert all(r["gpu"] == "cpu (smoke test)" and "git_commit" in r and "triton" in r for r in rows)
    assert all(float(r["rel_err_vs_float64"]) < 1e-3 for r in linear[1:])
    # each time names the GEMV configuration that produced it (the interpreter's fixed one here; autotuned on a GPU)
    kc = {r["method"]: r["kernel_config"] for r in linear}
    assert kc["fp16_cublas"] == "" and kc["w2a4_generic_op"] == ""
    assert kc["w2a4_matmul"].startswith("gemv ") and "BLOCK_N=" in kc["w2a4_matmul"] and kc["w2a4_matmul"].endswith("(fixed)")
    assert kc["w2a4_bitplane_matmul"].startswith("bitplane ") and "SPLIT_K=" in kc["w2a4_bitplane_matmul"]
    assert kc["w2a4_bitplane_tiled_fused"].startswith("bitplane_tiled ")
    decode = rows[len(linear):]
    assert [(r["bench"], r["method"]) for r in decode] == [("decode", m[0]) for m in mod.DECODE_VARIANTS]
    merged = [r for r in decode if r["method"].endswith("_merged")]
    assert len(merged) == 3 and all(r["config"].endswith("vs fp16_merged") for r in merged)
    glu = decode[-1]  # inter 64: the pre-kernel applies the R4, so the SiLU and product run in it too
    assert glu["method"] == "w2a4_bitplane_glu" and "SiLU and product in down_proj's quantizer" in glu["config"]


@pytest.mark.heavy
@needs_triton
@pytest.mark.parametrize("packed,fmt", [(False, "select"), (True, "select"), (True, "bitplane")])
def test_benchmark_merged_decode_stack_is_the_same_model(packed, fmt):
    """The merged decode stack stacks the separate stack's own weights (the same draws in the same order): one token
    step gives the same output (fp16 on the CPU; W2A4 on the fused path under the interpreter)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernel_merged", REPO / "benchmarks" / "bench_kernel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)).half()
    sep, mer = (mod.build_decoder(torch.device("cpu"), packed, 2, 64, 128, 2, 4, 32, fmt, merged=m)(x).float()
                for m in (False, True))
    assert sep.abs().max() > 0
    torch.testing.assert_close(mer, sep, rtol=1e-3, atol=1e-3 * float(sep.abs().max()))
    if packed and fmt == "bitplane":  # the gated MLP fused: GLU and R4 (128) in down_proj's pre-kernel
        glu = mod.build_decoder(torch.device("cpu"), packed, 2, 64, 128, 2, 4, 32, fmt, merged=True, glu=True)(x)
        torch.testing.assert_close(glu.float(), mer, rtol=1e-3, atol=1e-3 * float(sep.abs().max()))


@pytest.mark.heavy
@needs_triton
@pytest.mark.parametrize("block_b,word_loads", [(1, False), (8, True)])
def test_kernel_compiles_for_cuda_target(tmp_path, monkeypatch, block_b, word_loads):
    """No GPU here, but the compiled (non-interpreter) path is lowered all the way to a cubin for sm_90:
    this catches errors that the interpreter does not see (constexpr branches, layouts, reshape, types)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rcp_lib.kernels.triton_gemv import _kernel

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    ptrs = {"x_ptr": "*u8", "xs_ptr": "*fp32", "xz_ptr": "*fp32", "w_ptr": "*i32", "lut_ptr": "*fp16", "y_ptr": "*fp32"}
    ints = ["B", "N", "K", "G", "stride_xb", "stride_xk", "stride_wn", "stride_wk", "stride_ln", "stride_lg", "stride_yb", "stride_yn"]
    const = {"BITS": 2, "BLOCK_B": block_b, "BLOCK_N": 16, "BLOCK_K": 256, "WORD_LOADS": word_loads, "INTERPRET": False}
    sig = {**ptrs, **{k: "i32" for k in ints}, **{k: "constexpr" for k in const}}
    try:
        out = triton.compile(ASTSource(fn=_kernel(), signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    except RuntimeError as e:  # e.g. a triton build without the CUDA backend / ptxas
        if "ptxas" in str(e).lower() or "backend" in str(e).lower():
            pytest.skip(f"no CUDA compiler backend: {e}")
        raise
    assert "cubin" in out.asm and "ld.global" in out.asm["ptx"]


def test_launch_config_of_an_autotuned_launch_is_formatted_when_read():
    """The autotuned branch stores the autotuner's Config as it is (no formatting per launch); reading formats and
    clears it."""
    from types import SimpleNamespace

    from rcp_lib.kernels import triton_w2a4 as T

    T._LAST_LAUNCH["config"] = ("bitplane", SimpleNamespace(kwargs={"SPLIT_K": 16, "BLOCK_N": 64}, num_warps=1), None,
                                "autotuned")
    assert T.pop_launch_config() == "bitplane BLOCK_N=64 SPLIT_K=16 num_warps=1 (autotuned)"
    assert T.pop_launch_config() == ""
