"""The W2A4 GEMV as a PyTorch custom op, ``torch.ops.rcp.w2a4_gemv``, and its backend-selecting entry point.

Registration (:func:`torch.library.custom_op`, schema
``rcp::w2a4_gemv(Tensor x_codes, Tensor x_scale, Tensor x_zero, Tensor packed_w, Tensor lut, SymInt K, SymInt G,
SymInt bits=2) -> Tensor``):

* default implementation (CPU and every device without its own kernel): the torch reference,
  :func:`.reference.w2a4_gemv_reference`;
* CUDA: the Triton kernel, :func:`.triton_gemv.w2a4_gemv_triton` (the reference when triton does not import);
* fake (meta) implementation: ``float32 [B, N]`` for shape inference (meta tensors, ``torch.compile``).

:func:`w2a4_gemv` calls the op, unless a backend is forced (``backend`` argument, else the ``RCP_KERNEL_BACKEND``
environment variable, else "auto"):

* ``"auto"``: the op, i.e. dispatch on the device of the tensors (Triton on CUDA, reference elsewhere);
* ``"torch"``: always the reference;
* ``"triton"``: always the kernel; on CPU tensors this needs ``TRITON_INTERPRET=1`` (the triton interpreter, used by
  the tests for correctness; ~3000x slower than torch), otherwise a ``RuntimeError``.

The op keeps natural-order codes and any group size.

The whole deployed linear is a second op, ``torch.ops.rcp.w2a4_linear`` (:func:`w2a4_linear`; a fake implementation
for meta tensors and ``torch.compile``): the online Hadamard, the per-token activation quantizer and the product, on
the path its caller chose (:meth:`rcp_lib.kernels.packed_linear.PackedLinear.kernel_path`): the reference (its product through
``w2a4_gemv`` above) or the fused two-launch path of :mod:`.triton_w2a4` (2-bit, ``G % 16 == 0``). Every forward of
:class:`rcp_lib.kernels.packed_linear.PackedLinear` but its CPU decode cache goes through it.

The activation operands are the integer form of the per-token activation quantizer,
:func:`rcp_lib.quant.activations.quantize_per_token` (``x_hat = (x_codes - x_zero) * x_scale``, float zero point).
"""

# no ``from __future__ import annotations``: custom_op reads the schema from the (evaluated) annotations
import os
from typing import Optional

import torch

from .reference import w2a4_gemv_reference, w2a4_linear_reference

__all__ = ["w2a4_gemv", "w2a4_linear", "triton_available", "BACKEND_ENV", "LINEAR_PATHS"]

BACKEND_ENV = "RCP_KERNEL_BACKEND"

_TRITON_OK: "bool | None" = None


