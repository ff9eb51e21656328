"""The deployed layer: :class:`PackedLinear`, the packed form of a :class:`~rcp_lib.quant.linear.QuantLinear`, and
the choice of the path that computes it (the registered op ``torch.ops.rcp.w2a4_linear`` of :mod:`.op`: its
reference, the generic Triton GEMV, or the fused Triton path; the CPU decode cache).

It lives beside the kernels it dispatches to; the saved format that stores its tensors and the transformers
quantizer that builds it are :mod:`rcp_lib.deploy`. Importing this module needs neither a GPU nor triton.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.activations import fake_quant_per_token
from ..quant.linear import QuantLinear
from ..rotation.online import OnlineHadamard
from .bitpack import SUPPORTED_BITS, dequantize, pack_codes

__all__ = ["PackedLinear", "SharedInputLinear", "SharedInputSlice", "GatedMLP", "clear_shared_inputs", "deploy_bits",
           "check_gemv_format"]


def deploy_bits(levels: int, name: str) -> int:
    """``bits`` with ``2**bits == levels`` and ``bits`` in SUPPORTED_BITS (what :class:`PackedLinear` runs)."""
    bits = int(round(math.log2(levels)))
    if bits not in SUPPORTED_BITS or 2**bits != levels:
        raise NotImplementedError(f"{name}: {levels} levels ({bits} bits) cannot be packed; supported bits: {SUPPORTED_BITS}")
    return bits


def check_gemv_format(fmt: str) -> str:
    from .layout import GEMV_FORMATS

    if fmt not in GEMV_FORMATS:
        raise ValueError(f"gemv_format must be one of {GEMV_FORMATS}, got {fmt!r}")
    return fmt


#: the decode caches of every PackedLinear of the process: bytes held, whether the "full" warning was given, a lock
#: (finalizers may run on any thread). Each reservation releases into the budget it was taken from.
_DECODE_BUDGET: dict = {"bytes": 0, "warned": False, "lock": threading.Lock()}


def _reserve_decoded(w: torch.Tensor, max_bytes: int) -> bool:
    """Account a decoded weight ``w`` against the process-wide decode-cache budget: True (and counted until ``w`` is
    freed) when it fits in ``max_bytes``; else False and, once per process, a warning that names the budget."""
    import warnings
    import weakref

    budget = _DECODE_BUDGET
    nb = w.numel() * w.element_size()
    with budget["lock"]:
        fits = budget["bytes"] + nb <= max_bytes
        if fits:
            budget["bytes"] += nb
        warn, held = not fits and not budget["warned"], budget["bytes"]
        if warn:
            budget["warned"] = True
    if fits:
        weakref.finalize(w, _release_decoded, budget, nb)
    elif warn:
        warnings.warn(f"PackedLinear decode cache full ({held / 2**30:.2f} of {max_bytes / 2**30:.2f} GiB): the remaining "
                      f"projections decode their codes on every call (the same numbers, slower). Raise "
                      f"PackedLinear.decode_cache_max_bytes to keep more.", stacklevel=4)
    return fits


def _release_decoded(budget: dict, nb: int) -> None:
    with budget["lock"]:
        budget["bytes"] -= nb


def _fusable_hadamard(t: OnlineHadamard) -> bool:
    """Whether the fused path's pre-kernel builds this online Hadamard (:func:`.triton_w2a4.hadamard_supported`)."""
    from .triton_w2a4 import hadamard_supported

    return hadamard_supported(t.n, t.block)


