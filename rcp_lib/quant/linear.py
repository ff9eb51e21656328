"""``QuantLinear``: an ``nn.Linear`` with weight fake-quantization and per-token input fake-quantization.

forward(x): ``x -> input_transform (optional, e.g. the online R4 Hadamard of down_proj) -> per-token activation
fake quant (optional) -> F.linear(x, weight_quantizer(weight), bias)``. The latent weight and bias are the very
``nn.Parameter`` objects of the wrapped linear (trained in QAT); the quantizer's own parameters (LWC/LDP) are
reported separately by :meth:`QuantLinear.quant_parameters` so that the two get different optimizer groups.

Lifecycle of a quantized layer: train (QAT) or calibrate (GPTQ / RTN) with a learnable :class:`WeightQuantizer` ->
:meth:`QuantLinear.freeze` (or :func:`freeze_model`): the quantizer becomes a :class:`FrozenLevelsQuantizer` (codes +
level table, the same output) and the latent weight becomes the quantized weight -> saved with
:func:`rcp_lib.deploy.save_quantized` -> loaded by re-running the same surgery on a skeleton and loading the frozen
tensors (:func:`rcp_lib.deploy.load_quantized`) -> deployed as :class:`rcp_lib.kernels.packed_linear.PackedLinear`.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .activations import check_act_bits, fake_quant_per_token
from .quantizers import FrozenLevelsQuantizer, WeightQuantConfig, WeightQuantizer


class QuantLinear(nn.Module):
    """Fake-quantized linear layer.

    Attributes:
        weight: latent weight ``[out, in]`` (``nn.Parameter``).
        bias: ``[out]`` or None.
        weight_quantizer: :class:`WeightQuantizer`, :class:`FrozenLevelsQuantizer` (after :meth:`freeze`) or None
            (weights in full precision).
        act_bits: input activation bits (1..8) or None (off; 16 is accepted and stored as None).
        act_clip_ratio: per-token clip ratio of the input quantizer.
        input_transform: optional ``nn.Module`` applied to the input before the activation quantizer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_config: WeightQuantConfig | None = None,
        act_bits: int | None = None,
        act_clip_ratio: float = 1.0,
        input_transform: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "weight",
        weight: nn.Parameter | None = None,
        bias_param: nn.Parameter | None = None,
    ):
        """Create a layer with fresh (uninitialised) parameters, or around given ``weight`` / ``bias_param``
        parameters (shared, not copied; see :meth:`from_linear`)."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
            bias_param = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        elif tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"{name}: weight shape {tuple(weight.shape)} != ({out_features}, {in_features})")
        self.weight = weight
        self.bias = bias_param
        self.act_bits = check_act_bits(act_bits)
        if not 0 < act_clip_ratio <= 1:
            raise ValueError(f"act_clip_ratio must be in (0, 1], got {act_clip_ratio}")
        self.act_clip_ratio = float(act_clip_ratio)
        self.input_transform = input_transform
        self.weight_quantizer = (
            WeightQuantizer((out_features, in_features), weight_config, name=name).to(self.weight.device)
            if weight_config is not None else None
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        wcfg: WeightQuantConfig | None,
        act_bits: int | None = None,
        act_clip_ratio: float = 1.0,
        input_transform: nn.Module | None = None,
        name: str = "weight",
        init: bool = True,
    ) -> "QuantLinear":
        """Wrap ``linear`` (sharing its weight and bias parameters) and initialise the weight quantizer from its
        weight (:meth:`WeightQuantizer.init_from`, e.g. the clip search and the Lloyd fit).

        Args:
            linear: any module with ``weight [out, in]`` and ``bias`` (``nn.Linear``).
            wcfg: weight quantizer config, or None for full-precision weights.
            act_bits: input activation bits, None/16 = off.
            act_clip_ratio: clip ratio of the input quantizer.
            input_transform: optional module applied to the input first.
            name: layer name used in error messages (e.g. a group size that does not divide).
            init: False leaves the quantizer at its constructor values, for a layer whose whole state is loaded next
                (``load_state_dict``: every value ``init_from`` sets is a parameter or a persistent buffer, a test
                checks it), which skips the start's clip search and Lloyd fit.
        """
        out_f, in_f = linear.weight.shape
        bias = getattr(linear, "bias", None)
        q = cls(in_f, out_f, bias=bias is not None, weight_config=wcfg, act_bits=act_bits,
                act_clip_ratio=act_clip_ratio, input_transform=input_transform, name=name,
                weight=linear.weight, bias_param=bias)
        if q.weight_quantizer is not None and init:
            q.weight_quantizer.init_from(linear.weight.detach())
        return q

    def quantized_weight(self) -> torch.Tensor:
        """The weight used in forward, ``[out, in]`` (fake-quantized if a weight quantizer is set).

        Without autograd (evaluation) on the CPU the fake-quantized weight is cached until the weight, a quantizer
        parameter or the quantizer itself changes (tensor version counters), so evaluation does not re-quantize
        every layer on every forward pass. Not on an accelerator: there re-quantizing is cheap and memory is not
        (the cache is a full-size copy of every block linear, +26 GB at 7B). :func:`clear_weight_cache` frees it;
        :func:`rcp_lib.qat.train` does so before training (a validation pass leaves no copy behind).
        """
        wq = self.weight_quantizer
        if wq is None:
            return self.weight
        if torch.is_grad_enabled() or self.weight.device.type != "cpu":
            self.__dict__.pop("_wq_cache", None)
            return wq(self.weight)
        key = (id(wq), self.weight.data_ptr(), self.weight._version, self.weight.dtype,
               tuple((t.data_ptr(), t._version) for t in list(wq.parameters()) + list(wq.buffers())))
        cached = self.__dict__.get("_wq_cache")
        if cached is None or cached[0] != key:
            cached = (key, wq(self.weight))
            self.__dict__["_wq_cache"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.act_bits is not None:
            x = fake_quant_per_token(x, self.act_bits, self.act_clip_ratio)
        return F.linear(x, self.quantized_weight(), self.bias)

    def quant_parameters(self) -> Iterator[nn.Parameter]:
        """Quantizer parameters (LWC gamma/beta, LDP theta)."""
        if self.weight_quantizer is not None:
            yield from self.weight_quantizer.quant_parameters()

    def latent_parameters(self) -> Iterator[nn.Parameter]:
        """The latent weight and the bias (if any)."""
        yield self.weight
        if self.bias is not None:
            yield self.bias

    @torch.no_grad()
    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes uint8 [out, in], levels float32 [out, n_groups, L])`` of the quantized weight."""
        if self.weight_quantizer is None:
            raise ValueError("this QuantLinear has no weight quantizer (full-precision weights)")
        return self.weight_quantizer.export(self.weight)

    @property
    def frozen(self) -> bool:
        """True once the weight quantizer is a :class:`FrozenLevelsQuantizer`."""
        return isinstance(self.weight_quantizer, FrozenLevelsQuantizer)

    @torch.no_grad()
    def freeze(self, codes: torch.Tensor | None = None, levels: torch.Tensor | None = None) -> "QuantLinear":
        """Replace the weight quantizer by its frozen form and the latent weight by the quantized weight, in place.

        Args:
            codes: uint8 ``[out, in]`` and
            levels: float32 ``[out, n_groups, L]`` to freeze to (GPTQ's result, or tensors loaded from disk); both
                None (default): the current quantizer's own :meth:`export`, so the output is bit-identical to before.
        Returns:
            ``self``. Without a weight quantizer (full-precision weights) nothing changes.
        """
        wq = self.weight_quantizer
        if wq is None:
            if codes is not None:
                raise ValueError("this QuantLinear has no weight quantizer (full-precision weights): nothing to freeze to")
            return self
        if (codes is None) != (levels is None):
            raise ValueError("freeze needs both codes and levels, or neither")
        if codes is None:
            codes, levels = wq.export(self.weight)
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ValueError(f"codes {tuple(codes.shape)} do not match the layer ({self.out_features}, {self.in_features})")
        fq = FrozenLevelsQuantizer(codes, levels, wq.config).to(self.weight.device)
        self.weight.data = fq(self.weight.data)
        self.weight_quantizer = fq
        return self

    def extra_repr(self) -> str:
        wq = self.weight_quantizer
        if isinstance(wq, FrozenLevelsQuantizer):
            w = f"w_bits={wq.bits}, frozen, w_group_size={wq.group_size}"
        elif wq is None:
            w = "w_bits=16"
        else:
            w = f"w_bits={wq.config.bits}, w_method={wq.config.method}, w_group_size={wq.config.group_size}, lwc={wq.config.learn_clip}"
        a = f"a_bits={16 if self.act_bits is None else self.act_bits}"
        if self.act_bits is not None:
            a += f", a_clip_ratio={self.act_clip_ratio}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {w}, {a}"


