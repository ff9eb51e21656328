"""The name that the loader shim (``modeling_rcp.py``) of folders written before the deploy package imports
(``from rcp_lib.hf import Rcp<Family>Config, Rcp<Family>ForCausalLM``): the same classes as :mod:`rcp_lib.deploy.hf`,
so those folders keep loading with ``trust_remote_code=True``. New code imports :mod:`rcp_lib.deploy.hf`."""

from .deploy.hf import PACKED_CLASSES

globals().update({c.__name__: c for pair in PACKED_CLASSES.values() for c in pair})
__all__ = sorted(c.__name__ for pair in PACKED_CLASSES.values() for c in pair)