class PackedLinear(nn.Module):
    """The deployed form of a :class:`~rcp_lib.quant.linear.QuantLinear`: packed codes + LUT, computed by the registered
    op ``torch.ops.rcp.w2a4_linear`` (:func:`rcp_lib.kernels.op.w2a4_linear`, with a fake for meta tensors and
    ``torch.compile``) on the path :meth:`kernel_path` picks: its reference, whose product is ``torch.ops.rcp.w2a4_gemv``
    (torch on CPU, Triton on CUDA), or the fused Triton path. Only the CPU decode cache (below) bypasses the op.

    Buffers: ``qweight`` int32 ``[N, ceil(K / (32 // bits))]`` (:func:`rcp_lib.kernels.bitpack.pack_codes`), ``lut``
    ``[N, K / G, 2**bits]`` (fp16 in the kernel format, float32 for exact round trips), ``bias`` ``[N]`` or None.

    ``forward(x [..., K]) -> [..., N]`` in ``x.dtype``: optional online rotation (R4), then the per-token activation
    quantizer of fake quantization in its integer form (:func:`rcp_lib.quant.activations.quantize_per_token`, formula
    and float zero point documented there), then ``x̂ Ŵᵀ`` with fp32 accumulation. With ``act_bits=None`` the input
    stays in full precision and the weight is dequantized on the fly. On the CPU the decode cache (below) replaces
    both by the fake quantizer's own operations on a cached ``Ŵ``.

    Backends (``backend``, else ``$RCP_KERNEL_BACKEND``, else "auto"): on CUDA with triton, when
    :meth:`fused_supported` (every W2 layer with G = 128), "triton" runs the fused two-launch path of
    :mod:`rcp_lib.kernels.triton_w2a4` (pre-kernel: the online R4 Hadamard where
    :func:`~.triton_w2a4.hadamard_supported` + the same per-token quantizer; then split-K GEMV for <= 4 tokens, ``tl.dot`` GEMM above; bias in the epilogue); other
    layers call ``torch.ops.rcp.w2a4_gemv``. "auto" (the default) calls ``torch.ops.rcp.w2a4_gemv`` everywhere for
    now: the fused path has not yet passed the whole-model check on a GPU (see :meth:`_use_fused`). "triton" forces
    the fused path (CPU tensors need ``TRITON_INTERPRET=1``), "torch" the reference. The stored tensors are the same for every
    backend; the fused path derives ``wsum`` (:meth:`kernel_weights`) once per device.

    ``gemv_format`` picks the fused path's decode kernel (:data:`rcp_lib.kernels.layout.GEMV_FORMATS`): "select"
    (default: the stored words, each weight's level selected in registers; the kernel measured on a GPU),
    "bitplane" (the bit-serial kernel on weight bit planes derived once per device, :meth:`kernel_planes`; fewer
    instructions per weight in its sm_90 code, speed not yet measured) or "bitplane_tiled" (the same kernel on the
    planes and levels interleaved per row and group, :meth:`kernel_tiles`: one stream per row; not measured).

    Decode cache (``decode_cache``, default True; the class attribute, or per layer): on the CPU (where the torch
    reference would compute the layer, i.e. not under the "triton" backend) the decoded weight ``W_hat [N, K]``
    (:meth:`dequantized_weight`, in the input's dtype) is kept on the module after the first call (keyed like
    :meth:`kernel_weights`: rebuilt when ``qweight`` or ``lut`` change), and each call runs the operations of the
    fake-quantized :class:`~rcp_lib.quant.linear.QuantLinear` on it: input transform,
    :func:`~rcp_lib.quant.activations.fake_quant_per_token` (the value ``lo + s * c`` of the same codes), then
    ``F.linear(x_hat, W_hat, bias)``. So a packed folder stored as evaluated (``save_quantized``'s default) computes
    the evaluated model bit for bit on a CPU, instead of the W2A4 op's integer form ``(c - zero) * s``, which agrees
    only to float rounding: enough for an activation code to flip on a tie, and a 2-bit PTQ model (perplexity in
    the millions) turns one flip into a different perplexity. Memory cost: a float32 copy of every packed
    projection (4 bytes per weight, 8-13x the packed codes + LUT at 2 bits and G = 64..128; 0.42 GB for
    SmolLM2-135M), the price of generating near FP speed on a CPU (``benchmarks/packed_cpu_speed.py``).
    ``decode_cache = False`` keeps only the packed form and calls the W2A4 op (which decodes the codes on every call).
    CUDA never uses the cache.
    """

    #: keep the decoded float32 weight on the CPU (class docstring); False: decode the packed codes on every call
    decode_cache: bool = True
    #: the most bytes the decode caches of all layers of the process hold together (8 GiB: SmolLM2-135M needs 0.42 GB,
    #: LLaMA-2-7B 26 GB in float32); a layer that would exceed it decodes on every call instead, with one warning
    decode_cache_max_bytes: int = 8 * 2**30

    def __init__(self, qweight: torch.Tensor, lut: torch.Tensor, K: int, group_size: int, bits: int,
                 bias: torch.Tensor | None, act_bits: int | None, act_clip_ratio: float,
                 input_transform: nn.Module | None = None, backend: str | None = None, gemv_format: str = "select"):
        super().__init__()
        self.gemv_format = check_gemv_format(gemv_format)
        self.register_buffer("qweight", qweight)
        self.register_buffer("lut", lut)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = K, lut.shape[0]
        self.group_size, self.bits = group_size, bits
        self.act_bits, self.act_clip_ratio = act_bits, act_clip_ratio
        self.input_transform = input_transform
        self.backend = backend

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, q: QuantLinear, lut_dtype: torch.dtype = torch.float16, backend: str | None = None,
                          name: str = "layer") -> "PackedLinear":
        """Deploy a fake-quantized layer: its exported codes packed, its levels as the LUT (in ``lut_dtype``), its
        bias, activation quantizer settings and input transform (shared, not copied).

        Raises:
            ValueError: ``q`` has no weight quantizer. NotImplementedError: levels not ``2**bits`` for ``bits`` in
                :data:`rcp_lib.kernels.bitpack.SUPPORTED_BITS`.
        """
        if q.weight_quantizer is None:
            raise ValueError(f"{name}: a QuantLinear without weight quantizer has nothing to pack")
        codes, levels = q.export()  # uint8 [N, K], float32 [N, K/G, L]
        K = codes.shape[1]
        bits = deploy_bits(levels.shape[-1], name)
        bias = None if q.bias is None else q.bias.detach().clone()
        return cls(pack_codes(codes, bits), levels.to(lut_dtype).contiguous(), K, K // levels.shape[1], bits, bias,
                   q.act_bits, q.act_clip_ratio, q.input_transform, backend)

    @classmethod
    def empty(cls, N: int, K: int, group_size: int, bits: int, bias: bool, act_bits: int | None,
              act_clip_ratio: float, lut_dtype: torch.dtype = torch.float16, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "meta") -> "PackedLinear":
        """A layer with uninitialised buffers of the stored shapes (``qweight`` int32 ``[N, ceil(K / (32 // bits))]``,
        ``lut`` ``[N, K / G, 2**bits]`` in ``lut_dtype``, ``bias`` ``[N]`` in ``dtype``), on ``device`` (meta: a
        skeleton that a checkpoint loader fills, see :func:`rcp_lib.deploy.install_packed_layers`)."""
        qweight = torch.empty(N, -(-K // (32 // bits)), dtype=torch.int32, device=device)
        lut = torch.empty(N, K // group_size, 2**bits, dtype=lut_dtype, device=device)
        b = torch.empty(N, dtype=dtype, device=device) if bias else None
        return cls(qweight, lut, K, group_size, bits, b, act_bits, act_clip_ratio)

    #: the attributes that the layers merged by :meth:`concat` must share (compared with ``!=``)
    _CONCAT_SAME = ("in_features", "group_size", "bits", "act_bits", "act_clip_ratio", "backend", "gemv_format")

    @classmethod
    @torch.no_grad()
    def concat(cls, layers: Sequence["PackedLinear"], names: Sequence[str] | None = None) -> "PackedLinear":
        """One layer that computes ``layers`` side by side on an input they share: its rows are theirs, stacked
        (``qweight [sum N, words]``, ``lut [sum N, K / G, 2**bits]``, ``bias [sum N]``), so ``y[..., a:b]`` of the
        merged layer is the product of the layer whose rows are ``a:b``, computed from one activation quantization
        and (on the fused path) one launch instead of one per layer. Every row reads only its own codes and levels
        and the shared activation codes, so a slice differs from its layer's own output only where the product's
        summation order depends on N (BLAS blocking on the CPU, a tuned configuration on a GPU).

        Raises:
            ValueError: fewer than two layers, or layers that differ in input size, group size, bits, activation
                bits or clip, backend, ``gemv_format``, LUT dtype, device, input transform (the same module or none)
                or bias presence: the message names the first such pair (``names``: how to call them).
        """
        names = list(names) if names is not None else [f"layer {i}" for i in range(len(layers))]
        if len(layers) < 2 or len(names) != len(layers):
            raise ValueError(f"concat needs at least two layers and one name each, got {len(layers)} and {len(names)}")
        for name, m in zip(names, layers):
            if not isinstance(m, PackedLinear):
                raise ValueError(f"{name} is a {type(m).__name__}, not a PackedLinear")
        first = layers[0]
        for name, m in zip(names[1:], layers[1:]):
            pairs = [(a, getattr(first, a), getattr(m, a)) for a in cls._CONCAT_SAME]
            pairs += [("lut dtype", first.lut.dtype, m.lut.dtype), ("device", first.qweight.device, m.qweight.device),
                      ("bias", first.bias is not None, m.bias is not None)]
            diff = [d for d in pairs if d[1] != d[2]]
            if m.input_transform is not first.input_transform:  # the same module (or none), not an equal one
                diff.append(("input transform", first.input_transform, m.input_transform))
            if diff:
                what, a, b = diff[0]
                raise ValueError(f"cannot merge {names[0]} and {name}: {what} {a!r} vs {b!r} (merged layers share "
                                 f"their input, its quantizer and their kernel)")
        bias = None if first.bias is None else torch.cat([m.bias for m in layers])
        out = cls(torch.cat([m.qweight for m in layers]), torch.cat([m.lut for m in layers]), first.in_features,
                  first.group_size, first.bits, bias, first.act_bits, first.act_clip_ratio, first.input_transform,
                  first.backend, first.gemv_format)
        if "decode_cache" in first.__dict__:  # set on the layer, not the class default
            out.decode_cache = first.decode_cache
        return out

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [N, K]`` in ``dtype`` (the LUT values converted, not re-rounded)."""
        return dequantize(self.qweight, self.lut, self.in_features, self.group_size, self.bits, dtype=dtype)

    def fused_supported(self) -> bool:
        """Whether the fused two-launch Triton path (:mod:`rcp_lib.kernels.triton_w2a4`) can run this layer: 2-bit
        weights, ``G % 16 == 0``, ``K % G == 0``, an fp16 / fp32 LUT, A-bits set, no input transform other than
        :class:`~rcp_lib.rotation.online.OnlineHadamard`."""
        from .layout import fused_layout_supported

        t = self.input_transform
        return (self.act_bits is not None and fused_layout_supported(self.in_features, self.group_size, self.bits)
                and self.lut.dtype in (torch.float16, torch.float32) and self.in_features <= 32768
                and (t is None or isinstance(t, OnlineHadamard)))

    def _use_fused(self, x: torch.Tensor) -> bool:
        from .op import _resolve_backend

        be = _resolve_backend(self.backend)
        if be == "torch" or not self.fused_supported():
            return False
        if be == "auto":
            # Not by default yet: on one H100 the fused path agreed with fake quantization layer by layer (<= 4e-6,
            # up to 16 tokens) and in the GEMM alone (up to 200 tokens), but a whole 4-layer model loaded on CUDA did
            # not (relative logits 0.24, against 5e-4 with the reference); until benchmarks/gpu_check.py's export
            # section passes with it, "auto" keeps the reference op and the fused path is opt-in ("triton").
            return False
        return True  # "triton": on CPU tensors only under TRITON_INTERPRET=1 (the kernels raise otherwise)

    @torch.no_grad()
    def kernel_weights(self) -> torch.Tensor:
        """The derived operand of the fused path: ``wsum [N]`` float32, the row sums of ``W_hat``
        (:func:`rcp_lib.kernels.layout.weight_row_sums`), computed once per device and weight version and cached on
        the module (not a buffer: not saved). Call it before capturing a CUDA graph."""
        return self._derived("wsum")

    @torch.no_grad()
    def kernel_tiles(self) -> torch.Tensor:
        """The bit-serial kernel's planes and levels interleaved per (row, group), int32 ``[N, K / G * R]``
        (:func:`rcp_lib.kernels.layout.weight_tiles`, ``gemv_format="bitplane_tiled"``), cached like
        :meth:`kernel_weights` (not saved)."""
        return self._derived("tiles")

    @torch.no_grad()
    def kernel_planes(self) -> torch.Tensor:
        """The weight bit planes of the bit-serial decode kernel, int32 ``[N, 2, K / 32]``
        (:func:`rcp_lib.kernels.layout.weight_bitplanes`), cached like :meth:`kernel_weights` (not saved)."""
        return self._derived("planes")

    def _derived(self, what: str) -> torch.Tensor:
        from .layout import weight_bitplanes, weight_row_sums, weight_tiles

        # the tensors themselves (not their addresses, which a new tensor may reuse) and their in-place versions
        key = (self.qweight, self.qweight._version, self.lut, self.lut._version)
        cache = getattr(self, "_kernel_cache", None)
        if cache is None or not (cache[0][0] is key[0] and cache[0][2] is key[2] and cache[0][1::2] == key[1::2]):
            cache = (key, {})
            self._kernel_cache = cache
        if what not in cache[1]:
            if what.startswith("decoded:"):  # "decoded:<dtype>": W_hat in that dtype (the decode cache)
                w = self.dequantized_weight(getattr(torch, what.split(":", 1)[1]))
                if not _reserve_decoded(w, self.decode_cache_max_bytes):
                    return w  # over the budget: used for this call, not kept
                cache[1][what] = w
            elif what == "wsum":
                cache[1][what] = weight_row_sums(self.qweight, self.lut, self.in_features, self.group_size, self.bits)
            elif what == "tiles":
                cache[1][what] = weight_tiles(self._derived("planes"), self.lut, self.group_size)
            else:
                cache[1][what] = weight_bitplanes(self.qweight, self.in_features)
        return cache[1][what]

    def __getstate__(self) -> dict:
        """Copies and pickles leave the derived tensors (decode cache, kernel layouts) behind: rebuilt on first use,
        so a deep copy never holds decoded weights outside the budget."""
        state = super().__getstate__()
        state.pop("_kernel_cache", None)
        return state

    def _use_decode_cache(self, x: torch.Tensor) -> bool:
        """Whether this call runs on the cached ``W_hat`` (:attr:`decode_cache`, CPU tensors, a backend that would
        run the torch reference)."""
        from .op import _resolve_backend

        return (self.decode_cache and x.device.type == "cpu" and self.qweight.device.type == "cpu"
                and _resolve_backend(self.backend) != "triton")

    def _bitplane(self) -> bool:
        from .layout import bitplane_layout_supported

        return self.gemv_format != "select" and bitplane_layout_supported(self.in_features, self.group_size,
                                                                             self.bits)

    def kernel_path(self, x: torch.Tensor) -> str:
        """The path of ``torch.ops.rcp.w2a4_linear`` this call takes (:data:`rcp_lib.kernels.op.LINEAR_PATHS`):
        "fused" where :meth:`_use_fused` allows it, else the backend of the product (``self.backend``, else
        ``RCP_KERNEL_BACKEND``, else "auto": the registered GEMV op's device dispatch)."""
        from .op import _resolve_backend

        return "fused" if self._use_fused(x) else _resolve_backend(self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K]`` -> ``[..., N]`` in ``x.dtype``."""
        return self._forward(x, glu=False)

    def forward_glu(self, gu: torch.Tensor) -> torch.Tensor:
        """``forward(F.silu(gate) * up)`` for ``gu [..., 2K]`` = ``[gate | up]``, a merged gate / up projection's
        output: the down projection of a gated MLP (:class:`GatedMLP`). On the fused path the SiLU and the product run
        inside the kernel that quantizes the activations (``glu`` of :func:`rcp_lib.kernels.op.w2a4_linear`); on every
        other path they are the MLP's own two torch ops (:func:`rcp_lib.kernels.reference.glu_input`), so the output
        equals ``forward(F.silu(gate) * up)`` bit for bit."""
        if gu.shape[-1] != 2 * self.in_features:
            raise ValueError(f"forward_glu takes [..., 2K={2 * self.in_features}] = [gate | up], got {tuple(gu.shape)}")
        return self._forward(gu, glu=True)

    def glu_in_kernel(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_glu` on ``x`` (its device decides the path) computes the SiLU and the product inside
        the kernel that quantizes the activations: the fused path, with no input transform or one the pre-kernel
        builds. False where they run as the MLP's two torch ops before the product: another path, or an online
        Hadamard the pre-kernel does not build (:func:`.triton_w2a4.hadamard_supported`; e.g. LLaMA-2-7B's 11008)."""
        if self._use_decode_cache(x) or self.kernel_path(x) != "fused":
            return False
        return self.input_transform is None or self._hadamard_in_prekernel()

    def _hadamard_in_prekernel(self) -> bool:
        """Whether the fused path's pre-kernel applies this layer's input transform itself (a supported
        :class:`OnlineHadamard`); any other transform runs in torch before the op."""
        t = self.input_transform
        return isinstance(t, OnlineHadamard) and _fusable_hadamard(t)

    def _forward(self, x: torch.Tensor, glu: bool) -> torch.Tensor:
        from .op import w2a4_linear
        from .reference import glu_input

        lead = x.shape[:-1]
        t = self.input_transform
        if self._use_decode_cache(x):  # QuantLinear.forward's own operations on the cached W_hat (class docstring)
            if glu:
                x = glu_input(x)
            if t is not None:
                x = t(x)
            if self.act_bits is not None:
                x = fake_quant_per_token(x, self.act_bits, self.act_clip_ratio)
            w = self._derived("decoded:" + str(x.dtype).replace("torch.", ""))
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        path = self.kernel_path(x)
        fused = path == "fused"
        # the pre-kernel fuses a supported Hadamard (block or full); any other input transform runs in torch first
        from_op = fused and self._hadamard_in_prekernel()
        if t is not None and not from_op:
            if glu:  # the product comes before a transform that runs in torch
                x, glu = glu_input(x), False
            x = t(x)
        y = w2a4_linear(x.reshape(-1, x.shape[-1]), self.qweight, self.lut, self.in_features, self.group_size,
                        self.bits, self.act_bits, self.act_clip_ratio, self.bias,
                        hadamard_n=t.n if from_op else 0, hadamard_block=(t.block or 0) if from_op else 0, path=path,
                        wsum=self.kernel_weights() if fused else None,
                        wplanes=((self.kernel_tiles() if self.gemv_format == "bitplane_tiled" else self.kernel_planes())
                                 if fused and self._bitplane() else None), glu=glu)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        a = "a16" if self.act_bits is None else f"a{self.act_bits} clip {self.act_clip_ratio}"
        return f"in={self.in_features}, out={self.out_features}, w{self.bits} group {self.group_size}, {a}"


class SharedInputLinear(nn.Module):
    """Projections that read one input tensor (a block's q / k / v, or gate / up: :func:`rcp_lib.models.
    shared_input_groups`), computed together by one merged :class:`PackedLinear` (:meth:`PackedLinear.concat`).

    The model keeps calling its projections one by one (``q_proj(h)``, ``k_proj(h)``, ``v_proj(h)``); each is a
    :class:`SharedInputSlice` whose call :meth:`take` answers from one product per input tensor: the first call on
    ``x`` runs ``linear(x)`` (``[..., sum N]``) and keeps its slices, the later calls on the same tensor object (same
    in-place version) take theirs, and the last one taken drops them. A call on another tensor, or a slice taken a
    second time, computes anew. What identity and version cannot see, an in-place change that bumps no version
    (``x.data``, or any change of an inference-mode tensor) between the slices of one input, is ruled out by
    :func:`rcp_lib.deploy.merge_shared_inputs`, which registers the group on the module that calls its projections
    (a block's attention or MLP) and drops any kept product at every call of that module (:func:`clear_shared_inputs`):
    a product lives for one call of the module that owns it. The slices are views (``torch.split``) of the merged
    output: contiguous in their last dimension, not as a whole.

    Eager mode and CUDA-graph capture (the capture records the merged launch once); not meant for ``torch.compile``,
    whose tracing would guard on tensor identity. Not saved: :func:`rcp_lib.deploy.save_quantized` refuses a merged
    model (merging is a deploy-time layout).
    """

    def __init__(self, linear: PackedLinear, sizes: Sequence[int], names: Sequence[str]):
        super().__init__()
        if sum(sizes) != linear.out_features or len(sizes) != len(names):
            raise ValueError(f"sizes {list(sizes)} for {list(names)} do not split {linear.out_features} outputs")
        self.linear = linear
        self.sizes, self.names = tuple(int(n) for n in sizes), tuple(names)
        self._pending: tuple | None = None  # (x, its version, outputs, indices not yet taken)

    def clear(self) -> None:
        """Drop a kept product (the next slice computes anew)."""
        self._pending = None

    @staticmethod
    def _version(x: torch.Tensor) -> int | None:
        try:
            return x._version
        except RuntimeError:  # an inference-mode tensor keeps no version counter (identity alone is checked)
            return None

    def take(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Output ``index`` (``[..., sizes[index]]``) of the merged product on ``x [..., K]``."""
        p = self._pending
        if p is None or p[0] is not x or p[1] != self._version(x) or index not in p[3]:
            p = (x, self._version(x), self.linear(x).split(self.sizes, dim=-1), set(range(len(self.sizes))))
        p[3].discard(index)
        self._pending = p if p[3] else None
        return p[2][index]

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {k}" for n, k in zip(self.names, self.sizes))


def clear_shared_inputs(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a module that owns :class:`SharedInputLinear` children (registered by
    :func:`rcp_lib.deploy.merge_shared_inputs`): drops their kept products, so none outlives one call of the module.
    A module-level function (no closure), so a deep copy of the model clears its own groups."""
    for child in module.children():
        if isinstance(child, SharedInputLinear):
            child.clear()


class SharedInputSlice(nn.Module):
    """One projection of a :class:`SharedInputLinear`, in the place of the :class:`PackedLinear` it replaces:
    ``forward(x [..., K]) -> [..., N_i]``. It refers to the group without registering it: the module that calls the
    projections holds the group once (:func:`rcp_lib.deploy.merge_shared_inputs`), so ``.to()`` moves it and
    ``state_dict`` lists its tensors once, whichever slices are replaced later."""

    def __init__(self, shared: SharedInputLinear, index: int):
        super().__init__()
        self.__dict__["shared"] = shared  # not a submodule (class docstring)
        self.index = index
        self.in_features, self.out_features = shared.linear.in_features, shared.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.take(x, self.index)

    def extra_repr(self) -> str:
        return f"{self.shared.names[self.index]} of {len(self.shared.sizes)} merged, out={self.out_features}"


class GatedMLP(nn.Module):
    """A gated MLP, ``down_proj(silu(gate_proj(h)) * up_proj(h))`` (LLaMA, Qwen2), in two packed products:
    ``gate_up_proj``, the merged gate / up projection (:meth:`PackedLinear.concat`: ``[..., 2K]`` = ``[gate | up]``),
    and ``down_proj``, called with :meth:`PackedLinear.forward_glu`, so that on the fused path the SiLU, the product
    and the online Hadamard of R4 all run in the kernel that quantizes ``down_proj``'s input (no torch launch and no
    fp16 ``[..., K]`` product written and read back between the two products). Every other path computes what the
    MLP computes with its gate / up merged (:func:`rcp_lib.deploy.merge_shared_inputs`) bit for bit; against separate
    gate and up products, to the matrix product's blocking (1e-5 in the tests). Built by
    :func:`rcp_lib.deploy.fuse_gated_mlps` in the place of a block's MLP; a deploy-time layout, not saved
    (:func:`rcp_lib.deploy.save_quantized` refuses it)."""

    def __init__(self, gate_up_proj: PackedLinear, down_proj: PackedLinear):
        super().__init__()
        if gate_up_proj.out_features != 2 * down_proj.in_features:
            raise ValueError(f"gate_up_proj has {gate_up_proj.out_features} outputs; down_proj reads "
                             f"{down_proj.in_features}: a gated MLP needs twice as many")
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    @property
    def glu_in_kernel(self) -> bool:
        """Whether a call on the device of the weights runs the SiLU and the product inside ``down_proj``'s activation
        quantizer (:meth:`PackedLinear.glu_in_kernel`), rather than as torch ops between the two products."""
        return self.down_proj.glu_in_kernel(self.down_proj.qweight.new_empty(0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj.forward_glu(self.gate_up_proj(h))
