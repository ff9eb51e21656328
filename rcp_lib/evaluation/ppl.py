"""Perplexity with the protocol of GPTQ / QuaRot / SpinQuant.

The token stream of a whole split (tokenized once) is cut into non-overlapping windows of ``seqlen``
tokens, the incomplete tail is dropped, each window is scored independently (no context carried over),
the loss is the cross-entropy of ``logits[:, :-1]`` against ``ids[:, 1:]`` and
``ppl = exp(mean NLL over all scored tokens)``. All windows have the same length, so this equals the
exponential of the mean of per-window mean NLLs, which is what those papers compute.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from ..progress import bar as tqdm


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    windows: int
    seqlen: int
    tokens_scored: int
    seconds: float
    window_indices: list[int] | None = None  # which windows of the split were scored (None: the first ``windows``)

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.seqlen / max(self.seconds, 1e-9)


def window_indices(n_windows: int, max_windows: int | None, spread: bool) -> list[int]:
    """Indices of the windows to score among ``n_windows``: all, the first ``max_windows``, or (``spread``)
    ``max_windows`` indices evenly spaced over the whole split, ``floor(i · n / k)`` for ``i < k``."""
    if max_windows is None or max_windows >= n_windows:
        return list(range(n_windows))
    if max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    if not spread:
        return list(range(max_windows))
    return [(i * n_windows) // max_windows for i in range(max_windows)]


def _windows(input_ids: torch.Tensor, seqlen: int, max_windows: int | None, spread: bool = False) -> tuple[torch.Tensor, list[int]]:
    if input_ids.dim() == 2:
        if input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, N] or [N], got shape {tuple(input_ids.shape)}")
        input_ids = input_ids[0]
    elif input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [1, N] or [N], got shape {tuple(input_ids.shape)}")
    if seqlen <= 1:
        raise ValueError(f"seqlen must be > 1, got {seqlen}")
    n = input_ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the text has {input_ids.numel()} tokens, fewer than seqlen={seqlen}: no complete window")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    idx = window_indices(n, max_windows, spread)
    return input_ids[: n * seqlen].view(n, seqlen)[idx], idx


@torch.no_grad()
def perplexity_details(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    spread: bool = False,
) -> PerplexityResult:
    """Like :func:`perplexity` but returns NLL, window count, tokens scored, wall time and the window indices."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wins, idx = _windows(input_ids, seqlen, max_windows, spread)
    device = next(model.parameters()).device
    total_nll, total_tok = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(total=wins.shape[0], desc=f"ppl@{seqlen}", unit="win", disable=not progress, leave=False)
    for i in range(0, wins.shape[0], batch_size):
        batch = wins[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(loss)
        total_tok += batch[:, 1:].numel()
        bar.update(batch.shape[0])
        bar.set_postfix(ppl=f"{math.exp(total_nll / total_tok):.3f}")
    bar.close()
    nll = total_nll / total_tok
    if not math.isfinite(nll):
        raise FloatingPointError(f"non-finite NLL ({nll}) - the model produced NaN/inf logits")
    return PerplexityResult(math.exp(nll), nll, wins.shape[0], seqlen, total_tok, time.perf_counter() - t0, idx)


def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
    spread: bool = False,
) -> float:
    """Perplexity of a causal LM on a token stream (GPTQ/QuaRot protocol, see module docstring).

    Args:
        model: a causal LM returning ``.logits`` of shape ``[B, T, V]``.
        input_ids: ``LongTensor [1, N]`` or ``[N]``: a whole tokenized split.
        seqlen: window length; windows do not overlap and the tail shorter than ``seqlen`` is dropped.
        max_windows: score only ``max_windows`` windows (None: all).
        batch_size: windows per forward pass.
        spread: with ``max_windows``, score windows evenly spaced over the whole split (every k-th window, see
            :func:`window_indices`) instead of the first ones, so that every part of the split counts.
    Returns:
        ``exp(mean NLL)`` over the ``windows * (seqlen - 1)`` scored tokens, as a Python float.
    Raises:
        ValueError: ``seqlen <= 1``, or fewer than ``seqlen`` tokens.
    """
    return perplexity_details(model, input_ids, seqlen, max_windows, batch_size, progress, spread).ppl
