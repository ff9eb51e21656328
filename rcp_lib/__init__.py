"""rcp_lib: companion library to RCP (arXiv 2502.15779) and GSR (arXiv 2505.03810).

Public API (re-exported here; see each module for details):

* models:     ``load``                                  (rcp_lib.models)
* data:       ``load_corpus``, ``tokenize``, ``corpus_tokens``, ``calibration_windows``   (rcp_lib.data)
* rotate:     ``rotate_model``, ``RotationConfig``, ``hadamard``, ``walsh``, ``gsr``       (rcp_lib.rotation)
* quantize:   ``quantize_model``, ``QuantConfig``, ``preset``, ``gptq_model``, ``freeze_model``  (rcp_lib.quant)
* recipe:     ``Recipe`` (rotation + quant + PTQ + QAT: one setting, one object)          (rcp_lib.recipe)
* train:      ``train``, ``QATConfig``                  (rcp_lib.qat)
* evaluate:   ``perplexity``, ``zero_shot``             (rcp_lib.evaluation)
* deploy:     ``save_quantized``, ``load_quantized``, ``footprint``   (rcp_lib.deploy, rcp_lib.memory)

Importing rcp_lib registers, explicitly and once, the "rcp" quantization method and the ``rcp_<family>`` model types
of packed folders with transformers (:func:`rcp_lib.deploy.hf.register`), so ``AutoModelForCausalLM.from_pretrained(DIR)``
loads a folder written by ``save_quantized``; a process that has not imported rcp_lib refuses such a folder (unknown
model type) unless ``trust_remote_code=True`` lets the folder's ``modeling_rcp.py`` import rcp_lib. Importing rcp_lib
therefore imports transformers: set ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` before it where they matter.
"""

__version__ = "0.1.0"

from pathlib import Path as _Path

# ``rcp_lib.kernels`` is the top-level ``kernels/`` folder (the project's layout keeps it there). An install maps it
# with setuptools' ``package-dir``; a source checkout run from its own folder (``PYTHONPATH=.``, a git worktree next to
# an editable install of another checkout, a bare copy of the tree on a GPU machine) finds it here, explicitly: the
# checkout root is searched for rcp_lib's subpackages after ``rcp_lib/`` itself, so the kernels imported are always
# the ones beside this ``rcp_lib``. Only in a checkout (a ``pyproject.toml`` beside ``kernels/__init__.py``): an
# installed package's parent is site-packages, which must never be searched.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "kernels" / "__init__.py").is_file() and (_CHECKOUT / "pyproject.toml").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (the package's own search path)

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
from .deploy.hf import register as _register_with_transformers

_register_with_transformers()  # transformers' "rcp" quantization method and the rcp_<family> model types

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
        from . import deploy

        return getattr(deploy, name)
    raise AttributeError(f"module 'rcp_lib' has no attribute {name!r}")
