"""W2A4 op: A4 quantizer, torch reference and Triton kernel (CPU interpreter) vs float64 dense products."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rcp_lib.kernels as rk
from rcp_lib.kernels import (
    QuantizedLinearW2A4,
    pack_codes,
    quantize_activation_a4,
    w2a4_gemv,
    w2a4_gemv_reference,
)

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


# --------------------------------------------------------------------------------------------- A4 quantizer
@pytest.mark.parametrize("shape", [(1, 64), (5, 200), (2, 3, 33)])
def test_a4_quantizer_error_bound(shape):
    x = torch.randn(*shape) * 4 + 0.5
    c, s, z = quantize_activation_a4(x)
    assert c.dtype == torch.uint8 and int(c.max()) <= 15
    assert s.shape == shape[:-1] and z.shape == shape[:-1]
    assert torch.equal(z, z.round()) and (z >= 0).all() and (z <= 15).all()
    xh = (c.double() - z.double().unsqueeze(-1)) * s.double().unsqueeze(-1)
    err = (x.double() - xh).abs()
    assert (err <= s.double().unsqueeze(-1) / 2 * (1 + 1e-5)).all()
    # the dequantize helper agrees
    assert torch.allclose(rk.dequantize_activation(c, s, z).double(), xh, atol=1e-6)


def test_a4_quantizer_edge_cases():
    x = torch.zeros(2, 16)
    c, s, z = quantize_activation_a4(x)
    assert torch.equal(rk.dequantize_activation(c, s, z), x)  # exact zeros, no NaN
    xh16 = torch.randn(3, 40).half()
    c, s, z = quantize_activation_a4(xh16, clip_ratio=0.9)
    assert s.dtype == torch.float32
    xh = rk.dequantize_activation(c, s, z)
    inside = xh16.float().abs() <= 0.9 * xh16.float().abs().amax(-1, keepdim=True) - s[:, None]
    assert ((xh - xh16.float()).abs()[inside] <= s[:, None].expand(3, 40)[inside] / 2 + 1e-6).all()


# --------------------------------------------------------------------------------------------- reference op
@pytest.mark.parametrize("B,N,K,G", SHAPES)
def test_reference_matches_float64(B, N, K, G):
    codes, lut, x = _random_problem(B, N, K, G)
    c, s, z = quantize_activation_a4(x)
    y = w2a4_gemv_reference(c, s, z, pack_codes(codes), lut, K, G)
    assert y.dtype == torch.float32 and y.shape == (B, N)
    ref = _dense64_act(c, s, z) @ _dense64_weight(codes, lut, G).T
    assert _rel(y, ref) < 1e-3


def test_dispatcher_auto_on_cpu_uses_reference():
    codes, lut, x = _random_problem(2, 8, 64, 32)
    c, s, z = quantize_activation_a4(x)
    args = (c, s, z, pack_codes(codes), lut, 64, 32)
    assert torch.equal(w2a4_gemv(*args), w2a4_gemv_reference(*args))
    assert torch.equal(w2a4_gemv(*args, backend="torch"), w2a4_gemv_reference(*args))
    with pytest.raises(ValueError):
        w2a4_gemv(*args, backend="cuda")


# --------------------------------------------------------------------------------------------- Triton kernel
@needs_triton
@pytest.mark.parametrize("B,N,K,G", SHAPES)
def test_triton_interpreter_matches_float64(B, N, K, G):
    codes, lut, x = _random_problem(B, N, K, G, seed=1)
    c, s, z = quantize_activation_a4(x)
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
    from rcp_lib.kernels.w2a4_gemv import w2a4_gemv_triton

    codes, lut, x = _random_problem(B, N, K, G, bits=bits, seed=2)
    c, s, z = quantize_activation_a4(x)
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
    from rcp_lib.kernels import w2a4_gemv as kmod_check  # the package attribute is the function, not the module

    assert callable(kmod_check)
    codes, lut, x = _random_problem(1, 8, 64, 32)
    c, s, z = quantize_activation_a4(x)
    args = (c, s, z, pack_codes(codes), lut, 64, 32)
    monkeypatch.setenv("RCP_KERNEL_BACKEND", "triton")
    y = w2a4_gemv(*args)  # forced Triton path under the interpreter
    assert _rel(y, _dense64_act(c, s, z) @ _dense64_weight(codes, lut, 32).T) < 1e-3
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        w2a4_gemv(*args)


def _run_py(code: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@needs_triton
def test_triton_in_subprocess_with_env_set_before_import():
    code = """
        import torch
        from rcp_lib.kernels import pack_codes, quantize_activation_a4, w2a4_gemv, w2a4_gemv_reference
        torch.manual_seed(0)
        codes = torch.randint(0, 4, (33, 200), dtype=torch.uint8)
        lut = torch.randn(33, 5, 4).half()
        c, s, z = quantize_activation_a4(torch.randn(3, 200))
        args = (c, s, z, pack_codes(codes), lut, 200, 40)
        y, r = w2a4_gemv(*args, backend="triton"), w2a4_gemv_reference(*args)
        print("REL", float((y - r).norm() / r.norm()))
    """
    out = _run_py(code, {"TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    rel = float(out.stdout.split("REL")[1])
    assert rel < 1e-5


def test_import_without_triton_falls_back():
    code = """
        import sys
        sys.modules["triton"] = None  # make `import triton` fail
        import torch
        import rcp_lib.kernels as rk
        assert not rk.triton_available()
        m = rk.QuantizedLinearW2A4.from_codes_levels(torch.randint(0, 4, (4, 32), dtype=torch.uint8), torch.randn(4, 1, 4))
        print("SHAPE", tuple(m(torch.randn(2, 32)).shape))
        try:
            rk.w2a4_gemv_triton
        except ImportError:
            print("NO-TRITON-OK")
    """
    out = _run_py(code, {})
    assert out.returncode == 0, out.stderr
    assert "SHAPE (2, 4)" in out.stdout and "NO-TRITON-OK" in out.stdout


# --------------------------------------------------------------------------------------------- module
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("a4", [True, False])
def test_quantized_linear_matches_dense(backend, a4):
    N, K, G = 33, 200, 40
    codes, lut, _ = _random_problem(1, N, K, G, seed=4)
    bias = torch.randn(N)
    m = QuantizedLinearW2A4.from_codes_levels(codes, lut.float(), bias=bias, a4=a4, backend=backend)
    assert m.group_size == G and m.packed.dtype == torch.int32 and m.lut.dtype == torch.float16
    assert torch.equal(m.codes(), codes)
    x = torch.randn(2, 3, K)
    y = m(x)
    assert y.shape == (2, 3, N) and y.dtype == x.dtype
    w64 = _dense64_weight(codes, lut, G)
    if a4:
        c, s, z = quantize_activation_a4(x)
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


@needs_triton
def test_benchmark_measurement_logic_smoke(tmp_path):
    """The measurement code runs end to end on CPU (interpreter, one tiny shape, a fake timer); rows are
    returned to the test only: the script itself never writes numbers without a GPU."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernel_smoke", REPO / "benchmarks" / "bench_kernel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.TUNE_CONFIGS = mod.TUNE_CONFIGS[:2]
    rows = mod.measure(torch.device("cpu"), [("tiny", 24, 96)], [1], 32, True, 1, lambda fn: (fn(), 1.0)[1])
    methods = [r["method"] for r in rows]
    assert methods == ["fp16_cublas", "triton_w2a4", "triton_w2a4+actquant", "triton_w2a4_tuned", "dequant_matmul"]
    assert all(r["gpu"] == "cpu (smoke test)" and float(r["rel_err_vs_reference"]) < 1e-3 for r in rows)


@needs_triton
@pytest.mark.parametrize("block_b,word_loads", [(1, False), (8, True)])
def test_kernel_compiles_for_cuda_target(tmp_path, monkeypatch, block_b, word_loads):
    """No GPU here, but the compiled (non-interpreter) path is lowered all the way to a cubin for sm_90:
    this catches errors that the interpreter does not see (constexpr branches, layouts, reshape, types)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rcp_lib.kernels.w2a4_gemv import _kernel

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
