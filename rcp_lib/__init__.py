"""rcp_lib: companion library to RCP (arXiv 2502.15779) and GSR (arXiv 2505.03810).

Public API (re-exported here; see each module for details):

* models:     ``load``                                  (rcp_lib.models)
* data:       ``load_corpus``, ``tokenize``, ``corpus_tokens``, ``calibration_windows``   (rcp_lib.data)
* rotate:     ``rotate_model``, ``RotationConfig``, ``hadamard``, ``walsh``, ``gsr``       (rcp_lib.rotation)
* quantize:   ``quantize_model``, ``QuantConfig``, ``preset``, ``gptq_model``, ``freeze_model``  (rcp_lib.quant)
* recipe:     ``Recipe`` (rotation + quant + PTQ + QAT: one setting, one object)          (rcp_lib.recipe)
* train:      ``train``, ``QATConfig``                  (rcp_lib.qat)
* evaluate:   ``perplexity``, ``zero_shot``             (rcp_lib.evaluation)
* deploy:     ``save_quantized``, ``load_quantized``, ``footprint``   (rcp_lib.packing, rcp_lib.memory)

Importing rcp_lib registers the "rcp" quantization method with transformers (rcp_lib.hf), so
``AutoModelForCausalLM.from_pretrained(DIR)`` loads a folder written by ``save_quantized``.
"""

__version__ = "0.1.0"

from .data import calibration_windows, corpus_tokens, load_corpus, tokenize
from .evaluation import perplexity, perplexity_details
from .memory import footprint
from .models import load
from .qat import QATConfig, train
from .quant.apply import QuantConfig, preset, quantize_model
from .quant.calibrate import gptq_model
from .quant.linear import freeze_model
from .recipe import Recipe
from .rotation import RotationConfig, gsr, hadamard, rotate_model, walsh
from ._hf_hook import install as _install_hf_quantizer

_install_hf_quantizer()  # transformers' "rcp" quantization method, registered when transformers loads its quantizers

__all__ = [
    "__version__",
    "load",
    "load_corpus",
    "tokenize",
    "corpus_tokens",
    "calibration_windows",
    "perplexity",
    "perplexity_details",
    "zero_shot",
    "rotate_model",
    "RotationConfig",
    "hadamard",
    "walsh",
    "gsr",
    "quantize_model",
    "QuantConfig",
    "preset",
    "Recipe",
    "gptq_model",
    "freeze_model",
    "train",
    "QATConfig",
    "footprint",
    "save_quantized",
    "load_quantized",
]


def __getattr__(name: str):
    # heavier / optional pieces are imported on first use
    if name == "zero_shot":
        from .evaluation.zero_shot import zero_shot

        return zero_shot
    if name in ("save_quantized", "load_quantized"):
        from . import packing

        return getattr(packing, name)
    raise AttributeError(f"module 'rcp_lib' has no attribute {name!r}")
