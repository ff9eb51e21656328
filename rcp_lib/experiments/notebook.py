"""The first code cell of every notebook, as one function."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..paths import figures_dir
from ..profiles import Profile, get_profile


def setup(profile: str, overrides: dict | None = None, show: bool = True) -> tuple[Profile, Path]:
    """Prepare a notebook run: offline Hugging Face look-ups (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` default to
    1; set them to 0 beforehand for the network), matplotlib's non-interactive ``Agg`` backend, the profile with the
    papermill ``overrides`` (any :class:`~rcp_lib.profiles.Profile` field), the global torch seed set to the
    profile's seed, and the profile's figure folder (created; see :mod:`rcp_lib.paths`).

    Call it before importing ``matplotlib.pyplot``. Prints the profile when ``show``.

    Returns:
        ``(profile, figures directory)``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import matplotlib

    matplotlib.use("Agg")
    p = get_profile(profile, **(overrides or {}))
    torch.manual_seed(p.seed)
    fig = figures_dir(p)
    if show:
        print(p)
    return p, fig
