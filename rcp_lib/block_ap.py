"""Block-wise reconstruction pre-stage before end-to-end QAT (EfficientQAT's "Block-AP"; our reading).

For each decoder block in order, on cached calibration windows of the *train* split:

* the target is the block's full-precision output on full-precision inputs: the same block with its weight, activation
  and KV quantizers switched off (the latent weights before this block is trained are the rotated FP weights, so no
  second, rotated FP copy of the model is needed); the FP stream then advances to the next block;
* the input is the output of the already reconstructed *quantized* blocks before it (the quantized stream), so each
  block learns to correct the error it receives;
* the block's latent weights (and biases) and its quantizer parameters (LWC / static range, LDP levels) are trained
  with AdamW (two groups, :attr:`~rcp_lib.qat.QATConfig.block_ap_lr_weights` / ``block_ap_lr_quant``, gradient
  clipping ``grad_clip``) for ``block_ap_steps`` steps of one calibration window each, minimising the MSE to the
  target; everything else is frozen.

Then :func:`rcp_lib.qat.train` continues with end-to-end distillation. Activation and KV quantizers stay on in the
quantized stream (the block is trained as it will run).
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import models as M


@contextlib.contextmanager
def quantizers_off(layer: nn.Module) -> Iterator[None]:
    """Within: the block's weight quantizers, input (activation) quantizers and KV quantizer are off (its FP form);
    restored on exit."""
    qlins = [q for q in M.layer_linears(layer).values() if hasattr(q, "weight_quantizer")]
    saved = [(q, q.weight_quantizer, q.act_bits) for q in qlins]
    att = M.attention(layer)
    kvq = getattr(att, "rcp_kv_quantizer", None)
    try:
        for q in qlins:
            q.weight_quantizer, q.act_bits = None, None
        if kvq is not None:
            att.rcp_kv_quantizer = None
        yield
    finally:
        for q, wq, ab in saved:
            q.weight_quantizer, q.act_bits = wq, ab
        if kvq is not None:
            att.rcp_kv_quantizer = kvq


def _run(layer: nn.Module, hidden: torch.Tensor, kw: dict) -> torch.Tensor:
    y = layer(hidden, **kw)
    return y[0] if isinstance(y, tuple) else y


def _block_params(layer: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    latent, quant = [], []
    for q in M.layer_linears(layer).values():
        if hasattr(q, "quant_parameters"):
            quant += list(q.quant_parameters())
        latent += [p for p in (q.weight, getattr(q, "bias", None)) if p is not None]
    return latent, quant


@torch.no_grad()
def block_mse(layer: nn.Module, inputs: list[tuple[torch.Tensor, dict]], targets: list[torch.Tensor]) -> float:
    """Mean squared error of the (quantized) block's outputs on ``inputs`` against ``targets`` (float)."""
    tot, n = 0.0, 0
    for (h, kw), t in zip(inputs, targets):
        tot += float(F.mse_loss(_run(layer, h, kw).float(), t.float(), reduction="sum"))
        n += t.numel()
    return tot / max(n, 1)


def block_ap(model: nn.Module, calib: torch.Tensor, steps: int, lr_weights: float, lr_quant: float,
             grad_clip: float = 0.0, seed: int = 0, progress: bool = True) -> list[dict]:
    """Block-wise reconstruction of a quantized model, in place (see module docstring).

    Args:
        model: output of :func:`~rcp_lib.quant.apply.quantize_model` (rotated or not), with learnable quantizers.
        calib: ``LongTensor [n, seqlen]`` windows of the train split (one window per step, cycled in a seeded order).
        steps: optimizer steps per block (>= 1).
        lr_weights, lr_quant: AdamW learning rates of the latent weights and of the quantizer parameters.
        grad_clip: max gradient norm per step (0: off).
    Returns:
        one dict per block: ``{"layer", "mse_before", "mse_after", "seconds"}`` (MSE on the calibration windows).
    """
    from .quant.calibrate import _block_inputs

    if calib.dim() != 2:
        raise ValueError(f"calib must be [n, seqlen] token ids, got shape {tuple(calib.shape)}")
    if steps < 1:
        raise ValueError(f"block_ap steps must be >= 1, got {steps}")
    was_training = model.training
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # no dropout; gradients still flow
    q_in = _block_inputs(model, calib, batch_size=1)
    fp_in = [h.clone() for h, _ in q_in]
    g = torch.Generator().manual_seed(seed)
    stats = []
    layers = M.decoder_layers(model)
    for li, layer in enumerate(tqdm(layers, desc="Block-AP", unit="block", disable=not progress, leave=False)):
        t0 = time.perf_counter()
        with torch.no_grad(), quantizers_off(layer):
            targets = [_run(layer, h, kw) for h, (_, kw) in zip(fp_in, q_in)]
        before = block_mse(layer, q_in, targets)
        latent, quant = _block_params(layer)
        for p in latent + quant:
            p.requires_grad_(True)
        groups = [gr for gr in ({"params": latent, "lr": lr_weights}, {"params": quant, "lr": lr_quant}) if gr["params"]]
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        order = torch.randperm(len(q_in), generator=g).tolist()
        for s in range(steps):
            i = order[s % len(order)]
            h, kw = q_in[i]
            loss = F.mse_loss(_run(layer, h, kw).float(), targets[i].float())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Block-AP: non-finite loss in block {li} at step {s}; lower the learning rates")
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(latent + quant, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        for p in latent + quant:
            p.requires_grad_(False)
        after = block_mse(layer, q_in, targets)
        with torch.no_grad():
            q_in = [(_run(layer, h, kw), kw) for h, kw in q_in]
        fp_in = targets
        stats.append({"layer": li, "mse_before": before, "mse_after": after, "seconds": time.perf_counter() - t0})
    for p in model.parameters():
        p.requires_grad_(flags[id(p)])
    model.train(was_training)
    return stats
