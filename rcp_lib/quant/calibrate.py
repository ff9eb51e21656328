"""Model-level calibration: sequential, layer-by-layer GPTQ over a quantized (and possibly rotated) model.

The calibration windows are pushed through the model once up to the first decoder block; then for each block:

1. the block runs on the cached inputs with *full-precision* weights while a hook on every ``QuantLinear``
   accumulates the Hessian of what the layer really sees (after its input transform, e.g. R4, and after the
   activation quantizer, so W4A4 GPTQ sees 4-bit inputs);
2. each of the seven projections is quantized with :func:`~rcp_lib.quant.gptq.gptq_quantize` on the grid of its
   weight quantizer (uniform RTN grid; or the fixed LDP / Lloyd-Max level table), and its quantizer is replaced
   by a :class:`FrozenLevelsQuantizer` holding the GPTQ codes and level table;
3. the block runs again, now quantized, and its outputs are the next block's inputs (as in GPTQ).

All seven Hessians of a block come from the same full-precision pass (GPTQ without ``true-sequential``).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import models as M
from .activations import fake_quant_per_token
from .gptq import HessianAccumulator, gptq_quantize
from .linear import QuantLinear


class FrozenLevelsQuantizer(nn.Module):
    """A weight quantizer whose output is fixed: ``levels.gather(codes)`` (e.g. after GPTQ). No parameters."""

    def __init__(self, codes: torch.Tensor, levels: torch.Tensor, config=None):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.uint8))
        self.register_buffer("level_table", levels.float())
        self.config = config
        self.group_size = codes.shape[1] // levels.shape[1]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        out, n = self.codes.shape
        idx = self.codes.long().view(out, self.level_table.shape[1], self.group_size)
        w = torch.gather(self.level_table, 2, idx).view(out, n)
        return w.to(weight.dtype)

    def levels(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.level_table

    def export(self, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes.clone(), self.level_table.clone()

    def quant_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())


class _Stop(Exception):
    pass


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
) -> nn.Module:
    """Quantize every ``QuantLinear`` weight of a quantized model with GPTQ, in place (see module docstring).

    Args:
        model: output of :func:`~rcp_lib.quant.apply.quantize_model` (weights not yet GPTQ'd).
        calib: ``LongTensor [n, seqlen]`` calibration windows of the train split.
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
    inputs = _block_inputs(model, calib, batch_size)
    for li, layer in enumerate(tqdm(layers, desc="GPTQ", unit="layer", disable=not progress, leave=False)):
        qlins = {n: q for n, q in M.layer_linears(layer).items() if q.weight_quantizer is not None}
        saved = {n: q.weight_quantizer for n, q in qlins.items()}
        accs = {n: HessianAccumulator(q.in_features, device=q.weight.device) for n, q in qlins.items()}
        hooks = []
        for n, q in qlins.items():
            q.weight_quantizer = None  # full-precision weights for the Hessian pass

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
            if cfg.method == "rtn" and not getattr(cfg, "learn_clip", False):
                res = gptq_quantize(q.weight.data, accs[n].H, bits=cfg.bits, group_size=cfg.group_size,
                                    block_size=block_size, percdamp=percdamp, act_order=act_order,
                                    clip_ratio=cfg.clip_ratio)
            else:  # fixed non-uniform (LDP / Lloyd) or clipped grid: its current level table
                res = gptq_quantize(q.weight.data, accs[n].H, levels=wq.levels(q.weight.data).detach(),
                                    group_size=cfg.group_size, block_size=block_size, percdamp=percdamp,
                                    act_order=act_order)
            q.weight.data = res.weight.to(q.weight.dtype)
            q.weight_quantizer = FrozenLevelsQuantizer(res.codes, res.levels, cfg).to(q.weight.device)
        inputs = _run_block(layer, inputs)
    model.train(was_training)
    return model
