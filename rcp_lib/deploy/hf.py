"""rcp_lib in transformers: the "rcp" quantization method and the ``rcp_<family>`` model types of packed folders.

``import rcp_lib`` calls :func:`register` once, explicitly (no import hook): it registers

* :class:`RcpConfig` / :class:`RcpHfQuantizer` as transformers' "rcp" quantization method
  (``register_quantization_config`` + ``register_quantizer``), and
* for every family of :data:`rcp_lib.families.FAMILIES` a config class ``Rcp<Config>`` of ``model_type``
  ``rcp_<family>`` (e.g. :class:`RcpLlamaConfig`, ``"rcp_llama"``) and a causal-LM class ``Rcp<Family>ForCausalLM``
  (plain subclasses of the transformers classes), with ``AutoConfig.register`` / ``AutoModelForCausalLM.register``.

Why a model type of our own: a packed folder's ``config.json`` says ``"model_type": "rcp_llama"``. A process that has
not imported rcp_lib does not know that type, so ``AutoModelForCausalLM.from_pretrained(DIR)`` refuses the folder
(transformers asks for ``trust_remote_code=True``, which runs the folder's ``modeling_rcp.py``: it imports this
module) instead of skipping the unknown quantization method and returning random weights.

Loading (``AutoModelForCausalLM.from_pretrained(DIR)`` after ``import rcp_lib``):

1. the model is built from the config on the meta device (transformers' own init context);
2. :meth:`RcpHfQuantizer.validate_environment` checks the format version, then
   ``_process_model_before_weight_loading`` checks the folder (:func:`rcp_lib.deploy.check_folder`: checksums,
   manifest, safetensors headers) and re-runs rcp_lib's surgery on the skeleton
   (:func:`rcp_lib.deploy.install_packed_layers`), then checks that the skeleton's state dict is exactly the
   stored tensors;
3. transformers loads the packed tensors (int32 codes, LUTs in their stored dtype, the rest cast to the requested
   dtype) straight into those buffers: no full-precision copy of a quantized projection is built.

``model.save_pretrained`` of a loaded model is refused (``is_serializable`` is False: transformers would write no
manifest); write folders with :func:`rcp_lib.deploy.save_quantized`, which also takes a loaded model.

Imports: this module imports transformers, :mod:`rcp_lib.families` and :mod:`rcp_lib.deploy.format` at import time;
nothing it imports imports it back (no cycle). The loader shim of a folder imports these classes by the stable name
:mod:`rcp_lib.hf`.
"""

from __future__ import annotations

import importlib
from typing import Any

import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..families import FAMILIES, Family
from .format import PackedFormatError, check_folder, check_format_version, install_packed_layers

METHOD = "rcp"


class RcpConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of an rcp_lib packed folder.

    Attributes:
        format_version: :data:`rcp_lib.deploy.FORMAT_VERSION` of the writer.
        rotation: :meth:`RotationConfig.to_dict` (R1 kind, block, seed, R2/R3/R4 flags), or None.
        quant: :meth:`QuantConfig.to_dict` (weight bits, group size, method; activation and KV bits and clip ratios).
        storage_dtype: "float16" or "float32" (the LUTs and the full-precision tensors as stored).
    """

    def __init__(self, format_version: int | None = None, rotation: dict | None = None, quant: dict | None = None,
                 storage_dtype: str = "float16", quant_method: str = METHOD, **kwargs: Any):
        self.quant_method = METHOD
        self.format_version = format_version
        self.rotation = rotation
        self.quant = quant
        self.storage_dtype = storage_dtype
        self.unknown = dict(kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": METHOD, "format_version": self.format_version, "storage_dtype": self.storage_dtype,
                "rotation": self.rotation, "quant": self.quant, **self.unknown}


class RcpHfQuantizer(HfQuantizer):
    """Loads a pre-quantized rcp_lib folder (see module docstring). It never quantizes a full-precision model."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        check_format_version(self.quantization_config.format_version, "config.json")
        if not self.pre_quantized:
            raise ValueError("the rcp quantization method loads folders written by rcp_lib.deploy.save_quantized; "
                             "to quantize a model use rcp_lib.rotate_model + rcp_lib.quantize_model")

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> Any:
        from pathlib import Path

        if not checkpoint_files:
            raise PackedFormatError("the rcp quantizer needs the folder's safetensors files")
        folder = check_folder(Path(checkpoint_files[0]).parent)
        return install_packed_layers(model, folder)

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return False


def _packed_classes(fam: Family) -> tuple[type, type]:
    """``(Rcp<Config>, Rcp<Family>ForCausalLM)``: the family's transformers classes under the packed model type."""
    base_cfg = getattr(transformers, fam.config_class)
    base_lm = getattr(importlib.import_module(fam.modeling_module), fam.causal_lm_class)
    cfg = type(f"Rcp{fam.config_class}", (base_cfg,), {
        "model_type": fam.packed_model_type, "__module__": __name__,
        "__doc__": f"{fam.config_class} of an rcp_lib packed folder (model_type {fam.packed_model_type!r})."})
    lm = type(f"Rcp{fam.causal_lm_class}", (base_lm,), {
        "config_class": cfg, "__module__": __name__,
        "__doc__": f"{fam.causal_lm_class} whose packed projections the 'rcp' quantizer installs while loading."})
    return cfg, lm


PACKED_CLASSES: dict[str, tuple[type, type]] = {fam.packed_model_type: _packed_classes(fam) for fam in FAMILIES.values()}
"""``rcp_<family>`` -> ``(config class, causal-LM class)``; each class is also a name of this module (the folder's
``modeling_rcp.py`` imports them from here)."""
#: every packed class by its name: names of this module and of :mod:`rcp_lib.hf`, the name the folders' shim imports
CLASSES: dict[str, type] = {c.__name__: c for pair in PACKED_CLASSES.values() for c in pair}
globals().update(CLASSES)


def register() -> None:
    """Register the "rcp" quantization method and the ``rcp_<family>`` model types with transformers (idempotent;
    called once by ``import rcp_lib``)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is not RcpConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(METHOD, None)  # a stale class from a reloaded module
        register_quantization_config(METHOD)(RcpConfig)
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is not RcpHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(METHOD, None)
        register_quantizer(METHOD)(RcpHfQuantizer)
    for model_type, (cfg, lm) in PACKED_CLASSES.items():
        AutoConfig.register(model_type, cfg, exist_ok=True)
        AutoModelForCausalLM.register(cfg, lm, exist_ok=True)
