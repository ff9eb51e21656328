"""rcp_lib.kernels: packed non-uniform low-bit weights and the W2A4 GEMV op (Triton kernel + torch reference).

Importing this package needs neither a GPU nor triton. When triton is installed, the kernel module
:mod:`rcp_lib.kernels.w2a4_gemv` is imported here (cheap: the kernel itself is JIT-decorated at first launch,
so ``TRITON_INTERPRET`` may still be set afterwards); it is imported *before* the dispatcher function
``w2a4_gemv`` is bound, so the package attribute ``w2a4_gemv`` is the function, not the same-named submodule.
Without triton, everything but ``w2a4_gemv_triton`` works (the dispatcher falls back to the torch reference).
"""

from __future__ import annotations

import importlib.util as _ilu

_TRITON_IMPORT_ERROR: Exception | None = None
if _ilu.find_spec("triton") is not None:
    try:
        from . import w2a4_gemv as _w2a4_gemv_module  # noqa: F401  (must precede the function import below)
        from .w2a4_gemv import w2a4_gemv_triton
    except Exception as e:  # a broken triton install must not break the torch path
        _TRITON_IMPORT_ERROR = e

from .packing import (
    SUPPORTED_BITS,
    codes_per_word,
    dequantize,
    nearest_level_codes,
    pack_codes,
    packed_words,
    uniform_levels,
    unpack_codes,
)
from .reference import (
    QuantizedLinearW2A4,
    dequantize_activation,
    quantize_activation,
    quantize_activation_a4,
    triton_available,
    w2a4_gemv,
    w2a4_gemv_reference,
)

__all__ = [
    "SUPPORTED_BITS",
    "codes_per_word",
    "packed_words",
    "pack_codes",
    "unpack_codes",
    "dequantize",
    "nearest_level_codes",
    "uniform_levels",
    "quantize_activation",
    "quantize_activation_a4",
    "dequantize_activation",
    "w2a4_gemv_reference",
    "w2a4_gemv",
    "w2a4_gemv_triton",
    "triton_available",
    "QuantizedLinearW2A4",
]


def __getattr__(name: str):
    if name == "w2a4_gemv_triton":
        raise ImportError(f"w2a4_gemv_triton needs triton ({_TRITON_IMPORT_ERROR or 'not installed'})")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
