"""The first code cell of every notebook, as one function: :func:`setup`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from ..paths import figures_dir, results_dir
from ..profiles import Profile, get_profile


def parse_overrides(overrides: dict | str | None) -> dict:
    """The papermill ``overrides`` parameter as a dict: a dict as it is, a JSON object string
    (``-p overrides '{"qat_steps": 80}'``) parsed, None or ``""`` -> ``{}``. Anything else raises ValueError."""
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        if not overrides.strip():
            return {}
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise ValueError(f"overrides must be a JSON object such as '{{\"qat_steps\": 80}}', got {overrides!r}: "
                             f"{e}") from None
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict of profile fields, got {type(overrides).__name__}")
    from ..profiles import NULL

    return {k: NULL if v is None else v for k, v in overrides.items()}  # JSON null: the field set to None


def row_plan(profile: Profile, notebook: str) -> list[dict] | None:
    """The cached rows a notebook reads or computes, each ``{"table", "row", "cached"}`` (``cached``: the row cache
    holds it, see :func:`rcp_lib.experiments.rows.row_cached`); None for a notebook without a row cache (it computes
    everything on each run). Nothing is computed or logged."""
    from .methods import all_methods
    from .rotation import rotation_key
    from .rows import row_key, row_cached
    from .tables import full_split_methods, zero_shot_key, zero_shot_methods

    stem = Path(notebook).stem
    if stem.startswith("01_"):
        return [{"table": "rotation", "row": name, "cached": row_cached("rotation", rotation_key(name, profile))}
                for name in profile.analysis_rotations]
    if stem.startswith("02_"):
        plan = [{"table": "perplexity", "row": f"{m.name} {m.setting}",
                 "cached": row_cached("ppl", row_key(m, profile))} for m in all_methods(profile)]
        full, methods = full_split_methods(profile)
        plan += [{"table": "whole split", "row": f"{m.name} {m.setting}", "cached": row_cached("ppl", row_key(m, full))}
                 for m in methods]
        return plan
    if stem.startswith("06_"):
        from dataclasses import replace

        from .ablation import ablation_methods

        from .gsr import decision_plan

        return [{"table": "ablation", "row": f"{m.name} seed {seed}",
                 "cached": row_cached("ppl", row_key(m, replace(profile, seed=int(seed))))}
                for seed in profile.ablation_seeds for m in ablation_methods(profile)] + [
                {"table": f"gsr {part}", "row": f"{label} seed {seed}", "cached": row_cached("gsr", key)}
                for part, seed, label, key in decision_plan(profile)] + [
                {"table": "zero-shot", "row": f"{m.name} {m.setting}",
                 "cached": row_cached("zeroshot", zero_shot_key(m, profile))} for m in zero_shot_methods(profile)]
    if stem.startswith("07_"):
        from .search import row_plan as search_plan

        return search_plan(profile)
    if stem.startswith("03_"):
        return [{"table": "zero-shot", "row": f"{m.name} {m.setting}",
                 "cached": row_cached("zeroshot", zero_shot_key(m, profile))} for m in zero_shot_methods(profile)]
    return None


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def expected_time(profile: Profile, notebook: str) -> str:
    """One line: the measured wall time of ``notebook`` in a cold run (no cached rows) and a cached run (every row
    from the cache), from ``results/<profile>/reproduce_timing.json`` of the named profile (written by
    ``python -m rcp_lib reproduce``); ``"not measured"`` where that file or the measurement is missing."""
    from .registry import result_path

    path = result_path("reproduce_timing", profile.name)
    if not path.exists():
        return f"not measured (no {path.name} for the {profile.name!r} profile yet; `reproduce` writes it)"
    t = json.loads(path.read_text())
    measured = t.get("measured", {})
    labels = {"cold": "cold (every row computed)", "cached": "cached (every row from the cache)",
              "mixed": "partly cached", "none": "no row cache"}
    parts = [f"{label} {_minutes(m['seconds'])} (git {str(m.get('git_commit', '?'))[:8]})"
             for kind, label in labels.items() if (m := measured.get(kind, {}).get(notebook))]
    if not parts:
        if measured:
            return f"not measured yet for {notebook} (`reproduce --notebooks {notebook}` records it)"
        return f"not measured for {notebook} (the {profile.name!r} timing file predates per-notebook measurements)"
    missing = [k for k in ("cold", "cached") if notebook not in measured.get(k, {})]
    if missing and notebook not in measured.get("none", {}):
        parts.append(f"{' and '.join(missing)} not measured")
    note = " of the unmodified profile" if profile.overrides else ""
    return ", ".join(parts) + f"; measured by `reproduce`{note}"


def _in_kernel() -> bool:
    ip = sys.modules.get("IPython")
    shell = ip.get_ipython() if ip is not None and hasattr(ip, "get_ipython") else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def setup(profile: str, overrides: dict | str | None = None, show: bool = True,
          notebook: str | None = None) -> tuple[Profile, Path]:
    """Prepare a notebook run and say what it will do.

    * offline Hugging Face look-ups (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` default to 1; set them to 0
      beforehand for the network). Importing rcp_lib imports transformers, which reads them once: ``reproduce`` and
      the Makefile set them before any kernel starts; in a hand-started kernel set them before ``import rcp_lib``;
    * figures inline in a Jupyter kernel (``%matplotlib inline``; no backend is forced elsewhere);
    * the profile with the papermill ``overrides`` (any :class:`~rcp_lib.profiles.Profile` field; a dict or a JSON
      object string); with overrides, results and figures go to ``<profile>-<hash>/`` folders
      (:attr:`Profile.run_name`), never to the unmodified profile's;
    * the global torch seed set to the profile's seed, and the figure folder (created; see :mod:`rcp_lib.paths`);
    * in a batch run (``$RCP_PROGRESS_LOG`` set by ``reproduce``) the kernel's stderr (progress bars, cache log
      lines, warnings) goes to that log, not into the executed notebook, and transformers' progress bars are off.

    When ``show``, prints the profile, its output folders, the expected run time of ``notebook`` (measured, cold
    and cached: :func:`expected_time`) and for each row whether it comes from the cache or will be computed
    (:func:`row_plan`).

    Returns:
        ``(profile, figures directory)``.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from ..progress import log_stream

    log = log_stream()
    if log is not None:
        sys.stderr = log
        # transformers' own bars (e.g. "Loading weights") render as notebook widgets, not on stderr: off in a batch run
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if _in_kernel():
        sys.modules["IPython"].get_ipython().run_line_magic("matplotlib", "inline")
    p = get_profile(profile, **parse_overrides(overrides))
    torch.manual_seed(p.seed)
    fig = figures_dir(p)
    if show:
        print(f"profile {p.name!r}" + (f" with overrides {json.dumps(p.overrides)}" if p.overrides else "")
              + f": model {p.model}, corpus {p.corpus}, device {p.device}")
        print(f"writes results to {results_dir(p)}/ and figures to {fig}/")
        if notebook:
            print(f"expected run time of {notebook}: {expected_time(p, notebook)}")
            plan = row_plan(p, notebook)
            if plan is None:
                print("rows: this notebook has no row cache; it computes everything on each run")
            else:
                n_cached = sum(r["cached"] for r in plan)
                print(f"rows: {n_cached} of {len(plan)} from the cache, {len(plan) - n_cached} to compute")
                for r in plan:
                    print(f"  {'cache hit   ' if r['cached'] else 'will compute'}  {r['table']:12s} {r['row']}")
    return p, fig