def triton_available() -> bool:
    """True when ``import triton`` succeeds (checked once, lazily)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401

            _TRITON_OK = True
        except Exception:
            _TRITON_OK = False
    return _TRITON_OK


@torch.library.custom_op("rcp::w2a4_gemv", mutates_args=())
def _w2a4_gemv_op(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    packed_w: torch.Tensor,
    lut: torch.Tensor,
    K: int,
    G: int,
    bits: int = 2,
) -> torch.Tensor:
    """``torch.ops.rcp.w2a4_gemv``; default implementation: the torch reference (arguments: :func:`w2a4_gemv`)."""
    return w2a4_gemv_reference(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits)


@_w2a4_gemv_op.register_kernel("cuda")
def _w2a4_gemv_cuda(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits=2):
    if not triton_available():
        return w2a4_gemv_reference(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits)
    from .triton_gemv import w2a4_gemv_triton

    return w2a4_gemv_triton(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits)


@_w2a4_gemv_op.register_fake
def _w2a4_gemv_fake(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits=2):
    return x_codes.new_empty((x_codes.shape[0], packed_w.shape[0]), dtype=torch.float32)


#: the paths of ``torch.ops.rcp.w2a4_linear`` (its ``path`` argument; chosen by the caller,
#: :meth:`rcp_lib.kernels.packed_linear.PackedLinear.kernel_path`)
LINEAR_PATHS = ("auto", "torch", "triton", "fused")


@torch.library.custom_op("rcp::w2a4_linear", mutates_args=())
def _w2a4_linear_op(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    lut: torch.Tensor,
    wsum: torch.Tensor,
    bias: Optional[torch.Tensor],
    wplanes: Optional[torch.Tensor],
    K: int,
    G: int,
    bits: int,
    act_bits: int,
    act_clip_ratio: float,
    hadamard_n: int,
    hadamard_block: int,
    path: str,
    glu: bool = False,
) -> torch.Tensor:
    """``torch.ops.rcp.w2a4_linear``: the whole deployed linear (arguments: :func:`w2a4_linear`)."""
    if x.shape[-1] != (2 * K if glu else K):  # a direct call of the op, past the wrapper's check
        raise ValueError(f"x must be [B, {'2K' if glu else 'K'}={2 * K if glu else K}], got {tuple(x.shape)}")
    if path == "fused":
        from .triton_w2a4 import w2a4_linear_triton

        return w2a4_linear_triton(x, packed_w, lut, wsum, K, G, act_bits, act_clip_ratio, bias,
                                  hadamard_block=hadamard_block or None, apply_hadamard=bool(hadamard_n),
                                  out_dtype=x.dtype, wplanes=wplanes, glu=glu)
    return w2a4_linear_reference(x, packed_w, lut, bias, K, G, bits, act_bits, act_clip_ratio, hadamard_n,
                                 hadamard_block, gemv_backend=path, glu=glu)


@_w2a4_linear_op.register_fake
def _w2a4_linear_fake(x, packed_w, lut, wsum, bias, wplanes, K, G, bits, act_bits, act_clip_ratio, hadamard_n,
                      hadamard_block, path, glu=False):
    return x.new_empty((x.shape[0], packed_w.shape[0]))


def w2a4_linear(
    x: torch.Tensor,
    packed_w: torch.Tensor,
    lut: torch.Tensor,
    K: int,
    G: int,
    bits: int = 2,
    act_bits: "int | None" = 4,
    act_clip_ratio: float = 1.0,
    bias: "torch.Tensor | None" = None,
    hadamard_n: int = 0,
    hadamard_block: int = 0,
    path: str = "auto",
    wsum: "torch.Tensor | None" = None,
    wplanes: "torch.Tensor | None" = None,
    glu: bool = False,
) -> torch.Tensor:
    """The deployed W2A4 (or W2A16) linear through the registered op ``torch.ops.rcp.w2a4_linear``.

    Args:
        x: ``[B, K]`` activations (float32 / bf16 / fp16); the output is ``[B, N]`` in ``x.dtype``. With ``glu``,
            ``[B, 2K]`` = ``[gate | up]`` (a merged gate / up projection's output) and the layer's input is
            ``F.silu(gate) * up`` (:func:`.reference.glu_input`), computed by the op: on the fused path inside the
            kernel that quantizes the activations, so a gated MLP's SiLU and product cost no launch of their own.
        packed_w, lut, K, G, bits: the stored weight (:func:`w2a4_gemv`).
        act_bits, act_clip_ratio: the per-token activation quantizer (None or 0: A16, a dense product).
        bias: ``[N]`` or None.
        hadamard_n, hadamard_block: the online Hadamard applied to ``x`` first (0: none; block 0: the full ``H_n``).
        path: "fused" (the two-launch Triton path of :mod:`.triton_w2a4`: 2-bit, ``G % 16 == 0``, act_bits set;
            ``wsum`` required, ``wplanes`` selects the bit-serial decode kernel); else the reference
            (:func:`.reference.w2a4_linear_reference`) with its product through :func:`w2a4_gemv` on that backend
            ("auto", "torch", "triton").

    No autograd: the op is for inference (a deployed layer); training runs on
    :class:`rcp_lib.quant.linear.QuantLinear`.
    """
    if path not in LINEAR_PATHS:
        raise ValueError(f"path must be one of {LINEAR_PATHS}, got {path!r}")
    if path == "fused" and (wsum is None or not act_bits or bits != 2):
        raise ValueError("path='fused' needs 2-bit weights, act_bits and wsum (rcp_lib.kernels.weight_row_sums)")
    if wsum is None:
        wsum = x.new_empty(0)
    if x.shape[-1] != (2 * K if glu else K):
        raise ValueError(f"x must be [B, {'2K' if glu else 'K'}={2 * K if glu else K}], got {tuple(x.shape)}")
    return torch.ops.rcp.w2a4_linear(x, packed_w, lut, wsum, bias, wplanes, K, G, bits, act_bits or 0,
                                     float(act_clip_ratio), hadamard_n, hadamard_block, path, bool(glu))


def _resolve_backend(backend: "str | None") -> str:
    backend = (backend or os.environ.get(BACKEND_ENV) or "auto").lower()
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' requested but triton is not importable")
    return backend


def w2a4_gemv(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    packed_w: torch.Tensor,
    lut: torch.Tensor,
    K: int,
    G: int,
    bits: int = 2,
    backend: "str | None" = None,
) -> torch.Tensor:
    """W2A4 product ``float32 [B, N] = x_hat[B, K] @ W_hat[N, K]^T``.

    Args:
        x_codes: ``[B, K]`` uint8 activation codes (or float activations with ``x_scale = 1``, ``x_zero = 0``: W2A16).
        x_scale, x_zero: ``[B]`` (or ``[B, 1]``) per-token scale and (float) zero point.
        packed_w: ``int32 [N, ceil(K / (32 // bits))]`` (:func:`rcp_lib.kernels.bitpack.pack_codes`).
        lut: ``[N, ceil(K/G), 2**bits]`` levels (fp16 in the kernel format).
        K, G, bits: input features, group size, weight code width.
        backend: None/"auto" (the registered op), "torch" or "triton" (module docstring).
    Returns:
        ``float32 [B, N]`` on the device of the inputs.
    """
    be = _resolve_backend(backend)
    if be == "torch":
        return w2a4_gemv_reference(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits)
    if be == "triton":
        from .triton_gemv import w2a4_gemv_triton

        return w2a4_gemv_triton(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits)
    return torch.ops.rcp.w2a4_gemv(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits)
