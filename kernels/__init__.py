"""rcp_lib.kernels (the top-level ``kernels/`` folder): packed non-uniform low-bit weights and the W2A4 GEMV op.

* :mod:`.bitpack`: bit-packing of weight codes (``pack_codes`` / ``unpack_codes``) and LUT dequantization (the
  stored format, unchanged by the kernels);
* :mod:`.reference`: the pure-torch reference of the op;
* :mod:`.triton_gemv`: the generic Triton kernel of the op (any G, 1/2/4/8-bit weights, natural-order codes; needs
  triton; imported on first use);
* :mod:`.op`: the op registered with ``torch.library`` as ``torch.ops.rcp.w2a4_gemv`` (reference by default,
  the generic Triton kernel on CUDA) and :func:`w2a4_gemv`, which calls it or a forced backend;
* :mod:`.triton_w2a4`: the fused path that :class:`rcp_lib.kernels.packed_linear.PackedLinear` runs on CUDA (2-bit weights,
  ``G % 16 == 0``): launch 1, an activation pre-kernel (optional online Hadamard, :func:`.triton_w2a4.hadamard_supported`, + the per-token
  quantizer of ``quantize_per_token``, operation for operation); launch 2, a split-K GEMV (<= 4 tokens) or a
  ``tl.dot`` GEMM (prefill) with 128-bit weight loads, levels selected in registers, a pipelined K loop, fp32
  accumulation and an epilogue that applies scale, float zero point and bias; autotuned per (N, K, batch). A second
  decode kernel, bit-serial (``PackedLinear(gemv_format="bitplane")``): weight and activation bit planes, 12 ANDs
  and popcounts per 32 weights, the four levels applied once per group, in one launch that quantizes its own
  activations (no pre-kernel) unless the layer's Hadamard runs in the pre-kernel. Speed: ``python benchmarks/bench_kernel.py``
  on a GPU (``results/gpu/kernel_speed.csv``; the bit-serial kernel not yet measured);
* :mod:`.packed_linear`: the deployed layer :class:`~rcp_lib.kernels.packed_linear.PackedLinear` and the choice of the
  path that computes it (import it from there, or from :mod:`rcp_lib.deploy`);
* :mod:`.layout`: what the fused path derives at deploy time: the activation order that matches the stored words
  (``activation_permutation``), the weight row sums that carry the float zero point (``weight_row_sums``) and the
  bit planes of the bit-serial kernel (``weight_bitplanes``, ``activation_bitplanes``).

The activation operands come from :func:`rcp_lib.quant.activations.quantize_per_token`, the integer form of the
activation fake quantizer; the deployed layer is :class:`rcp_lib.kernels.packed_linear.PackedLinear`. Importing this package
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
    from . import layout as _layout
    from .layout import (GEMV_FORMATS, activation_bitplanes, activation_permutation, bitplane_layout_supported,
                         bitplanes_to_codes, fused_layout_supported, permute_activations, unpermute_activations,
                         weight_bitplanes, weight_bitplanes_to_packed, weight_row_sums)
    from .op import triton_available, w2a4_gemv
    from .reference import w2a4_gemv_reference

    __all__ = [*_bitpack.__all__, *_layout.__all__, "w2a4_gemv_reference", "w2a4_gemv", "w2a4_gemv_triton",
               "triton_available"]

    def __getattr__(name: str):
        if name == "w2a4_gemv_triton":  # imported on first use: importing triton is not free
            try:
                from .triton_gemv import w2a4_gemv_triton
            except Exception as e:  # not installed, or a broken install: the torch path keeps working
                raise ImportError(f"w2a4_gemv_triton needs triton ({e})") from e
            return w2a4_gemv_triton
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
