"""rcp_lib.deploy: what leaves the library: the packed folder format (:mod:`.format`: the one quantized-tensor format,
``save_quantized`` / ``check_folder`` / ``load_quantized``, :func:`deploy`) and the transformers quantizer "rcp" that
loads such a folder in ``AutoModelForCausalLM.from_pretrained`` (:mod:`.hf`, registered explicitly by
``import rcp_lib``). The deployed layer itself, :class:`~rcp_lib.kernels.packed_linear.PackedLinear`, lives beside
the kernels it dispatches to and is re-exported here.

Imports go one way: :mod:`.hf` imports :mod:`.format`, which imports the kernels; nothing below imports this package.
"""

from ..kernels.packed_linear import PackedLinear
from .format import (FORMAT_VERSION, READ_VERSIONS, PackedFolder, PackedFormatError, check_folder, check_format_version,
                     check_output_folder, compute_dtype, deploy, install_packed_layers, load_quantized,
                     fuse_gated_mlps, load_quantized_state, load_quantized_state_dict, merge_shared_inputs,
                     packed_model_bytes, packed_source,
                     quantized_state_dict, save_quantized, save_quantized_state)

__all__ = ["FORMAT_VERSION", "READ_VERSIONS", "PackedFolder", "PackedFormatError", "PackedLinear", "check_folder",
           "check_format_version", "check_output_folder", "compute_dtype", "deploy", "fuse_gated_mlps",
           "install_packed_layers",
           "load_quantized", "load_quantized_state", "load_quantized_state_dict", "merge_shared_inputs",
           "packed_model_bytes", "packed_source", "quantized_state_dict", "save_quantized", "save_quantized_state"]
