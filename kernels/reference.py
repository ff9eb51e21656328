"""W2A4 op: per-token A4 activation quantizer, pure-torch reference, dispatcher, and a quantized Linear.

Op-with-reference pattern (as in optimum-quanto): :func:`w2a4_gemv` runs the Triton kernel
(:mod:`rcp_lib.kernels.w2a4_gemv`) when the tensors are on CUDA and triton imports, and the torch reference
:func:`w2a4_gemv_reference` otherwise. Triton is imported lazily, only inside the dispatcher.

Backend selection (``backend`` argument, else the ``RCP_KERNEL_BACKEND`` environment variable, else "auto"):

* ``"auto"``: Triton for CUDA tensors when triton is importable, torch reference otherwise;
* ``"torch"``: always the reference;
* ``"triton"``: always the kernel; on CPU tensors this needs ``TRITON_INTERPRET=1`` (the triton interpreter,
  used by the tests for correctness; ~3000x slower than torch), otherwise a ``RuntimeError``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .packing import dequantize, pack_codes, unpack_codes

__all__ = [
    "quantize_activation_a4",
    "quantize_activation",
    "dequantize_activation",
    "w2a4_gemv_reference",
    "w2a4_gemv",
    "triton_available",
    "QuantizedLinearW2A4",
]

BACKEND_ENV = "RCP_KERNEL_BACKEND"


# ----------------------------------------------------------------------------------------------- activations
def quantize_activation(
    x: torch.Tensor, bits: int = 4, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (last-dim row) asymmetric quantization to ``bits`` bits.

    ``scale = clip_ratio*(max - min) / (2**bits - 1)`` (min/max over the row, with 0 included so that
    exact zeros stay exact), ``zero = round(-clip_ratio*min / scale)``,
    ``codes = clamp(round(x / scale) + zero, 0, 2**bits - 1)``; dequantization is ``(codes - zero) * scale``.
    With ``clip_ratio = 1`` every element is within ``scale / 2`` of its dequantized value.

    Args:
        x: ``[..., K]`` float tensor (any float dtype; computed in fp32).
        bits: 1..8. clip_ratio: in (0, 1], shrinks the range (QuaRot uses 0.9 for activations).

    Returns:
        ``(codes uint8 [..., K], scale fp32 [...], zero fp32 [...])``.
    """
    if not 1 <= bits <= 8:
        raise ValueError("bits must be in 1..8")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError("clip_ratio must be in (0, 1]")
    qmax = (1 << bits) - 1
    xf = x.to(torch.float32)
    xmin = xf.amin(dim=-1).clamp(max=0.0) * clip_ratio
    xmax = xf.amax(dim=-1).clamp(min=0.0) * clip_ratio
    scale = ((xmax - xmin) / qmax).clamp(min=1e-8)
    zero = torch.round(-xmin / scale)
    codes = torch.clamp(torch.round(xf / scale.unsqueeze(-1)) + zero.unsqueeze(-1), 0, qmax)
    return codes.to(torch.uint8), scale, zero


def quantize_activation_a4(
    x: torch.Tensor, clip_ratio: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric 4-bit quantization: ``(codes uint8 [..., K] in 0..15, scale fp32 [...], zero fp32 [...])``.

    See :func:`quantize_activation`; ``x_hat = (codes - zero) * scale``.
    """
    return quantize_activation(x, 4, clip_ratio)


def dequantize_activation(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` in fp32, broadcasting ``scale``/``zero`` ``[...]`` over the last dim of ``codes``."""
    return (codes.to(torch.float32) - zero.to(torch.float32).unsqueeze(-1)) * scale.to(torch.float32).unsqueeze(-1)


# ----------------------------------------------------------------------------------------------- op
def w2a4_gemv_reference(
    x_codes: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero: torch.Tensor,
    packed_w: torch.Tensor,
    lut: torch.Tensor,
    K: int,
    G: int,
    bits: int = 2,
) -> torch.Tensor:
    """Pure-torch reference of the W2A4 op (fp32 accumulation).

    Args:
        x_codes: ``[B, K]`` uint8 A4 codes (or float activations with ``x_scale = 1``, ``x_zero = 0``).
        x_scale, x_zero: ``[B]`` (or ``[B, 1]``) per-token scale / zero point.
        packed_w: ``int32 [N, ceil(K/16)]`` packed 2-bit codes (``32 // bits`` per word in general).
        lut: ``[N, ceil(K/G), 2**bits]`` fp16 levels. K, G, bits: input size, group size, code width.

    Returns:
        ``y = x_hat @ W_hat^T``, ``float32 [B, N]``.
    """
    B = x_codes.shape[0]
    w = dequantize(packed_w, lut, K, G, bits, dtype=torch.float32)  # [N, K]
    xh = dequantize_activation(x_codes, x_scale.reshape(B), x_zero.reshape(B))  # [B, K]
    return xh @ w.t()


_TRITON_OK: bool | None = None


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


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    backend = (backend or os.environ.get(BACKEND_ENV) or "auto").lower()
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
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
    backend: str | None = None,
) -> torch.Tensor:
    """Dispatching W2A4 op: ``float32 [B, N] = x_hat[B, K] @ W_hat[N, K]^T``.

    Same arguments as :func:`w2a4_gemv_reference`; ``backend`` as described in the module docstring.
    """
    if _resolve_backend(backend, x_codes.device) == "triton":
        from .w2a4_gemv import w2a4_gemv_triton

        return w2a4_gemv_triton(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits)
    return w2a4_gemv_reference(x_codes, x_scale, x_zero, packed_w, lut, K, G, bits)


