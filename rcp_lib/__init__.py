"""rcp_lib: companion library to RCP (arXiv 2502.15779) and GSR (arXiv 2505.03810).

Public API (re-exported here; see each module for details).
"""

__version__ = "0.1.0"

from .data import calibration_windows, corpus_tokens, load_corpus, tokenize
from .evaluation import perplexity, perplexity_details
from .models import load

__all__ = [
    "__version__",
    "load",
    "load_corpus",
    "tokenize",
    "corpus_tokens",
    "calibration_windows",
    "perplexity",
    "perplexity_details",
]