def clear_weight_cache(model: nn.Module) -> int:
    """Drop the evaluation cache of every :class:`QuantLinear` of ``model``; returns the bytes freed."""
    freed = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            cached = mod.__dict__.pop("_wq_cache", None)
            if cached is not None:
                freed += cached[1].numel() * cached[1].element_size()
    return freed


def cached_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the evaluation caches of the :class:`QuantLinear` layers of ``model`` (0 when none)."""
    return sum(m.__dict__["_wq_cache"][1].numel() * m.__dict__["_wq_cache"][1].element_size()
               for m in model.modules() if isinstance(m, QuantLinear) and "_wq_cache" in m.__dict__)


def freeze_model(model: nn.Module, progress: bool = False) -> nn.Module:
    """:meth:`QuantLinear.freeze` every quantized layer of ``model`` in place (outputs unchanged); returns the model.

    ``progress``: a bar over the layers (:func:`rcp_lib.progress.bar`); freezing an RTN layer with ``clip_search="mse"``
    runs its clip search (minutes for a whole model on a CPU), so the bar is labelled "RTN clip search" then."""
    from ..progress import bar

    layers = [mod for mod in model.modules() if isinstance(mod, QuantLinear)]
    searched = any(getattr(getattr(q.weight_quantizer, "config", None), "clip_search", "none") != "none"
                   for q in layers if isinstance(q.weight_quantizer, WeightQuantizer))
    for mod in bar(layers, desc="RTN clip search" if searched else "freeze", unit="layer", disable=not progress,
                   leave=False):
        mod.freeze()
    return model
