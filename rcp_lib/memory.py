"""Memory accountant: bytes of a LLaMA-family model (weights + KV cache) under a quantization scheme.

Computed from a transformers config alone (a ``LlamaConfig``/``AutoConfig`` object or a dict with the keys
``hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
vocab_size, tie_word_embeddings``; ``num_key_value_heads`` defaults to the head count, ``head_dim`` to
``hidden_size // num_attention_heads``, ``tie_word_embeddings`` to False). No weights are loaded.

What is counted
---------------
* Block linears (every decoder layer): q ``[H*d, h]``, k and v ``[Hkv*d, h]``, o ``[h, H*d]``,
  gate and up ``[i, h]``, down ``[h, i]`` (``h`` hidden, ``i`` intermediate, ``d`` head_dim, ``H``/``Hkv``
  query/KV heads). At ``w_bits < 16`` each ``[N, K]`` matrix costs ``N * ceil(K / (32 // w_bits)) * 4`` bytes of
  codes (int32 words packed along K, exactly the :func:`rcp_lib.kernels.pack_codes` format; equal to
  ``N*K*w_bits/8`` when K is a multiple of 16) plus quantizer metadata per group of ``group_size`` consecutive
  inputs of a row (``ceil(K / group_size)`` groups per row):
  ``lut_levels=True`` (non-uniform, RCP's LDP): ``2**w_bits`` fp16 levels per group;
  ``lut_levels=False`` (uniform): one fp16 scale + one fp16 zero point per group.
  Biases stay fp16: q/k/v/o when ``attention_bias`` is set in the config, q/k/v when the config's ``model_type``
  is a family with fixed q/k/v biases (Qwen2, :attr:`rcp_lib.families.Family.qkv_bias`), gate/up/down when
  ``mlp_bias`` is set.
* ``embed`` (``[vocab, h]``), ``lm_head`` (``[vocab, h]``, 0 bytes when ``tie_word_embeddings``: shared with
  the embedding) and ``norms`` (two RMSNorm vectors per layer + the final one, ``(2L + 1) * h``) are fp16 when
  listed in ``Scheme.keep_fp16``; embed/lm_head not listed there are quantized like the block linears
  (norms are always fp16: quantizing them is not supported).
* KV cache for ``(seq_len, batch)``: K and V, every layer, ``Hkv * d`` values per token, at ``kv_bits``; at
  ``kv_bits < 16`` plus one fp16 scale + one fp16 zero per group of ``kv_group_size`` channels within each
  head (per token, per head; ``ceil(d / kv_group_size)`` groups per head).
* Not counted: activations (``a_bits`` changes compute, not storage), rotation matrices (fused offline into
  the weights, or online Hadamards that need no storage), runtime buffers and framework overhead.

The paper's 5.29x (LLaMA-2-7B, W2A4KV4)
---------------------------------------
The accounting that reproduces it is **weights only, no KV cache**: 2-bit codes + four fp16 levels per
128-weight group (2.5 bits per block-linear weight) with embed, lm_head and norms in fp16 gives
``13,476,831,232 / 2,548,572,160 = 5.288``. Adding a 2048-token KV cache (batch 1; 1 GiB in fp16, KV4 with
fp16 scale+zero per 128-channel head group) gives 5.135 instead. This is our arithmetic, not the paper's
stated accounting.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Mapping

from .families import FAMILIES, PACKED_FAMILIES

#: the paper's weight group (and LLaMA-2's head_dim): the one default weight group of the library (the quantizers,
#: GPTQ, the accountant and its named presets); a profile's recipes set their own (``Profile.w_group_size``)
PAPER_GROUP = 128

if TYPE_CHECKING:
    from .quant.apply import QuantConfig

__all__ = [
    "Scheme",
    "FP16",
    "W2A4KV4",
    "W4A4KV4",
    "W2A16KV16",
    "PRESETS",
    "Footprint",
    "footprint",
    "count_linear_weights",
    "linear_shapes",
    "model_dims",
]

LINEAR_KINDS = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down")
FP16_BYTES = 2


@dataclass(frozen=True)
class Scheme:
    """The accountant's view of a quantization setting (16 bits = unquantized fp16): what it stores, nothing else.
    Derived from a :class:`~rcp_lib.quant.apply.QuantConfig` with :meth:`of` (the presets below are
    ``Scheme.of(preset(name, ...))``); written by hand only to probe the accountant.

    w_bits: weight code width (1, 2, 4, 8 or 16). a_bits: activation width (recorded, not stored).
    kv_bits: KV-cache width. group_size: weights per quantization group along the input dim (-1: whole row).
    lut_levels: True = non-uniform, ``2**w_bits`` fp16 levels per group; False = uniform fp16 scale + zero.
    kv_group_size: channels per KV group within a head (scale + zero fp16 per group; -1: whole head).
    keep_fp16: tensor kinds kept in fp16 among "embed", "lm_head", "norms".
    """

    w_bits: int = 2
    a_bits: int = 4
    kv_bits: int = 4
    group_size: int = PAPER_GROUP
    lut_levels: bool = True
    kv_group_size: int = 128
    keep_fp16: tuple[str, ...] = ("embed", "lm_head", "norms")
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.w_bits != 16 and self.w_bits not in (1, 2, 4, 8):
            raise ValueError(f"w_bits must be 1, 2, 4, 8 or 16, got {self.w_bits}")
        if not 1 <= self.kv_bits <= 16:
            raise ValueError(f"kv_bits must be in 1..16, got {self.kv_bits}")
        if self.group_size == 0 or self.group_size < -1 or self.kv_group_size == 0 or self.kv_group_size < -1:
            raise ValueError("group sizes must be positive or -1")
        unknown = set(self.keep_fp16) - {"embed", "lm_head", "norms"}
        if unknown:
            raise ValueError(f"unknown keep_fp16 kinds: {sorted(unknown)}")
        if "norms" not in self.keep_fp16:
            raise ValueError("norms are always kept in fp16; include 'norms' in keep_fp16")

    @property
    def label(self) -> str:
        return self.name or f"W{self.w_bits}A{self.a_bits}KV{self.kv_bits}"

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per block-linear weight: the code plus the group's metadata spread over its weights,
        ``w_bits + 16 * 2**w_bits / G`` with a level table (LDP: 3.0 at W2 g64, 2.5 at g128) or ``w_bits + 32 / G``
        with fp16 scale + zero (uniform: 2.5 at W2 g64, 2.25 at g128); 16 unquantized. ``G`` = ``group_size`` (a
        whole row, -1, counts as metadata-free here: its per-row cost depends on the row length)."""
        if self.w_bits == 16:
            return 16.0
        if self.group_size == -1:
            return float(self.w_bits)
        meta = FP16_BYTES * 8 * (2 ** self.w_bits if self.lut_levels else 2)
        return self.w_bits + meta / self.group_size

    @classmethod
    def of(cls, quant: "QuantConfig | None", head_dim: int | None = None, name: str = "",
           lut_levels: bool | None = None, keep_fp16: tuple[str, ...] = ("embed", "lm_head", "norms")) -> "Scheme":
        """The storage of a model quantized with ``quant`` (None: fp16): its bits, its weight group (the recipe's,
        never re-derived from shapes) and its KV group (None in the config = ``head_dim``; -1 = a whole head when
        ``head_dim`` is not given).

        ``lut_levels`` (None: from the weight method) is what the method's format needs per group: ``2**w_bits`` fp16
        levels for a non-uniform grid (LDP), an fp16 scale + zero point for a uniform one (RTN, GPTQ, LWC), so that an
        equal-bits comparison charges each format what it needs. (rcp_lib's packed folder writes a level table for
        every method, uniform ones included, so that one kernel runs them all; a uniform deployment format such as
        GPTQ's stores scale + zero.)"""
        if quant is None:
            return cls(w_bits=16, a_bits=16, kv_bits=16, group_size=-1, kv_group_size=-1,
                       lut_levels=True if lut_levels is None else lut_levels, keep_fp16=keep_fp16, name=name or "FP16")
        w = quant.weight
        if lut_levels is None:
            lut_levels = w is None or w.method == "ldp"
        return cls(w_bits=quant.w_bits, a_bits=quant.act.bits, kv_bits=quant.kv.bits,
                   group_size=-1 if w is None else w.group_size, lut_levels=lut_levels,
                   kv_group_size=quant.kv.group_size or head_dim or -1, keep_fp16=keep_fp16, name=name)


