"""Model-level calibration: sequential, layer-by-layer GPTQ over a quantized (and possibly rotated) model.

The calibration windows are pushed through the model once up to the first decoder block; then for each block:

1. the block runs on the cached inputs with *full-precision* weights while a hook on every ``QuantLinear``
   accumulates the Hessian of what the layer sees (after its input transform, e.g. R4);
2. each of the seven projections is quantized with :func:`~rcp_lib.quant.gptq.gptq_quantize` on the grid of its
   weight quantizer (uniform RTN grid, with QuaRot's per-group clip search when the config asks for it; or the
   fixed LDP / Lloyd-Max level table), and the layer is frozen to the GPTQ codes and level table
   (:meth:`~rcp_lib.quant.linear.QuantLinear.freeze`: the frozen state every quantized layer ends in);
3. the block runs again, now with quantized weights, and its outputs are the next block's inputs (as in GPTQ).

All seven Hessians of a block come from the same full-precision pass (GPTQ without ``true-sequential``).
By default activations and the KV cache stay in 16/32 bits during calibration, as in QuaRot, which runs GPTQ
before its activation quantizers are installed (``quantized_activations=True`` feeds 4-bit inputs instead).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from ..progress import bar as tqdm

from .. import models as M
from .activations import fake_quant_per_token
from .gptq import HessianAccumulator, gptq_quantize
from .linear import QuantLinear


class _Stop(Exception):
    pass


@contextlib.contextmanager
def activations_in_full_precision(model: nn.Module) -> Iterator[None]:
    """Within the block: every ``QuantLinear`` input and the KV cache unquantized; restored on exit."""
    saved_a = [(q, q.act_bits) for _, q in M.named_block_linears(model) if isinstance(q, QuantLinear)]
    saved_kv = [(a, a.rcp_kv_quantizer) for a in (M.attention(l) for l in M.decoder_layers(model))
                if getattr(a, "rcp_kv_quantizer", None) is not None]
    try:
        for q, _ in saved_a:
            q.act_bits = None
        for a, _ in saved_kv:
            a.rcp_kv_quantizer = None
        yield
    finally:
        for q, b in saved_a:
            q.act_bits = b
        for a, kvq in saved_kv:
            a.rcp_kv_quantizer = kvq


def _transformed_input(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    if q.input_transform is not None:
        x = q.input_transform(x)
    if q.act_bits is not None:
        x = fake_quant_per_token(x, q.act_bits, q.act_clip_ratio)
    return x


@torch.no_grad()
def _block_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    layers = M.decoder_layers(model)
    cached: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["past_key_values"] = None
        kw["use_cache"] = False
        cached.append((hidden.detach(), kw))
        raise _Stop

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    dev = next(model.parameters()).device
    try:
        for i in range(0, calib.shape[0], batch_size):
            try:
                model(input_ids=calib[i : i + batch_size].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return cached


def _run_block(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    outs = []
    for hidden, kw in inputs:
        y = layer(hidden, **kw)
        outs.append((y[0] if isinstance(y, tuple) else y, kw))
    return outs


@torch.no_grad()
def gptq_model(
    model: nn.Module,
    calib: torch.Tensor,
    percdamp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    batch_size: int = 8,
    progress: bool = True,
    quantized_activations: bool = False,
) -> nn.Module:
    """Quantize every ``QuantLinear`` weight of a quantized model with GPTQ, in place (see module docstring).

    Args:
        model: output of :func:`~rcp_lib.quant.apply.quantize_model` (weights not yet GPTQ'd).
        calib: ``LongTensor [n, seqlen]`` calibration windows of the train split.
        quantized_activations: collect Hessians and propagate block outputs with the activation and KV quantizers
            on (False, the default: 16/32-bit activations, QuaRot's protocol).
    Returns:
        the model, whose quantized projections now hold frozen GPTQ codes and level tables.
    """
    if calib.dim() != 2:
        raise ValueError(f"calib must be [n, seqlen] token ids, got shape {tuple(calib.shape)}")
    layers = M.decoder_layers(model)
    for _, q in M.named_block_linears(model):
        if not isinstance(q, QuantLinear):
            raise ValueError("gptq_model needs a model prepared with quantize_model")
    was_training = model.training
    model.eval()
    ctx = contextlib.nullcontext() if quantized_activations else activations_in_full_precision(model)
    with ctx:
        _gptq_layers(model, layers, calib, percdamp, act_order, block_size, batch_size, progress)
    model.train(was_training)
    return model


def _shared_accumulators(layer: nn.Module, qlins: dict[str, QuantLinear]) -> dict[str, HessianAccumulator]:
    """One Hessian accumulator per distinct input: projections that read the same tensor (q/k/v, gate/up; see
    :func:`rcp_lib.models.shared_input_groups`) and transform it the same way share one, so its ``X^T X`` is computed
    once (the Hessians are identical)."""
    accs: dict[str, HessianAccumulator] = {}
    for group in M.shared_input_groups(layer):
        members = [n for n in group if n in qlins]
        if not members:
            continue
        q0 = qlins[members[0]]
        same = all(qlins[n].input_transform is None and q0.input_transform is None and qlins[n].act_bits == q0.act_bits
                   and qlins[n].act_clip_ratio == q0.act_clip_ratio and qlins[n].in_features == q0.in_features
                   for n in members)
        if same:
            acc = HessianAccumulator(q0.in_features, device=q0.weight.device)
            accs.update({n: acc for n in members})
    for n, q in qlins.items():
        accs.setdefault(n, HessianAccumulator(q.in_features, device=q.weight.device))
    return accs


def _gptq_layers(model, layers, calib, percdamp, act_order, block_size, batch_size, progress) -> None:
    inputs = _block_inputs(model, calib, batch_size)
    for li, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer", disable=not progress, leave=False)):
        qlins = {n: q for n, q in M.layer_linears(layer).items() if q.weight_quantizer is not None}
        saved = {n: q.weight_quantizer for n, q in qlins.items()}
        accs = _shared_accumulators(layer, qlins)
        hooks = []
        for n, q in qlins.items():
            q.weight_quantizer = None  # full-precision weights for the Hessian pass
            if any(m != n and accs[m] is accs[n] for m in list(qlins)[: list(qlins).index(n)]):
                continue  # reads the same input as an earlier projection: its Hessian is already accumulated

            def hook(mod, args, n=n):
                accs[n].add_batch(_transformed_input(mod, args[0]))

            hooks.append(q.register_forward_pre_hook(hook))
        try:
            _run_block(layer, inputs)
        finally:
            for hk in hooks:
                hk.remove()
            for n, q in qlins.items():
                q.weight_quantizer = saved[n]
        for n, q in qlins.items():
            wq = q.weight_quantizer
            cfg = wq.config
            if cfg.method == "rtn" and not getattr(cfg, "learn_clip", False) and cfg.range_mode != "static":
                # the uniform grid, each group's range searched again on the updated weights when the group starts
                res = gptq_quantize(q.weight.data, accs[n].H, bits=cfg.bits, group_size=cfg.group_size,
                                    block_size=block_size, percdamp=percdamp, act_order=act_order,
                                    clip_ratio=cfg.clip_ratio, round_zero=cfg.round_zero,
                                    clip_search=getattr(cfg, "clip_search", "none"))
            else:  # a fixed grid: non-uniform (LDP / Lloyd), clipped, or a static range (AutoGPTQ's static_groups)
                res = gptq_quantize(q.weight.data, accs[n].H, levels=wq.levels(q.weight.data).detach(),
                                    group_size=cfg.group_size, block_size=block_size, percdamp=percdamp,
                                    act_order=act_order)
            q.freeze(res.codes, res.levels)  # weight <- levels.gather(codes) == res.weight
        inputs = _run_block(layer, inputs)


@torch.no_grad()
def thaw_to_static(model: nn.Module) -> nn.Module:
    """Make the frozen quantized layers of a GPTQ'd model trainable again, on their GPTQ grid ("GPTQ, then QAT").

    Every frozen :class:`QuantLinear` (after :func:`gptq_model`: latent weight = the GPTQ-quantized weight) gets a
    learnable :class:`~rcp_lib.quant.quantizers.WeightQuantizer` of its stored config, set to the frozen level table by
    :meth:`~rcp_lib.quant.quantizers.WeightQuantizer.init_from_levels`; since every weight lies on one of its levels,
    the model's output is unchanged. The config must have ``range_mode="static"`` (an LWC range is recomputed from the
    latent weight and would shift the grid). Returns the model.
    """
    from .quantizers import FrozenLevelsQuantizer, WeightQuantizer

    for name, q in M.named_block_linears(model):
        fq = getattr(q, "weight_quantizer", None)
        if not isinstance(fq, FrozenLevelsQuantizer):
            continue
        cfg = fq.config
        if cfg is None or cfg.range_mode != "static":
            raise ValueError(f"{name}: thawing a GPTQ'd layer for QAT needs a weight config with range_mode='static' "
                             f"(got {None if cfg is None else cfg.range_mode!r})")
        wq = WeightQuantizer(tuple(q.weight.shape), cfg, name=name).to(q.weight.device)
        wq.init_from_levels(fq.level_table)
        q.weight_quantizer = wq
    return model
