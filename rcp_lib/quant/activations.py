"""Dynamic activation and KV-cache quantization (per token, asymmetric by default): the one formula shared by fake
quantization (training and evaluation, with STE gradients), the W2A4 kernel's torch reference and Triton path, and the
deployed :class:`rcp_lib.kernels.packed_linear.PackedLinear`.

Per-token quantization computes the range of every token (vector along the last dimension) at run time:

* asymmetric (default): ``lo = clip_ratio * min(x)``, ``hi = clip_ratio * max(x)``, ``s = (hi - lo) / (2**b - 1)``
  (at least ``1e-10``), codes ``c = clamp(round((x - lo) / s), 0, 2**b - 1)``, fake-quant value ``lo + s * c``.
  The zero point is not rounded by default (``round_zero=False``): the grid then contains the token's min and max
  exactly, which makes the quantizer idempotent for ``clip_ratio=1`` (``Q(Q(x)) == Q(x)`` up to float rounding) -
  needed so that quantizing cached keys at use equals caching quantized keys. ``round_zero=True`` is QuaRot's
  integer-zero-point formula (range widened to include 0, ``z = round(-lo / s)``, ``c = clamp(round(x / s) + z,
  0, 2**b - 1)``, value ``(c - z) * s``).
* symmetric (``asym=False``): ``s = clip_ratio * max|x| / (2**(b-1) - 1)``, integer codes
  ``clamp(round(x / s), -2**(b-1), 2**(b-1) - 1)``, value ``c * s``.

Integer form (deployment): :func:`quantize_per_token` returns the same codes (as ``uint8``, computed by the same
operations as the fake quantizer) with a per-token ``scale`` and ``zero`` such that ``x_hat = (codes - zero) * scale``
(:func:`dequantize_per_token`), which is what the W2A4 op (:mod:`rcp_lib.kernels`) consumes:

* asymmetric, ``round_zero=False`` (what every model here is trained and evaluated with): ``zero = -lo / s``, a
  **float** zero point (not rounded). ``(c - zero) * s`` equals the fake-quant value ``lo + s * c`` up to float
  rounding (a few ulp), not bit for bit;
* asymmetric, ``round_zero=True``: the integer ``zero = z``; bit-identical to the fake-quant value;
* symmetric: codes shifted by ``2**(b-1)`` into ``0..2**b - 1``, ``zero = 2**(b-1)``; bit-identical.

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


def _per_token_grid(
    xd: torch.Tensor, b: int, clip_ratio: float, asym: bool, round_zero: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The per-token grid of the module docstring and the codes of ``xd``: the single implementation of the formula.

    Args:
        xd: ``[..., d]`` detached activations in the compute dtype (float32 or float64); not modified.
        b: bits (1..8; symmetric needs >= 2). clip_ratio: in ``(0, 1]``. asym, round_zero: the variant.
    Returns:
        ``(q, s, lo, hi, z)``: ``q`` the codes as a new float tensor ``[..., d]`` of integer values (asymmetric:
        ``0..2**b - 1``; symmetric: ``-2**(b-1)..2**(b-1) - 1``), and ``[..., 1]`` tensors: step ``s``, clip range
        ``lo``/``hi``, and the integer zero point ``z`` (``round_zero=True`` only, else None).
    """
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio}")
    # the element-wise chains run in place on one buffer: a handful of full-size temporaries instead of one per
    # operation (same operations and order, hence the same values, as the formulas in the module doc)
    z = None
    if asym:
        L = 2**b
        lo, hi = xd.amin(-1, keepdim=True), xd.amax(-1, keepdim=True)
        if round_zero:
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        lo, hi = lo * clip_ratio, hi * clip_ratio
        # divided by a tensor on the device: CUDA torch computes ``t / 15`` (a Python number) as ``t * (1/15)``, one
        # ULP off the division on most tokens, and the kernels divide (tests/quant/test_activations.py)
        s = ((hi - lo) / hi.new_full((), L - 1)).clamp_min(_EPS)
        if round_zero:
            z = torch.round(-lo / s)
            q = torch.div(xd, s).round_().add_(z).clamp_(0, L - 1)
        else:
            q = torch.sub(xd, lo).div_(s).round_().clamp_(0, L - 1)
    else:
        if b < 2:
            raise ValueError("symmetric activation quantization needs bits >= 2")
        qmax = 2 ** (b - 1) - 1
        hi = xd.abs().amax(-1, keepdim=True) * clip_ratio
        lo = -hi
        s = (hi / hi.new_full((), qmax)).clamp_min(_EPS)
        q = torch.div(xd, s).round_().clamp_(-qmax - 1, qmax)
    return q, s, lo, hi, z


