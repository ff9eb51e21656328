"""The stable name the loader shim (``modeling_rcp.py``) of every packed folder imports
(``from rcp_lib.hf import Rcp<Family>Config, Rcp<Family>ForCausalLM``): the classes of :mod:`rcp_lib.deploy.hf`, where
the quantizer lives. A folder thus loads with ``trust_remote_code=True`` whichever rcp_lib version wrote it."""

from .deploy.hf import CLASSES

globals().update(CLASSES)
__all__ = sorted(CLASSES)
