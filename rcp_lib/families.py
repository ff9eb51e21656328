"""Model families: the registry of transformers decoder architectures that rcp_lib rotates, quantizes and trains.

Every registered family has the LLaMA block layout that :mod:`rcp_lib.models` reads (``model.embed_tokens``,
``model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp.{gate,up,down}_proj}``,
``model.norm``, ``lm_head``; RMSNorm without bias; RoPE applied inside the attention module before the attention
function). What differs between the families, and therefore lives here and only here:

* which ``config.model_type`` / ``*ForCausalLM`` class is accepted (and named in the one error for the others);
* the transformers modeling module whose ``eager_attention_forward`` the ``rcp_eager`` attention function of
  :mod:`rcp_lib.rotation.online` delegates to (nothing of LLaMA's is hard-wired there);
* ``qkv_bias``: Qwen2's q/k/v projections carry biases. No special rotation code is needed: R1 acts on the
  projections' inputs (biases unchanged), norm folding scales inputs (biases unchanged), and R2 rotates the
  v_proj *output* per head, which :func:`rcp_lib.rotation.fuse.rotate_model` applies to the v bias as well
  (``b -> b R2``); the flag documents this and makes :func:`rcp_lib.models.tiny_model` give those biases random
  non-zero values so that the family tests exercise it;
* ``sliding_window``: Mistral and Qwen2 may attend within a window. The window lives in the attention *mask*,
  which transformers builds with the mask function registered for the ``rcp_*`` names (the sdpa / eager ones),
  so rotations and KV quantization are unaffected; the tiny test configs set a small window so that it acts;
* ``tiny_config``: config keyword arguments that make :func:`rcp_lib.models.tiny_model` exercise the
  family's specifics (e.g. the small sliding window).

Adding a family with the LLaMA block layout: one :class:`Family` entry in :data:`FAMILIES`;
``tests/test_families.py`` runs every registered family through rotation invariance, KV-cache generation, a
W2A4KV4 forward, the packed round trip and the memory accountant. (A family with another block layout, e.g. a
fused qkv projection, would also need :mod:`rcp_lib.models` to read its layout from the family.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable


class UnsupportedModelError(ValueError):
    """Raised for an architecture this library cannot rotate/quantize."""


@dataclass(frozen=True)
class Family:
    """What rcp_lib needs to know about one transformers decoder family (see the module docstring).

    Attributes:
        model_type: ``config.model_type`` (the registry key), e.g. ``"qwen2"``.
        causal_lm_class: name of the ``*ForCausalLM`` class exported by ``transformers``.
        config_class: name of the config class exported by ``transformers``.
        modeling_module: the transformers module that defines the family's ``eager_attention_forward``.
        qkv_bias: the q/k/v projections carry biases (o_proj and the MLP do not).
        sliding_window: the family may use sliding-window attention (a mask property only).
        tiny_config: config keyword arguments for :func:`rcp_lib.models.tiny_model` (tests only).
    """

    model_type: str
    causal_lm_class: str
    config_class: str
    modeling_module: str
    qkv_bias: bool = False
    sliding_window: bool = False
    tiny_config: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def eager_attention(self) -> Callable:
        """The family's ``eager_attention_forward(module, query, key, value, attention_mask, **kwargs)``.

        ``query [B, heads, T, head_dim]``, ``key`` / ``value [B, kv_heads, S, head_dim]``; returns
        ``(attn_output [B, T, heads, head_dim], attn_weights [B, heads, T, S])``.
        """
        return importlib.import_module(self.modeling_module).eager_attention_forward

    def make_config(self, **kwargs: Any):
        """A transformers config of this family: ``tiny_config`` overridden by ``kwargs``."""
        import transformers

        return getattr(transformers, self.config_class)(**{**self.tiny_config, **kwargs})

    def causal_lm(self) -> type:
        """The transformers ``*ForCausalLM`` class."""
        import transformers

        return getattr(transformers, self.causal_lm_class)

    @property
    def packed_model_type(self) -> str:
        """``config.model_type`` of this family's packed folders (:mod:`rcp_lib.deploy.hf`), e.g. ``"rcp_llama"``: a type
        plain transformers does not know, so that a packed folder is refused, never loaded as random weights,
        by a process that has not imported rcp_lib."""
        return f"rcp_{self.model_type}"


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", "LlamaConfig", "transformers.models.llama.modeling_llama"),
        Family("mistral", "MistralForCausalLM", "MistralConfig", "transformers.models.mistral.modeling_mistral",
               sliding_window=True, tiny_config={"sliding_window": 8}),
        # layer 0 full attention, layers >= 1 sliding (Qwen2's max_window_layers), so both kinds are exercised
        Family("qwen2", "Qwen2ForCausalLM", "Qwen2Config", "transformers.models.qwen2.modeling_qwen2",
               qkv_bias=True, sliding_window=True,
               tiny_config={"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),
    )
}
"""The registry: ``config.model_type`` -> :class:`Family`."""

PACKED_FAMILIES: dict[str, Family] = {f.packed_model_type: f for f in FAMILIES.values()}
"""``model_type`` of a packed folder (``rcp_<family>``, :attr:`Family.packed_model_type`) -> :class:`Family`."""

SUPPORTED: tuple[str, ...] = tuple(FAMILIES)
"""The supported ``model_type`` values, in registry order."""


def describe_supported() -> str:
    """``"llama (LlamaForCausalLM), mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM)"``."""
    return ", ".join(f"{f.model_type} ({f.causal_lm_class})" for f in FAMILIES.values())


def family_of(model_or_config: Any) -> Family:
    """The :class:`Family` of a ``model_type`` string, a transformers config, or anything with a ``.config`` (a
    model, an attention module); a packed model's ``rcp_<family>`` type maps to its family.

    Raises:
        UnsupportedModelError: no config, or a ``model_type`` that is not registered (the message names the
            supported families).
    """
    if isinstance(model_or_config, str):
        mt = model_or_config
    else:
        mt = getattr(getattr(model_or_config, "config", model_or_config), "model_type", None)
    fam = (FAMILIES.get(mt) or PACKED_FAMILIES.get(mt)) if isinstance(mt, str) else None
    if fam is None:
        what = f"model_type={mt!r}" if mt is not None else f"{type(model_or_config).__name__} without a transformers config"
        raise UnsupportedModelError(
            f"Unsupported model family: {what}. rcp_lib supports {describe_supported()}; "
            f"a new family is one Family entry in rcp_lib/families.py.")
    return fam