def fake_quant_per_token(
    x: torch.Tensor, bits: int | None, clip_ratio: float = 1.0, asym: bool = True, round_zero: bool = False
) -> torch.Tensor:
    """Dynamic per-token fake quantization over the last dimension (formula: module docstring).

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
    xd = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    q, s, lo, hi, z = _per_token_grid(xd, b, clip_ratio, asym, round_zero)
    if not asym:
        xq = q.mul_(s)
    elif z is not None:
        xq = q.sub_(z).mul_(s)
    else:
        xq = q.mul_(s).add_(lo)
    if not (torch.is_grad_enabled() and x.requires_grad):  # no gradient to route (evaluation, generation): the
        return xq.to(x.dtype)  # straight-through function's forward value, without its mask and autograd node
    inside = (xd >= lo).logical_and_(xd <= hi)
    return _StraightThrough.apply(x, xq.to(x.dtype), inside)


def quantize_per_token(
    x: torch.Tensor, bits: int, clip_ratio: float = 1.0, asym: bool = True, round_zero: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer form of :func:`fake_quant_per_token`: the same codes, with the scale and zero point that the W2A4 op
    consumes (``x_hat = (codes - zero) * scale``; see the module docstring for when this is bit-identical).

    Args:
        x: ``[..., d]`` float activations (any float dtype; computed in at least float32). No gradient.
        bits: 1..8 (16/None, "off", is refused: there is nothing to quantize).
        clip_ratio, asym, round_zero: as in :func:`fake_quant_per_token`.
    Returns:
        ``(codes, scale, zero)``: ``codes`` uint8 ``[..., d]`` in ``0..2**bits - 1``; ``scale`` and ``zero``
        ``[...]`` in the compute dtype (float32 for float32/half inputs, float64 for float64). ``zero`` is
        ``-lo / scale`` (a float) by default, an integer-valued float with ``round_zero=True`` or ``asym=False``.
    """
    b = check_act_bits(bits)
    if b is None:
        raise ValueError(f"quantize_per_token needs activation bits in 1..8, got {bits!r}")
    xd = x.detach().to(torch.promote_types(x.dtype, torch.float32))
    q, s, lo, _, z = _per_token_grid(xd, b, clip_ratio, asym, round_zero)
    if not asym:
        half = float(2 ** (b - 1))
        q.add_(half)  # exact: small integers
        zero = torch.full_like(s, half)
    else:
        zero = z if z is not None else -lo / s
    return q.to(torch.uint8), s.squeeze(-1), zero.squeeze(-1)


def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``x_hat = (codes - zero) * scale``, the activation arithmetic of the W2A4 op (torch reference and kernel).

    Args:
        codes: ``[..., d]`` (uint8 codes, or any float tensor).
        scale, zero: ``[...]`` per token (broadcast over the last dimension of ``codes``).
    Returns:
        ``[..., d]`` in the dtype of ``scale`` promoted with float32.
    """
    dt = torch.promote_types(scale.dtype, torch.float32)
    return (codes.to(dt) - zero.to(dt).unsqueeze(-1)) * scale.to(dt).unsqueeze(-1)


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