# ----------------------------------------------------------------------------------------------- module
class QuantizedLinearW2A4(nn.Module):
    """Inference linear layer with packed non-uniform low-bit weights and (optionally) A4 inputs.

    Buffers: ``packed`` (int32 ``[N, ceil(K / (32 // bits))]``), ``lut`` (fp16 ``[N, ceil(K/G), 2**bits]``),
    ``bias`` (``[N]`` or None). ``forward(x [..., K]) -> [..., N]`` in ``x.dtype``: with ``a4=True`` the input
    is quantized per token to 4 bits (asymmetric, ``clip_ratio``), otherwise it is used as is (W2A16);
    then :func:`w2a4_gemv` computes the product in fp32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bits: int = 2,
        bias: bool = False,
        a4: bool = True,
        clip_ratio: float = 1.0,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size, self.bits = in_features, out_features, group_size, bits
        self.a4, self.clip_ratio, self.backend = a4, clip_ratio, backend
        kw = -(-in_features // (32 // bits))
        ng = -(-in_features // group_size)
        self.register_buffer("packed", torch.zeros(out_features, kw, dtype=torch.int32))
        self.register_buffer("lut", torch.zeros(out_features, ng, 1 << bits, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)

    @classmethod
    def from_codes_levels(
        cls,
        codes: torch.Tensor,
        levels: torch.Tensor,
        bias: torch.Tensor | None = None,
        a4: bool = True,
        clip_ratio: float = 1.0,
        bits: int = 2,
        backend: str | None = None,
    ) -> "QuantizedLinearW2A4":
        """Build from hard codes ``uint8 [N, K]`` and levels ``[N, K/G, 2**bits]`` (G inferred as ``ceil(K/ng)``).

        The levels are stored in fp16 (that rounding is part of the format); the bias keeps its dtype.
        """
        N, K = codes.shape
        if levels.dim() != 3 or levels.shape[0] != N or levels.shape[2] != (1 << bits):
            raise ValueError(f"levels must be [N={N}, K/G, {1 << bits}], got {tuple(levels.shape)}")
        ng = levels.shape[1]
        G = -(-K // ng)
        if -(-K // G) != ng:
            raise ValueError(f"cannot infer a group size from K={K} and {ng} groups")
        m = cls(K, N, G, bits=bits, bias=bias is not None, a4=a4, clip_ratio=clip_ratio, backend=backend)
        m.packed = pack_codes(codes, bits)
        m.lut = levels.detach().to(torch.float16).contiguous()
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def codes(self) -> torch.Tensor:
        """Unpacked codes, ``uint8 [N, K]``."""
        return unpack_codes(self.packed, self.in_features, self.bits)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [N, K]`` in ``dtype``."""
        return dequantize(self.packed, self.lut, self.in_features, self.group_size, self.bits, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.a4:
            codes, scale, zero = quantize_activation_a4(x2, self.clip_ratio)
        else:
            codes = x2.to(torch.float32)
            scale = torch.ones(x2.shape[0], device=x.device, dtype=torch.float32)
            zero = torch.zeros_like(scale)
        y = w2a4_gemv(codes, scale, zero, self.packed, self.lut, self.in_features, self.group_size, self.bits, self.backend)
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, a4={self.a4}, clip_ratio={self.clip_ratio}, bias={self.bias is not None}"
        )