def _preset_scheme(name: str) -> Scheme:
    from .quant.apply import preset

    if name == "FP16":
        return Scheme.of(None)
    return Scheme.of(preset(name, w_group_size=PAPER_GROUP, kv_group_size=PAPER_GROUP), name=name)


FP16 = _preset_scheme("FP16")
W2A4KV4 = _preset_scheme("W2A4KV4")
W4A4KV4 = _preset_scheme("W4A4KV4")
W2A16KV16 = _preset_scheme("W2A16KV16")
PRESETS: dict[str, Scheme] = {s.name: s for s in (FP16, W2A4KV4, W4A4KV4, W2A16KV16)}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        v = cfg.get(key, default)
    else:
        v = getattr(cfg, key, default)
    return default if v is None else v


def model_dims(config: Any) -> dict[str, Any]:
    """The dimensions the accountant uses, with defaults filled in (ints; ``tie`` bool)."""
    h = int(_get(config, "hidden_size"))
    heads = int(_get(config, "num_attention_heads"))
    mt = _get(config, "model_type")
    family = FAMILIES.get(mt) or PACKED_FAMILIES.get(mt)
    return {
        "hidden": h,
        "intermediate": int(_get(config, "intermediate_size")),
        "layers": int(_get(config, "num_hidden_layers")),
        "heads": heads,
        "kv_heads": int(_get(config, "num_key_value_heads", heads)),
        "head_dim": int(_get(config, "head_dim", h // heads)),
        "vocab": int(_get(config, "vocab_size")),
        "tie": bool(_get(config, "tie_word_embeddings", False)),
        "attention_bias": bool(_get(config, "attention_bias", False)),  # LLaMA's option: q, k, v and o
        "qkv_bias": bool(family is not None and family.qkv_bias),  # the family's fixed q/k/v biases (Qwen2)
        "mlp_bias": bool(_get(config, "mlp_bias", False)),
    }


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``{kind: (N_out, K_in)}`` of the seven linears of one decoder layer."""
    d = model_dims(config)
    h, i, qd, kvd = d["hidden"], d["intermediate"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    return {
        "attn_q": (qd, h),
        "attn_k": (kvd, h),
        "attn_v": (kvd, h),
        "attn_o": (h, qd),
        "mlp_gate": (i, h),
        "mlp_up": (i, h),
        "mlp_down": (h, i),
    }


def count_linear_weights(config: Any) -> int:
    """Number of block-linear weights (all layers; embedding and lm_head excluded, biases excluded)."""
    per_layer = sum(n * k for n, k in linear_shapes(config).values())
    return per_layer * model_dims(config)["layers"]


def _matrix_bytes(N: int, K: int, scheme: Scheme) -> tuple[int, int]:
    """(code bytes, metadata bytes) of one ``[N, K]`` matrix under ``scheme``."""
    if scheme.w_bits >= 16:
        return N * K * FP16_BYTES, 0
    cpw = 32 // scheme.w_bits
    codes = N * math.ceil(K / cpw) * 4
    g = K if scheme.group_size == -1 else scheme.group_size
    groups = N * math.ceil(K / g)
    per_group = (2**scheme.w_bits) * FP16_BYTES if scheme.lut_levels else 2 * FP16_BYTES
    return codes, groups * per_group


@dataclass
class Footprint:
    """Result of :func:`footprint` (all sizes in bytes). ``to_dict()`` flattens ``per_kind``."""

    scheme: str
    seq_len: int
    batch: int
    per_kind: dict[str, int]  # attn_q .. mlp_down (codes + metadata, all layers), embed, lm_head, norms, biases
    weight_codes: int  # quantized codes (or fp16 values) of the block linears
    quant_metadata: int  # LUT levels / scales+zeros of all quantized weight matrices
    weights: int  # everything stored for the model's parameters
    kv_cache: int  # K and V values + KV metadata
    kv_metadata: int  # the KV scale/zero part of kv_cache
    total: int  # weights + kv_cache
    fp16_weights: int
    fp16_kv_cache: int
    fp16_total: int
    weight_ratio_vs_fp16: float  # fp16_weights / weights
    total_ratio_vs_fp16: float  # fp16_total / total

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        per = d.pop("per_kind")
        d.update({f"bytes_{k}": v for k, v in per.items()})
        return d


def _weights(config: Any, scheme: Scheme) -> tuple[dict[str, int], int, int]:
    d = model_dims(config)
    L = d["layers"]
    per_kind: dict[str, int] = {}
    codes_total = meta_total = 0
    for kind, (n, k) in linear_shapes(config).items():
        c, m = _matrix_bytes(n, k, scheme)
        per_kind[kind] = (c + m) * L
        codes_total += c * L
        meta_total += m * L
    for kind in ("embed", "lm_head"):
        if kind == "lm_head" and d["tie"]:
            per_kind[kind] = 0
            continue
        if kind in scheme.keep_fp16 or scheme.w_bits >= 16:
            per_kind[kind] = d["vocab"] * d["hidden"] * FP16_BYTES
        else:
            c, m = _matrix_bytes(d["vocab"], d["hidden"], scheme)
            per_kind[kind] = c + m
            meta_total += m
    per_kind["norms"] = (2 * L + 1) * d["hidden"] * FP16_BYTES
    shapes = linear_shapes(config)
    bias = 0
    if d["attention_bias"]:
        bias += sum(shapes[k][0] for k in ("attn_q", "attn_k", "attn_v", "attn_o"))
    elif d["qkv_bias"]:
        bias += sum(shapes[k][0] for k in ("attn_q", "attn_k", "attn_v"))
    if d["mlp_bias"]:
        bias += sum(shapes[k][0] for k in ("mlp_gate", "mlp_up", "mlp_down"))
    per_kind["biases"] = bias * L * FP16_BYTES
    return per_kind, codes_total, meta_total


def _kv(config: Any, scheme: Scheme, seq_len: int, batch: int) -> tuple[int, int]:
    d = model_dims(config)
    tokens = seq_len * batch
    values = 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * tokens  # K and V
    if scheme.kv_bits >= 16:
        return values * FP16_BYTES, 0
    g = d["head_dim"] if scheme.kv_group_size == -1 else scheme.kv_group_size
    groups = 2 * d["layers"] * d["kv_heads"] * math.ceil(d["head_dim"] / g) * tokens
    meta = groups * 2 * FP16_BYTES
    return math.ceil(values * scheme.kv_bits / 8) + meta, meta


def footprint(config: Any, scheme: "Scheme | QuantConfig | str" = W2A4KV4, seq_len: int = 2048, batch: int = 1) -> Footprint:
    """Bytes of weights and KV cache of ``config`` under ``scheme`` (accounting in the module docstring).

    Args:
        config: transformers config object or dict-like (see module docstring).
        scheme: a :class:`Scheme`, a :class:`~rcp_lib.quant.apply.QuantConfig` (:meth:`Scheme.of` with the
            config's ``head_dim``), or a preset name ("FP16", "W2A4KV4", "W4A4KV4", "W2A16KV16").
        seq_len, batch: KV-cache size (tokens cached per sequence, sequences).

    Returns:
        :class:`Footprint` (``.to_dict()`` for a flat dict).
    """
    if isinstance(scheme, str):
        scheme = PRESETS[scheme]
    elif not isinstance(scheme, Scheme):
        scheme = Scheme.of(scheme, head_dim=model_dims(config)["head_dim"])
    if seq_len < 0 or batch < 0:
        raise ValueError("seq_len and batch must be >= 0")
    per_kind, codes, meta = _weights(config, scheme)
    weights = sum(per_kind.values())
    kv, kv_meta = _kv(config, scheme, seq_len, batch)
    fp16_w = sum(_weights(config, replace(FP16, keep_fp16=scheme.keep_fp16))[0].values())
    fp16_kv = _kv(config, FP16, seq_len, batch)[0]
    return Footprint(
        scheme=scheme.label,
        seq_len=seq_len,
        batch=batch,
        per_kind=per_kind,
        weight_codes=codes,
        quant_metadata=meta,
        weights=weights,
        kv_cache=kv,
        kv_metadata=kv_meta,
        total=weights + kv,
        fp16_weights=fp16_w,
        fp16_kv_cache=fp16_kv,
        fp16_total=fp16_w + fp16_kv,
        weight_ratio_vs_fp16=fp16_w / weights,
        total_ratio_vs_fp16=(fp16_w + fp16_kv) / (weights + kv),
    )
