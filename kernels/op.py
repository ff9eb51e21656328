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

The op keeps natural-order codes and any group size; :class:`rcp_lib.packing.PackedLinear` on CUDA uses the fused
two-launch path of :mod:`.triton_w2a4` instead where it applies (2-bit, ``G % 16 == 0``).

The activation operands are the integer form of the per-token activation quantizer,
:func:`rcp_lib.quant.activations.quantize_per_token` (``x_hat = (x_codes - x_zero) * x_scale``, float zero point).
"""

# no ``from __future__ import annotations``: custom_op reads the schema from the (evaluated) annotations
import os

import torch

from .reference import w2a4_gemv_reference

__all__ = ["w2a4_gemv", "triton_available", "BACKEND_ENV"]

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
