"""``quantize_model``: the one surgery layer that inserts quantizers into a (rotated) model of a registered family.

* every projection inside the decoder blocks becomes a :class:`~rcp_lib.quant.linear.QuantLinear`
  (weight fake-quant with RTN / LWC / LDP, input per-token activation fake-quant); an online rotation that
  :func:`~rcp_lib.rotation.rotate_model` put on the down_proj input (R4) is kept and applied *before* the
  activation quantizer;
* every attention module gets a :class:`KVQuantizer` (keys after RoPE and R3, and values; asymmetric,
  per token and head in groups of ``kv_group_size``), applied inside the ``rcp_*`` attention functions;
* the embedding, lm_head and norms stay in full precision (``lm_head`` input optionally quantized).

The same code path serves PTQ evaluation (``requires_grad`` off) and QAT (``rcp_lib.qat.train``).
Everything is validated before the model is changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from ..config import JsonConfig

from .. import models as M
from ..rotation.online import use_rcp_attention
from .activations import fake_quant_kv
from .linear import QuantLinear
from .quantizers import WeightQuantConfig, resolve_group_size

LayerFactory = Callable[..., nn.Module]
OFF = 16  # the bit width that means "not quantized" (activations, KV cache, lm_head input)


def _check_bits(name: str, bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not (1 <= bits <= 8 or bits == OFF):
        raise ValueError(f"{name} must be an integer in 1..8 or {OFF} (= off), got {bits!r}")


def _check_ratio(name: str, r: float) -> None:
    if not 0 < r <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {r}")


@dataclass
class ActQuantConfig(JsonConfig):
    """Per-token asymmetric fake quantization of every block-linear input (16 bits = off).

    Attributes:
        bits: activation width (QuaRot/RCP: 4).
        clip_ratio: each token's range is ``clip_ratio * [min, max]`` (QuaRot's 0.9).
        lm_head_bits: input width of ``lm_head`` (16: keep it in full precision, the default).
    """

    bits: int = 4
    clip_ratio: float = 0.9
    lm_head_bits: int = OFF

    def validate(self) -> None:
        _check_bits("activation bits", self.bits)
        _check_bits("lm_head activation bits", self.lm_head_bits)
        _check_ratio("activation clip_ratio", self.clip_ratio)


@dataclass
class KVQuantConfig(JsonConfig):
    """Asymmetric fake quantization of keys (after RoPE and R3) and values, per token and head, in groups of
    ``group_size`` channels of ``head_dim`` (16 bits = off).

    Attributes:
        bits: KV-cache width.
        group_size: channels per group; None = the model's head_dim (one group per head and token).
        clip_ratio: range ``clip_ratio * [min, max]`` of each group.
    """

    bits: int = 4
    group_size: int | None = None
    clip_ratio: float = 1.0

    def validate(self) -> None:
        _check_bits("KV bits", self.bits)
        _check_ratio("KV clip_ratio", self.clip_ratio)
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"KV group_size must be a positive integer or None (= head_dim), got {self.group_size!r}")


_UNSET: Any = object()


@dataclass
class QuantConfig(JsonConfig):
    """What :func:`quantize_model` inserts: the weight quantizer, activation and KV-cache quantization. Nested, each
    part owned by its own config; round-trips to JSON (``{"weight": {...} | None, "act": {...}, "kv": {...}}``).

    Attributes:
        weight: :class:`~rcp_lib.quant.quantizers.WeightQuantConfig` (bits, group_size, method, LWC, clip search,
            LDP options; see :mod:`rcp_lib.quant.quantizers`), or None for 16-bit weights.
        act: :class:`ActQuantConfig`. kv: :class:`KVQuantConfig`.

    A named setting is :func:`preset` (``preset("W2A4KV4", w_group_size=64)``), other weight fields on top with
    :meth:`with_weight`. The default weight group is :class:`WeightQuantConfig`'s 128, which must divide every
    block-linear input (576 of SmolLM2 does not: give the profile's ``w_group_size``); :func:`quantize_model` names a
    divisor when it does not.
    """

    weight: WeightQuantConfig | None = field(default_factory=WeightQuantConfig)
    act: ActQuantConfig = field(default_factory=ActQuantConfig)
    kv: KVQuantConfig = field(default_factory=KVQuantConfig)

    def __post_init__(self) -> None:
        if self.act is None:  # None: the default part (16-bit is bits=16, not None)
            self.act = ActQuantConfig()
        if self.kv is None:
            self.kv = KVQuantConfig()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """The layout of ``to_dict`` (a missing part: its default; ``weight: null``: 16-bit weights)."""
        unknown = set(d) - {"weight", "act", "kv"}
        if unknown:
            raise ValueError(f"unknown QuantConfig fields {sorted(unknown)}; known: ['act', 'kv', 'weight']")
        w = d.get("weight", _UNSET)
        return cls(weight=WeightQuantConfig() if w is _UNSET else None if w is None else WeightQuantConfig.from_dict(w),
                   act=ActQuantConfig.from_dict(d.get("act") or {}), kv=KVQuantConfig.from_dict(d.get("kv") or {}))

    def validate(self) -> None:
        if self.weight is not None:
            self.weight.validate()
        self.act.validate()
        self.kv.validate()

    @property
    def w_bits(self) -> int:
        """The weight width, 16 when the weights are not quantized."""
        return OFF if self.weight is None else self.weight.bits

    @property
    def label(self) -> str:
        """Short name like ``W2A4KV4``."""
        return f"W{self.w_bits}A{self.act.bits}KV{self.kv.bits}"

    def with_weight(self, **fields: Any) -> "QuantConfig":
        """A copy with these :class:`WeightQuantConfig` fields replaced (no-op for 16-bit weights)."""
        w = None if self.weight is None else replace(self.weight, **fields)
        return QuantConfig(weight=w, act=self.act, kv=self.kv)


def packable_weight_bits() -> tuple[int, ...]:
    """The weight widths a packed folder can hold and the W2A4 op can run (:data:`rcp_lib.kernels.SUPPORTED_BITS`:
    ``2**bits`` levels per group packed in ``bits``-bit codes)."""
    from ..kernels import SUPPORTED_BITS

    return tuple(SUPPORTED_BITS)


def check_packable(cfg: QuantConfig) -> None:
    """ValueError unless a model quantized with ``cfg`` can be exported as a packed folder
    (:func:`rcp_lib.deploy.save_quantized`): weight bits in :func:`packable_weight_bits` (16 = full precision is
    fine). Activation and KV widths 1..8 are fake-quantized at run time in the packed model too, so
    :meth:`QuantConfig.validate` covers them. Other widths (e.g. 3-bit weights) still train and evaluate as fake
    quantization: a run config without ``export_dir`` may use them (research only; they cannot be deployed)."""
    cfg.validate()
    ok = packable_weight_bits()
    if cfg.weight is not None and cfg.weight.bits not in ok:
        raise ValueError(f"weight bits {cfg.weight.bits} cannot be exported as a packed model (packable widths: "
                         f"{', '.join(map(str, ok))}); use one of those, or train without export "
                         f"(export_dir: null) as fake quantization only")


def check_model_sizes(cfg: QuantConfig, d: "M.Dims", model: str = "the model") -> None:
    """ValueError unless ``cfg``'s groups divide the sizes of a model with dims ``d`` (:func:`rcp_lib.models.model_dims`
    reads them from the model's config, no weights): the weight group must divide every block projection's input
    (hidden size for q/k/v/gate/up, heads x head_dim for o_proj, intermediate size for down_proj), the KV group the
    head_dim. The same condition :func:`quantize_model` checks per layer, before any model is loaded."""
    cfg.validate()
    if cfg.weight is not None:
        for what, k in (("hidden size (q/k/v/gate/up input)", d.hidden),
                        ("attention width (o_proj input)", d.n_heads * d.head_dim),
                        ("intermediate size (down_proj input)", d.intermediate)):
            resolve_group_size(k, cfg.weight.group_size, f"{model}'s {what}")
    if cfg.kv.bits != OFF and cfg.kv.group_size is not None:
        resolve_group_size(d.head_dim, cfg.kv.group_size, f"{model}'s KV cache (head_dim)")


def preset(name: str, w_group_size: int | None = None, kv_group_size: int | None = None) -> QuantConfig:
    """A named setting ``W<w>A<a>KV<kv>`` (W2A4KV4: RCP's, W2A16KV16: GSR's, W4A4KV4: QuaRot's, W16A16KV16: none;
    16 bits = not quantized): the default parts at those widths, with the weight group ``w_group_size`` (None:
    :class:`WeightQuantConfig`'s 128) and the KV group ``kv_group_size`` (None: the head_dim)."""
    m = re.fullmatch(r"W(\d+)A(\d+)KV(\d+)", name.upper())
    if not m:
        raise ValueError(f"preset names look like 'W2A4KV4', got {name!r}")
    w, a, kv = map(int, m.groups())
    weight = None if w == OFF else WeightQuantConfig(bits=w, **({} if w_group_size is None else
                                                                  {"group_size": w_group_size}))
    return QuantConfig(weight=weight, act=ActQuantConfig(bits=a), kv=KVQuantConfig(bits=kv, group_size=kv_group_size))


class KVQuantizer(nn.Module):
    """Fake-quantizes keys and values ``[B, kv_heads, T, head_dim]`` per token and head (groups along head_dim)."""

    def __init__(self, bits: int, group_size: int, clip_ratio: float = 1.0):
        super().__init__()
        self.bits, self.group_size, self.clip_ratio = bits, group_size, clip_ratio

    @classmethod
    def of(cls, kv: KVQuantConfig, head_dim: int) -> "KVQuantizer":
        """The quantizer of a :class:`KVQuantConfig` for heads of ``head_dim`` channels (group None = head_dim)."""
        return cls(kv.bits, kv.group_size or head_dim, kv.clip_ratio)

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (fake_quant_kv(key, self.bits, self.group_size, self.clip_ratio),
                fake_quant_kv(value, self.bits, self.group_size, self.clip_ratio))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}, clip_ratio={self.clip_ratio}"


def _validate_model(model: nn.Module, cfg: QuantConfig) -> None:
    M.check_supported(model)
    if getattr(model.config, "rcp_quant", None):
        raise M.UnsupportedModelError("this model is already quantized (config.rcp_quant is set)")
    for name, lin in M.named_block_linears(model):
        if not lin.weight.is_meta and not torch.isfinite(lin.weight).all():
            raise ValueError(f"{name}.weight has NaN/inf values; refusing to quantize")
        if cfg.weight is not None:
            resolve_group_size(lin.in_features, cfg.weight.group_size, name)
    if cfg.kv.bits != OFF and cfg.kv.group_size is not None:
        resolve_group_size(M.dims(model).head_dim, cfg.kv.group_size, "the KV cache (head_dim)")


def quantize_model(model: nn.Module, config: QuantConfig | None = None,
                   layer_factory: LayerFactory | None = None) -> nn.Module:
    """Insert fake quantizers into ``model`` in place (see module docstring) and return it.

    Args:
        model: a model of a registered family (rotated or not). May be a skeleton on the meta device when
            ``layer_factory`` builds layers that take no values from the weights.
        config: what to insert (default :class:`QuantConfig`).
        layer_factory: builds each block projection's replacement as ``layer_factory(linear, weight_config,
            act_bits=..., act_clip_ratio=..., name=...)``; default :meth:`QuantLinear.from_linear` (fake quantization,
            weight quantizer initialised from the weight). The packed loader (:mod:`rcp_lib.deploy`) passes a factory
            that builds empty deployed layers, so loading re-runs this very surgery (which layers, activation
            settings, R4 kept on down_proj, KV quantizers, attention function, lm_head input, ``config.rcp_quant``).

    Raises:
        ValueError: bits out of range, a group size that does not divide a layer (named), NaN weights.
        UnsupportedModelError: not a registered family (the message names them), or already quantized.
    """
    cfg = config or QuantConfig()
    cfg.validate()
    _validate_model(model, cfg)
    M.untie_embeddings(model)
    act_bits = None if cfg.act.bits == OFF else cfg.act.bits
    make = layer_factory or QuantLinear.from_linear
    for name, lin in list(M.named_block_linears(model)):
        q = make(lin, cfg.weight, act_bits=act_bits, act_clip_ratio=cfg.act.clip_ratio, name=name)
        transform = getattr(lin, "input_transform", None)
        if transform is not None:
            q.input_transform = transform
        M.set_submodule(model, name, q)
    if cfg.kv.bits != OFF:
        for layer in M.decoder_layers(model):
            M.attention(layer).rcp_kv_quantizer = KVQuantizer.of(cfg.kv, M.dims(model).head_dim)
        use_rcp_attention(model)
    if cfg.act.lm_head_bits != OFF:
        head = M.lm_head(model)
        model.lm_head = QuantLinear.from_linear(head, None, act_bits=cfg.act.lm_head_bits,
                                                act_clip_ratio=cfg.act.clip_ratio)
    model.config.rcp_quant = cfg.to_dict()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantized_linears(model: nn.Module):
    """``(name, QuantLinear)`` for every quantized projection of a model."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod
