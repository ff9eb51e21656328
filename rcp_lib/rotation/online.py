"""Online rotations that live in the forward pass (R3 on queries/keys, R4 on the down_proj input).

* :class:`OnlineHadamard` - ``x -> x @ H`` over the last dim with the fast transform.
* :class:`InputRotatedLinear` - an ``nn.Linear`` whose input first goes through ``input_transform``
  (used for R4: ``down_proj(x H4)`` with ``H4ᵀ`` fused into the weight). It *is* an ``nn.Linear`` with
  the same parameters and state-dict keys, so saving/loading and quantizer surgery see an ordinary layer.
* The attention functions ``"rcp_sdpa"`` / ``"rcp_eager"`` registered with transformers'
  ``AttentionInterface`` (a documented extension point; nothing of transformers is monkeypatched). They
  receive post-RoPE queries and the cache-updated keys/values from the attention module's forward
  (``LlamaAttention`` / ``MistralAttention`` / ``Qwen2Attention``), apply the attention module's optional
  ``rcp_qk_rotation`` (R3) to queries and keys, then its optional ``rcp_kv_quantizer`` (KV4 fake quantization)
  to keys and values, and delegate to transformers' sdpa function or to the eager function of the module's own
  family (:meth:`rcp_lib.families.Family.eager_attention`). The same mask functions as sdpa / eager are
  registered for the two names, so a sliding window (Mistral, Qwen2) is applied through the mask exactly as
  without them. Because rotation and quantization are deterministic per token and head, rotating+quantizing
  cached keys at use is the same as caching rotated, quantized keys, so generation with a KV cache keeps working.
  Pinned against transformers 5.23 (the attention modules pass ``(module, q, k, v, mask, dropout=, scaling=,
  [sliding_window=])``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hadamard import apply_hadamard, hadamard

RCP_ATTENTION = {"sdpa": "rcp_sdpa", "eager": "rcp_eager"}


def online_hadamard(x: torch.Tensor, n: int, block: int | None = None) -> torch.Tensor:
    """``x [..., n] @ H`` with the fast transform: the full ``H_n`` (``block`` None or 0), else
    ``kron(I_{n/block}, H_block)``. What :class:`OnlineHadamard` computes (and the deployed op's reference)."""
    if not block:
        return apply_hadamard(x, n)
    lead = x.shape[:-1]
    return apply_hadamard(x.reshape(*lead, n // block, block), block).reshape(*lead, n)


class OnlineHadamard(nn.Module):
    """``x [..., n] -> x @ H`` with the fast transform. No parameters.

    ``H = hadamard(n)``, or with ``block`` the block-diagonal ``kron(I_{n/block}, hadamard(block))`` (the
    explicit option for sizes with no full Hadamard construction, e.g. 10944 with block 64).
    """

    def __init__(self, n: int, block: int | None = None):
        super().__init__()
        self.n = int(n)
        self.block = int(block) if block else None
        if self.block is not None and self.n % self.block:
            raise ValueError(f"OnlineHadamard block {self.block} does not divide n={self.n}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"OnlineHadamard({self.n}) got an input with last dim {x.shape[-1]}")
        return online_hadamard(x, self.n, self.block)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The dense ``[n, n]`` matrix this module multiplies by."""
        if self.block is None:
            return hadamard(self.n, dtype)
        return torch.block_diag(*([hadamard(self.block, dtype)] * (self.n // self.block)))

    def extra_repr(self) -> str:
        return f"n={self.n}" + (f", block={self.block}" if self.block else "")


class InputRotatedLinear(nn.Linear):
    """``y = F.linear(input_transform(x), W, b)``; same parameters and state-dict keys as ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, input_transform: nn.Module,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_transform = input_transform

    @classmethod
    def wrap(cls, linear: nn.Linear, input_transform: nn.Module) -> "InputRotatedLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.input_transform = input_transform
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_transform(x), self.weight, self.bias)


def _rcp_attention(base: str):
    def fn(module, query, key, value, attention_mask, **kwargs):
        rot = getattr(module, "rcp_qk_rotation", None)
        if rot is not None:
            query = rot(query)
            key = rot(key)
        kvq = getattr(module, "rcp_kv_quantizer", None)
        if kvq is not None:
            key, value = kvq(key, value)
        if base == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        from ..families import family_of

        return family_of(module).eager_attention()(module, query, key, value, attention_mask, **kwargs)

    fn.__name__ = f"rcp_{base}_attention"
    return fn


_REGISTERED = False


def register_attention() -> None:
    """Register ``rcp_sdpa`` / ``rcp_eager`` with transformers (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

    for base, name in RCP_ATTENTION.items():
        AttentionInterface.register(name, _rcp_attention(base))
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask if base == "sdpa" else eager_mask)
    _REGISTERED = True


def use_rcp_attention(model: nn.Module) -> None:
    """Switch a model's attention to the matching ``rcp_*`` function (keeps sdpa vs eager)."""
    register_attention()
    cur = model.config._attn_implementation or "sdpa"
    if cur in RCP_ATTENTION.values():
        return
    base = "eager" if cur == "eager" else "sdpa"
    model.config._attn_implementation = RCP_ATTENTION[base]
