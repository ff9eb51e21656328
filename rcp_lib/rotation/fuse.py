"""Fusing rotations into a model of a registered family (:mod:`rcp_lib.families`: llama, mistral, qwen2)
(QuaRot / SpinQuant R1-R4; GSR for R1).

Row-vector convention (``nn.Linear``: ``y = x Wᵀ``, ``W`` is ``[out, in]``). For an orthogonal ``R``:

* rotating a layer's *input* space (``x -> x R``) keeps the output when ``W -> W R``;
* rotating a layer's *output* space (``y -> y R``) is ``W -> Rᵀ W`` and ``b -> b R``.

:func:`rotate_model` does, in place and in float64 arithmetic:

1. untie ``embed_tokens`` / ``lm_head`` (tied models such as SmolLM2 and LLaMA-3.2 break otherwise);
2. fold every RMSNorm weight ``g`` into the following linears (``W -> W diag(g)``) and set ``g = 1``; an
   RMSNorm without weight commutes with any orthogonal ``R`` because it preserves the RMS;
3. R1 on the residual stream: ``E -> E R1``; q/k/v/gate/up/lm_head inputs ``W -> W R1``; o_proj/down_proj
   outputs ``W -> R1ᵀ W``;
4. R2 per attention head (``head_dim x head_dim``) on the v_proj output (weight and, for Qwen2, bias) and the
   o_proj input, for any head count and GQA (every KV head and every query head uses the same R2); the q/k/v
   biases are on the output side, so norm folding and R1 (input side) leave them unchanged;
5. R3: an online Hadamard on queries and keys after RoPE (``q kᵀ`` unchanged), through the ``rcp_*``
   attention functions of :mod:`rcp_lib.rotation.online`;
6. R4: an online Hadamard on the down_proj input, its transpose fused into down_proj (``W -> W H4``).

In exact arithmetic the rotated model computes the same function; the tests check the logits.
Inputs are validated (architecture, sizes, block sizes) before anything is changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import models as M
from ..config import JsonConfig
from .hadamard import hadamard, random_hadamard, random_orthogonal
from .online import InputRotatedLinear, OnlineHadamard, use_rcp_attention
from .walsh import block_hadamard, gsr, largest_pow2_divisor

R1_KINDS = ("none", "hadamard", "random_hadamard", "walsh", "gsr", "block_hadamard", "random_orthogonal")
BLOCK_KINDS = ("gsr", "block_hadamard")  # R1 kinds built from blocks of size r1_block
R2_KINDS = ("hadamard", "random_hadamard")


@dataclass
class RotationConfig(JsonConfig):
    """Which rotations to fuse. Round-trips to JSON (``to_dict`` / ``from_dict``).

    Attributes:
        r1: residual-stream rotation: "none", "hadamard" (Kronecker/Sylvester, natural order),
            "random_hadamard" (QuaRot's R1: Hadamard times random signs), "walsh" (sequency-ordered Walsh,
            full size; needs a power-of-two hidden size), "gsr" (GSR: block-diagonal of sequency-ordered Walsh
            blocks of size ``r1_block``), "block_hadamard" (the same blocks in natural Hadamard order: the control
            that separates GSR's sequency order from its block-diagonal structure), "random_orthogonal".
        r1_block: block size for "gsr" / "block_hadamard", required for those kinds and must divide the hidden
            size. Our reading of GSR: the block equals the weight quantization group (64 or 128); the
            experiments set it to the profile's group size and record it in every row.
        r1_random_signs: multiply the GSR/Walsh/block-Hadamard matrix by a random ±1 diagonal on the input
            side, ``diag(s) @ R`` (seeded).
        r2: fuse a per-head rotation into v_proj/o_proj.
        r2_kind: "hadamard" or "random_hadamard".
        r3: online Hadamard on queries and keys after RoPE.
        r4: online Hadamard on the down_proj input.
        r4_block: None for the full Hadamard of the intermediate size; a power of two dividing it for a
            block-diagonal Hadamard instead (the explicit option for sizes with no full construction here,
            e.g. 10944 = 171 · 64, or to trade mixing for speed).
        seed: seed of every random choice.
    """

    r1: str = "random_hadamard"
    r1_block: int | None = None
    r1_random_signs: bool = False
    r2: bool = True
    r2_kind: str = "hadamard"
    r3: bool = True
    r4: bool = True
    r4_block: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.r1 not in R1_KINDS:
            raise ValueError(f"unknown r1={self.r1!r}; choose one of {R1_KINDS}")
        if self.r2_kind not in R2_KINDS:
            raise ValueError(f"unknown r2_kind={self.r2_kind!r}; choose one of {R2_KINDS}")
        for n in ("r1_block", "r4_block"):
            b = getattr(self, n)
            if b is not None and (b < 1 or b & (b - 1)):
                raise ValueError(f"{n} must be a positive power of two or None, got {b}")
        if self.r1 in BLOCK_KINDS and self.r1_block is None:
            raise ValueError(f"r1={self.r1!r} needs r1_block (a power of two dividing the hidden size; GSR's blocks "
                             f"match the weight quantization group, e.g. r1_block=64 or 128)")

    @property
    def is_identity(self) -> bool:
        return self.r1 == "none" and not (self.r2 or self.r3 or self.r4)


def r1_matrix(kind: str, n: int, block: int | None = None, random_signs: bool = False, seed: int = 0) -> torch.Tensor | None:
    """The residual rotation ``R1`` ``[n, n]`` float64 (orthogonal), or None for "none"."""
    if kind == "none":
        return None
    if kind == "hadamard":
        return hadamard(n)
    if kind == "random_hadamard":
        return random_hadamard(n, seed)
    if kind == "random_orthogonal":
        return random_orthogonal(n, seed)
    if kind == "walsh":
        if n & (n - 1):
            raise ValueError(
                f"r1='walsh' needs a power-of-two hidden size, got {n}; use r1='gsr' with r1_block dividing {n} "
                f"(largest power-of-two block: {largest_pow2_divisor(n)})")
        return gsr(n, n, random_signs=random_signs, seed=seed)
    if kind in BLOCK_KINDS:
        if block is None:
            raise ValueError(f"r1={kind!r} needs a block size (r1_block), e.g. the weight group size")
        if n % block:
            raise ValueError(f"r1_block={block} does not divide the hidden size {n} (largest power-of-two block "
                             f"that does: {largest_pow2_divisor(n)})")
        build = gsr if kind == "gsr" else block_hadamard
        return build(n, block, random_signs=random_signs, seed=seed)
    raise ValueError(f"unknown r1 kind {kind!r}; choose one of {R1_KINDS}")


def r2_matrix(kind: str, head_dim: int, seed: int) -> torch.Tensor:
    """The per-head rotation ``R2`` ``[head_dim, head_dim]`` float64 (random signs seeded with ``seed + 1``)."""
    return hadamard(head_dim) if kind == "hadamard" else random_hadamard(head_dim, seed + 1)


# ---------------------------------------------------------------------------------------------------
# float64 weight updates
# ---------------------------------------------------------------------------------------------------


def _rotate_input(lin: nn.Linear, R: torch.Tensor) -> None:
    W = lin.weight.data
    lin.weight.data = (W.double() @ R.to(W.device)).to(W.dtype)


def _rotate_output(lin: nn.Linear, R: torch.Tensor) -> None:
    W = lin.weight.data
    lin.weight.data = (R.to(W.device).T @ W.double()).to(W.dtype)
    if lin.bias is not None:
        b = lin.bias.data
        lin.bias.data = (b.double() @ R.to(b.device)).to(b.dtype)


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.data.double()
    for lin in linears:
        W = lin.weight.data
        lin.weight.data = (W.double() * g.to(W.device)[None, :]).to(W.dtype)
    norm.weight.data = torch.ones_like(norm.weight.data)


def _per_head(R: torch.Tensor, n_heads: int) -> torch.Tensor:
    return torch.block_diag(*([R] * n_heads))


def fold_norms(model: nn.Module) -> None:
    """Fold every RMSNorm weight into the linears that read its output (embedding untied first)."""
    M.untie_embeddings(model)
    for layer in M.decoder_layers(model):
        att, mlp = M.attention(layer), M.mlp(layer)
        _fold_norm(M.input_norm(layer), [att.q_proj, att.k_proj, att.v_proj])
        _fold_norm(M.post_attention_norm(layer), [mlp.gate_proj, mlp.up_proj])
    _fold_norm(M.final_norm(model), [M.lm_head(model)])


def _check_norms(model: nn.Module) -> None:
    for layer in M.decoder_layers(model):
        for norm in (M.input_norm(layer), M.post_attention_norm(layer)):
            if getattr(norm, "bias", None) is not None or not hasattr(norm, "weight"):
                raise M.UnsupportedModelError(f"{type(norm).__name__} is not an RMSNorm with a weight only")


def _install_online_rotations(model: nn.Module, config: RotationConfig) -> None:
    """The structural part of :func:`rotate_model`: R4 (an :class:`OnlineHadamard` on every down_proj input, the
    layer wrapped as :class:`InputRotatedLinear`) and R3 (``rcp_qk_rotation`` on every attention module, with the
    ``rcp_*`` attention function). Sizes are validated by the caller."""
    d = M.dims(model)
    for layer in M.decoder_layers(model):
        att, mlp = M.attention(layer), M.mlp(layer)
        if config.r4:
            mlp.down_proj = InputRotatedLinear.wrap(mlp.down_proj, OnlineHadamard(d.intermediate, config.r4_block))
        if config.r3:
            att.rcp_qk_rotation = OnlineHadamard(d.head_dim)
    if config.r3:
        use_rcp_attention(model)


def rotate_model(model: nn.Module, config: RotationConfig | None = None, fuse_weights: bool = True) -> nn.Module:
    """Fuse R1-R4 (see module docstring) into ``model`` in place and return it.

    ``fuse_weights=False`` does only the structural part (untie the embeddings, install the online R3/R4 modules and
    the ``rcp_*`` attention function, set ``config.rcp_rotation``) on a skeleton whose rotated weights are loaded
    afterwards (:func:`rcp_lib.deploy.load_quantized`); no weight is read or changed.

    Works for any hidden/intermediate/head size that :func:`~rcp_lib.rotation.hadamard.hadamard` can build
    (and any GSR block that divides the hidden size), any head count and GQA, tied or untied embeddings.
    Validates everything first: on error the model is unchanged.

    Raises:
        UnsupportedModelError: not a registered family (the message names them), or already rotated.
        ValueError: unknown kind, or a size/block that cannot be built.
    """
    config = config or RotationConfig()
    config.validate()
    M.check_supported(model)
    _check_norms(model)
    if getattr(model.config, "rcp_rotation", None):
        raise M.UnsupportedModelError("this model is already rotated (config.rcp_rotation is set)")
    d = M.dims(model)
    # -- validate: build every matrix before touching the model --
    R1 = r1_matrix(config.r1, d.hidden, config.r1_block, config.r1_random_signs, config.seed) if fuse_weights else None
    R2 = r2_matrix(config.r2_kind, d.head_dim, config.seed) if config.r2 and fuse_weights else None
    if config.r3:
        hadamard(d.head_dim)
    H4_module = None
    if config.r4:
        if config.r4_block is None:
            try:
                hadamard(d.intermediate)
            except ValueError as e:
                raise ValueError(f"R4 needs a Hadamard matrix of the intermediate size {d.intermediate}: {e} "
                                 f"Set RotationConfig(r4_block=...) to a power of two dividing it for a "
                                 f"block-diagonal R4, or r4=False.") from None
        elif d.intermediate % config.r4_block:
            raise ValueError(f"r4_block={config.r4_block} does not divide the intermediate size {d.intermediate}")
        H4_module = OnlineHadamard(d.intermediate, config.r4_block)
    H4 = H4_module.matrix() if H4_module is not None and fuse_weights else None

    # -- mutate --
    if not fuse_weights:
        M.untie_embeddings(model)
    with torch.no_grad():
        if fuse_weights:
            fold_norms(model)
        if R1 is not None:
            emb = M.embedding(model)
            emb.weight.data = (emb.weight.data.double() @ R1.to(emb.weight.device)).to(emb.weight.dtype)
            _rotate_input(M.lm_head(model), R1)
        for layer in M.decoder_layers(model):
            att, mlp = M.attention(layer), M.mlp(layer)
            if R1 is not None:
                for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                    _rotate_input(lin, R1)
                _rotate_output(att.o_proj, R1)
                _rotate_output(mlp.down_proj, R1)
            if R2 is not None:
                _rotate_output(att.v_proj, _per_head(R2, d.n_kv_heads))
                _rotate_input(att.o_proj, _per_head(R2, d.n_heads))
            if H4 is not None:
                _rotate_input(mlp.down_proj, H4)
    _install_online_rotations(model, config)
    model.config.rcp_rotation = config.to_dict()
    return model
