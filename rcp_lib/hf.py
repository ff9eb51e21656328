"""The stable name the loader shim (``modeling_rcp.py``) of every packed folder imports
(``from rcp_lib.hf import Rcp<Family>Config, Rcp<Family>ForCausalLM``): the classes of :mod:`rcp_lib.deploy.hf`, where
the quantizer lives. A folder thus loads with ``trust_remote_code=True`` whichever rcp_lib version wrote it."""

from .deploy.hf import PACKED_CLASSES

globals().update({c.__name__: c for pair in PACKED_CLASSES.values() for c in pair})
__all__ = sorted(c.__name__ for pair in PACKED_CLASSES.values() for c in pair)
