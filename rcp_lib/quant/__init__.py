"""Fake quantization for RCP-style W/A/KV quantization: weight quantizers (RTN, LWC, LDP), per-token activation
and KV quantizers, the quantized linear layer and GPTQ.

The model-level surgery (``quantize_model``) lives in :mod:`rcp_lib.quant.apply`.
"""

from .activations import check_act_bits, dequantize_per_token, fake_quant_kv, fake_quant_per_token, quantize_per_token
from .gptq import GPTQResult, HessianAccumulator, gptq_quantize
from .linear import QuantLinear, freeze_model
from .quantizers import (
    FrozenLevelsQuantizer,
    WeightQuantConfig,
    WeightQuantizer,
    check_weight_bits,
    fake_quant_uniform,
    group_view,
    ldp_fractions,
    ldp_levels,
    lloyd_fractions,
    lwc_range,
    minmax_range,
    nearest_level_codes,
    quantize_to_levels,
    quantize_uniform,
    round_ste,
    uniform_levels,
)

__all__ = [
    "FrozenLevelsQuantizer",
    "freeze_model",
    "WeightQuantConfig",
    "WeightQuantizer",
    "check_weight_bits",
    "fake_quant_uniform",
    "group_view",
    "ldp_fractions",
    "ldp_levels",
    "lloyd_fractions",
    "lwc_range",
    "minmax_range",
    "nearest_level_codes",
    "quantize_to_levels",
    "quantize_uniform",
    "round_ste",
    "uniform_levels",
    "check_act_bits",
    "fake_quant_per_token",
    "quantize_per_token",
    "dequantize_per_token",
    "fake_quant_kv",
    "QuantLinear",
    "GPTQResult",
    "HessianAccumulator",
    "gptq_quantize",
]
