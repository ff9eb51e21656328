"""Dynamic activation and KV-cache fake quantization (per token, asymmetric by default), with STE gradients.

Per-token quantization computes the range of every token (vector along the last dimension) at run time:

* asymmetric (default): ``lo = clip_ratio * min(x)``, ``hi = clip_ratio * max(x)``, ``s = (hi - lo) / (2**b - 1)``,
  value ``lo + s * clamp(round((x - lo) / s), 0, 2**b - 1)``. The zero point is not rounded by default
  (``round_zero=False``): the grid then contains the token's min and max exactly, which makes the quantizer
  idempotent for ``clip_ratio=1`` (``Q(Q(x)) == Q(x)`` up to float rounding) - needed so that quantizing cached
  keys at use equals caching quantized keys. ``round_zero=True`` is QuaRot's integer-zero-point formula (range
  widened to include 0, ``z = round(-lo / s)``), the form an integer GEMM kernel consumes.
* symmetric (``asym=False``): ``s = clip_ratio * max|x| / (2**(b-1) - 1)``, integer codes in
  ``[-2**(b-1), 2**(b-1) - 1]``.

``bits`` of 16 or ``None`` means "off" (identity). Gradients: straight-through (identity) for elements inside the
clipping range, zero for clipped elements; the dynamic range itself is a statistic (no gradient through min/max).
KV caches use the same quantizer on groups of ``group_size`` channels of each head (per token and head).
QuaRot's activation clip ratio 0.9 is a default of the model-level config, not of these functions.
"""

from __future__ import annotations

import torch

_EPS = 1e-10


def check_act_bits(bits: int | None) -> int | None:
    """Validate an activation bit width: ``None``/16 (off, returned as None) or an integer in 1..8."""
    if bits is None or bits == 16:
        return None
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"activation bits must be an integer in 1..8, or 16/None for 'off', got {bits!r}")
    return bits


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value. Backward: gradient of ``x`` masked to the clipping range."""

    @staticmethod
    def forward(ctx, x, xq, inside):  # type: ignore[override]
        ctx.save_for_backward(inside)
        return xq

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return torch.where(inside, g, 0.0), None, None


def fake_quant_per_token(
    x: torch.Tensor, bits: int | None, clip_ratio: float = 1.0, asym: bool = True, round_zero: bool = False
) -> torch.Tensor:
    """Dynamic per-token fake quantization over the last dimension.

    Args:
        x: ``[..., d]`` float activations (any float dtype; computed in at least float32).
        bits: 1..8, or 16/None for identity (``asym=False`` needs ``bits >= 2``).
        clip_ratio: shrink factor of each token's range, in ``(0, 1]``.
        asym: asymmetric (min/max) or symmetric (max-abs) grid.
        round_zero: integer zero point and range including 0 (QuaRot's asymmetric formula).
    Returns:
        tensor of the shape and dtype of ``x``; gradient 1 inside the clip range, 0 outside.
    """
    b = check_act_bits(bits)
    if b is None:
        return x
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    cdt = torch.promote_types(x.dtype, torch.float32)
    xd = x.detach().to(cdt)
    # the element-wise chains below run in place on one buffer: a handful of full-size temporaries instead of
    # one per operation (same operations and order, hence the same values, as the formulas in the module doc)
    if asym:
        L = 2**b
        lo, hi = xd.amin(-1, keepdim=True), xd.amax(-1, keepdim=True)
        if round_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        lo, hi = lo * clip_ratio, hi * clip_ratio
        s = ((hi - lo) / (L - 1)).clamp_min(_EPS)
        if round_zero:
            z = torch.round(-lo / s)
            xq = torch.div(xd, s).round_().add_(z).clamp_(0, L - 1).sub_(z).mul_(s)
        else:
            xq = torch.sub(xd, lo).div_(s).round_().clamp_(0, L - 1).mul_(s).add_(lo)
    else:
        if b < 2:
            raise ValueError("symmetric activation quantization needs bits >= 2")
        qmax = 2 ** (b - 1) - 1
        hi = xd.abs().amax(-1, keepdim=True) * clip_ratio
        lo = -hi
        s = (hi / qmax).clamp_min(_EPS)
        xq = torch.div(xd, s).round_().clamp_(-qmax - 1, qmax).mul_(s)
    inside = (xd >= lo).logical_and_(xd <= hi)
    return _StraightThrough.apply(x, xq.to(x.dtype), inside)


def fake_quant_kv(
    x: torch.Tensor, bits: int | None, group_size: int | None = None, clip_ratio: float = 1.0, asym: bool = True,
    round_zero: bool = False,
) -> torch.Tensor:
    """Fake-quantize keys or values per token and head, in groups of ``group_size`` channels.

    Args:
        x: ``[..., heads, T, head_dim]`` (any leading shape; the last dimension is the channel dimension).
        bits: 1..8, or 16/None for identity.
        group_size: channels per quantization group (default: the whole ``head_dim``); must divide ``head_dim``.
        clip_ratio, asym, round_zero: as in :func:`fake_quant_per_token`.
    Returns:
        tensor of the shape and dtype of ``x``.
    """
    if check_act_bits(bits) is None:
        return x
    d = x.shape[-1]
    g = d if group_size is None or group_size == -1 else group_size
    if g <= 0 or d % g:
        raise ValueError(f"KV group_size={group_size} must divide head_dim={d}")
    xg = x.reshape(*x.shape[:-1], d // g, g)
    return fake_quant_per_token(xg, bits, clip_ratio, asym, round_zero).reshape(x.shape)
