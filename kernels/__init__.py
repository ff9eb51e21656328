"""rcp_lib.kernels (the top-level ``kernels/`` folder): packed non-uniform low-bit weights and the W2A4 GEMV op.

* :mod:`.bitpack`: bit-packing of weight codes (``pack_codes`` / ``unpack_codes``) and LUT dequantization;
* :mod:`.reference`: the pure-torch reference of the op;
* :mod:`.triton_gemv`: the Triton kernel (needs triton; imported on first use);
* :mod:`.op`: the op registered with ``torch.library`` as ``torch.ops.rcp.w2a4_gemv`` (reference by default,
  Triton on CUDA) and :func:`w2a4_gemv`, which calls it or a forced backend.

The activation operands come from :func:`rcp_lib.quant.activations.quantize_per_token`, the integer form of the
activation fake quantizer; the deployed layer is :class:`rcp_lib.packing.PackedLinear`. Importing this package
needs neither a GPU nor triton (without triton, everything but ``w2a4_gemv_triton`` works).

The folder is installed as ``rcp_lib.kernels`` (setuptools ``package-dir``). With the repository root on
``sys.path`` (``PYTHONPATH=.``, or ``python -m`` run from the root) it is also importable as a top-level ``kernels``,
and transformers does import it under that name when it probes for the unrelated Hugging Face ``kernels`` package.
Under any name but ``rcp_lib.kernels`` this module therefore stays empty: the op is registered once, and the
submodules' relative imports of ``rcp_lib`` resolve.
"""

from __future__ import annotations

__all__: list[str] = []

if __name__ == "rcp_lib.kernels":
    from . import bitpack as _bitpack
    from .bitpack import SUPPORTED_BITS, codes_per_word, dequantize, pack_codes, packed_words, unpack_codes
    from .op import triton_available, w2a4_gemv
    from .reference import w2a4_gemv_reference

    __all__ = [*_bitpack.__all__, "w2a4_gemv_reference", "w2a4_gemv", "w2a4_gemv_triton", "triton_available"]

    def __getattr__(name: str):
        if name == "w2a4_gemv_triton":  # imported on first use: importing triton is not free
            try:
                from .triton_gemv import w2a4_gemv_triton
            except Exception as e:  # not installed, or a broken install: the torch path keeps working
                raise ImportError(f"w2a4_gemv_triton needs triton ({e})") from e
            return w2a4_gemv_triton
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
