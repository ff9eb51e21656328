"""The "rcp" quantization method of transformers: ``AutoModelForCausalLM.from_pretrained(DIR)`` on a folder written by
:func:`rcp_lib.packing.save_quantized`.

``import rcp_lib`` calls :func:`register` (``register_quantization_config("rcp")`` + ``register_quantizer("rcp")``).
From then on transformers reads ``config.json``'s ``quantization_config`` (``quant_method: "rcp"``) into
:class:`RcpConfig` and loads the folder through :class:`RcpHfQuantizer`:

1. the model is built from the config on the meta device (transformers' own init context);
2. ``_process_model_before_weight_loading`` checks the folder (:func:`rcp_lib.packing.check_folder`: format version,
   checksums, manifest, safetensors headers) and re-runs rcp_lib's surgery on the skeleton
   (:func:`rcp_lib.packing.install_packed_layers`: ``rotate_model(fuse_weights=False)`` for the online R3/R4 and the
   ``rcp_*`` attention function, ``quantize_model`` with empty :class:`~rcp_lib.packing.PackedLinear` layers and the
   KV quantizers), then checks that the skeleton's state dict is exactly the stored tensors;
3. transformers loads the packed tensors (int32 codes, LUTs in their stored dtype, the rest cast to the requested
   dtype) straight into those buffers: no full-precision copy of a quantized projection is built.

A process that has not imported rcp_lib (the ``lm_eval`` command line) loads the folder with
``trust_remote_code=True``: ``config.json``'s ``auto_map`` points to the folder's ``modeling_rcp.py``, which imports
rcp_lib (registering the quantizer) and subclasses the family's transformers class.

``model.save_pretrained`` of a loaded model is refused (``is_serializable`` is False: transformers would write no
manifest); write folders with :func:`rcp_lib.packing.save_quantized`, which also takes a loaded model.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

METHOD = "rcp"


class RcpConfig(QuantizationConfigMixin):
    """``config.json``'s ``quantization_config`` of an rcp_lib packed folder.

    Attributes:
        format_version: :data:`rcp_lib.packing.FORMAT_VERSION` of the writer.
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
        from .packing import FORMAT_VERSION, PackedFormatError

        ver = self.quantization_config.format_version
        if ver != FORMAT_VERSION:
            raise PackedFormatError(f"packed format version {ver!r} in config.json; this rcp_lib reads version "
                                    f"{FORMAT_VERSION} (re-export the model with this version)")
        if not self.pre_quantized:
            raise ValueError("the rcp quantization method loads folders written by rcp_lib.packing.save_quantized; "
                             "to quantize a model use rcp_lib.rotate_model + rcp_lib.quantize_model")

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> Any:
        from pathlib import Path

        from .packing import PackedFormatError, check_folder, install_packed_layers

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


def register() -> None:
    """Register :class:`RcpConfig` and :class:`RcpHfQuantizer` as transformers' "rcp" method (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is not RcpConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(METHOD, None)  # a stale class from a reloaded module
        register_quantization_config(METHOD)(RcpConfig)
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is not RcpHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(METHOD, None)
        register_quantizer(METHOD)(RcpHfQuantizer)
