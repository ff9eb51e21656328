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

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import JsonConfig

from .. import models as M
from ..rotation.online import use_rcp_attention
from .activations import fake_quant_kv
from .linear import QuantLinear
from .quantizers import WeightQuantConfig

W_METHODS = ("rtn", "ldp")


@dataclass
class QuantConfig(JsonConfig):
    """W/A/KV quantization settings (16 bits = off). Round-trips to JSON.

    Weight quantizer (see :mod:`rcp_lib.quant.quantizers` for the formulas):
        w_bits, w_group_size (-1: per output row), w_method ("rtn": uniform asymmetric grid; "ldp": learnable
        direct partitioning), w_lwc (learnable clipping, OmniQuant-style), w_lwc_init (initial logit of the
        clip sigmoid), w_clip_ratio (fixed clip ratio for RTN without LWC), w_clip_search ("none" or "mse":
        QuaRot's per-row, per-group weight clip search for RTN/GPTQ without LWC), ldp_granularity ("group"/"row"),
        ldp_init ("uniform"/"lloyd").
    Activations: a_bits (per-token asymmetric on every block linear input), a_clip_ratio (QuaRot's 0.9).
    KV cache: kv_bits, kv_group_size (None: head_dim), kv_clip_ratio.
    lm_head_a_bits: input quantization of lm_head (16 = keep it in full precision, the default).
    """

    w_bits: int = 2
    w_group_size: int = 128
    w_method: str = "ldp"
    w_lwc: bool = True
    w_lwc_init: float = 4.0
    w_clip_ratio: float = 1.0
    w_clip_search: str = "none"
    ldp_granularity: str = "group"
    ldp_init: str = "uniform"
    a_bits: int = 4
    a_clip_ratio: float = 0.9
    kv_bits: int = 4
    kv_group_size: int | None = None
    kv_clip_ratio: float = 1.0
    lm_head_a_bits: int = 16

    def validate(self) -> None:
        for n in ("w_bits", "a_bits", "kv_bits", "lm_head_a_bits"):
            b = getattr(self, n)
            if not (isinstance(b, int) and (1 <= b <= 8 or b == 16)):
                raise ValueError(f"{n} must be an integer in 1..8 or 16 (= off), got {b!r}")
        if self.w_method not in W_METHODS:
            raise ValueError(f"w_method must be one of {W_METHODS}, got {self.w_method!r}")
        if self.w_group_size == 0 or self.w_group_size < -1:
            raise ValueError(f"w_group_size must be positive or -1 (per row), got {self.w_group_size}")
        for n in ("a_clip_ratio", "kv_clip_ratio", "w_clip_ratio"):
            r = getattr(self, n)
            if not 0 < r <= 1:
                raise ValueError(f"{n} must be in (0, 1], got {r}")
        if self.kv_group_size is not None and self.kv_group_size < 1:
            raise ValueError(f"kv_group_size must be >= 1 or None, got {self.kv_group_size}")

    @property
    def label(self) -> str:
        """Short name like ``W2A4KV4``."""
        return f"W{self.w_bits}A{self.a_bits}KV{self.kv_bits}"

    def weight_config(self) -> WeightQuantConfig | None:
        if self.w_bits == 16:
            return None
        return WeightQuantConfig(bits=self.w_bits, group_size=self.w_group_size, method=self.w_method,
                                 lwc=self.w_lwc, lwc_init=self.w_lwc_init, clip_ratio=self.w_clip_ratio,
                                 clip_search=self.w_clip_search,
                                 ldp_granularity=self.ldp_granularity, ldp_init=self.ldp_init)



def preset(name: str, **overrides) -> QuantConfig:
    """Named settings: W2A4KV4 (RCP), W2A16KV16 (GSR's), W4A4KV4 (QuaRot's), W3A4KV4, W4A16KV16, W16A16KV16."""
    import re

    m = re.fullmatch(r"W(\d+)A(\d+)KV(\d+)", name.upper())
    if not m:
        raise ValueError(f"preset names look like 'W2A4KV4', got {name!r}")
    w, a, kv = map(int, m.groups())
    return QuantConfig(w_bits=w, a_bits=a, kv_bits=kv, **overrides)


class KVQuantizer(nn.Module):
    """Fake-quantizes keys and values ``[B, kv_heads, T, head_dim]`` per token and head (groups along head_dim)."""

    def __init__(self, bits: int, group_size: int, clip_ratio: float = 1.0):
        super().__init__()
        self.bits, self.group_size, self.clip_ratio = bits, group_size, clip_ratio

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
        if not torch.isfinite(lin.weight).all():
            raise ValueError(f"{name}.weight has NaN/inf values; refusing to quantize")
        if cfg.w_bits != 16 and cfg.w_group_size != -1 and lin.in_features % cfg.w_group_size:
            raise ValueError(
                f"w_group_size={cfg.w_group_size} does not divide the input size {lin.in_features} of {name}; "
                f"use a divisor (e.g. {math.gcd(lin.in_features, cfg.w_group_size)}) or -1 (per output row)")
    d = M.dims(model)
    if cfg.kv_bits != 16:
        g = cfg.kv_group_size or d.head_dim
        if d.head_dim % g:
            raise ValueError(f"kv_group_size={g} does not divide head_dim={d.head_dim}")


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Insert fake quantizers into ``model`` in place (see module docstring) and return it.

    Raises:
        ValueError: bits out of range, a group size that does not divide a layer (named), NaN weights.
        UnsupportedModelError: not a registered family (the message names them), or already quantized.
    """
    cfg = config or QuantConfig()
    cfg.validate()
    _validate_model(model, cfg)
    M.untie_embeddings(model)
    wcfg = cfg.weight_config()
    act_bits = None if cfg.a_bits == 16 else cfg.a_bits
    for name, lin in list(M.named_block_linears(model)):
        q = QuantLinear.from_linear(lin, wcfg, act_bits=act_bits, act_clip_ratio=cfg.a_clip_ratio)
        transform = getattr(lin, "input_transform", None)
        if transform is not None:
            q.input_transform = transform
        M.set_submodule(model, name, q)
    if cfg.kv_bits != 16:
        d = M.dims(model)
        for layer in M.decoder_layers(model):
            M.attention(layer).rcp_kv_quantizer = KVQuantizer(cfg.kv_bits, cfg.kv_group_size or d.head_dim, cfg.kv_clip_ratio)
        use_rcp_attention(model)
    if cfg.lm_head_a_bits != 16:
        head = M.lm_head(model)
        model.lm_head = QuantLinear.from_linear(head, None, act_bits=cfg.lm_head_a_bits, act_clip_ratio=cfg.a_clip_ratio)
    model.config.rcp_quant = cfg.to_dict()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def quantized_linears(model: nn.Module):
    """``(name, QuantLinear)`` for every quantized projection of a model."""
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            yield name, mod
