"""Packed folders from trained runs and cached models, and their evaluation (``python -m rcp_lib export`` / ``eval``).

* :func:`export_run`: a run of ``python -m rcp_lib qat`` (its ``summary.json`` holds the run config, its
  ``checkpoint/`` the trained student) -> :func:`rcp_lib.deploy.save_quantized`.
* :func:`export_method`: a named method of a profile (:mod:`rcp_lib.experiments.methods`) built through
  :func:`rcp_lib.experiments.build.build`, i.e. from the PTQ cache or the cached QAT student (computed first when
  it is not cached) -> :func:`rcp_lib.deploy.save_quantized`.
* :func:`evaluate_folder`: perplexity (and optionally zero-shot accuracy) of a packed folder loaded with
  :func:`rcp_lib.deploy.load_quantized`.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .experiments.methods import Method


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype | None = None,
               max_shard_size: int | str = "2GB", overwrite: bool = False) -> Path:
    """Rebuild the student of a finished QAT run (load the run's model, rotate + quantize with its recipe, load
    ``checkpoint/pytorch_model.bin``) and write it as a packed folder with the model's tokenizer.

    ``dtype`` None: stored as evaluated (the student's compute dtype, see :func:`rcp_lib.deploy.save_quantized`).
    ``out`` is checked first (:func:`rcp_lib.deploy.check_output_folder`), before anything is loaded.

    Raises:
        FileNotFoundError: no ``summary.json`` (run not finished) or no checkpoint.
        FileExistsError: ``out`` holds other files, or a packed folder without ``overwrite``.
    """
    from .models import load
    from .deploy import check_output_folder, save_quantized
    from .quant.apply import check_packable, quantize_model
    from .rotation.fuse import rotate_model
    from .run_config import RunConfig

    check_output_folder(out, overwrite)
    run_dir = Path(run_dir)
    summary, ckpt = run_dir / "summary.json", run_dir / "checkpoint" / "pytorch_model.bin"
    if not summary.is_file():
        raise FileNotFoundError(f"{run_dir} has no summary.json: not a finished `python -m rcp_lib qat` run")
    if not ckpt.is_file():
        raise FileNotFoundError(f"{run_dir} has no checkpoint/pytorch_model.bin (the run's trained student)")
    cfg = RunConfig.from_dict(json.loads(summary.read_text())["config"])
    check_packable(cfg.recipe.quant)  # e.g. a 3-bit research run: refused before the model is loaded
    model, tok = load(cfg.model)
    if cfg.recipe.rotation is not None:
        rotate_model(model, cfg.recipe.rotation)
    quantize_model(model, cfg.recipe.quant)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), strict=True)
    source = {"run": str(run_dir.resolve()), **built_by()}
    return save_quantized(model, out, tokenizer=tok, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                          source=source)


def built_by() -> dict[str, Any]:
    """The code and machine a folder is written by (:func:`rcp_lib.io.provenance`'s commit, code fingerprint, CPU
    and versions)."""
    from .io import provenance

    prov = provenance()
    return {k: prov.get(k) for k in ("git_commit", "code_fingerprint", "device", "cpu_model", "cpu_flags",
                                     "torch_cpu_capability", "torch", "transformers", "rcp_lib", "date_utc")}


def committed_row_mismatch(method_name: str, setting: str, run_name: str, seed: int, built: dict,
                           on_cpu: bool = True) -> str | None:
    """Why a model built now may not reproduce the committed row of ``results/<run_name>/perplexity.csv`` (method,
    setting, seed): another code fingerprint, or (``on_cpu``: the profile builds on the CPU) another CPU type, which
    acts like a seed (docs/reproducing.md); None when the row matches both, or there is no such row. A column the row
    does not record is not compared."""
    import pandas as pd

    from .paths import results_dir

    f = results_dir(run_name) / "perplexity.csv"
    if not f.is_file():
        return None
    rows = pd.read_csv(f, dtype=str, keep_default_na=False)
    if "seed" in rows:
        rows = rows[rows["seed"] == str(seed)]
    rows = rows[(rows["method"] == method_name) & (rows["setting"] == setting)]
    if not len(rows):
        return None
    r = rows.iloc[0]
    why = []
    if r.get("code_fingerprint") and r["code_fingerprint"] != str(built["code_fingerprint"]):
        why.append(f"its code {r['code_fingerprint']} (git {r.get('git_commit', '?')[:8]}), this code "
                   f"{built['code_fingerprint']}")
    if on_cpu and r.get("cpu_flags") and r["cpu_flags"] != str(built.get("cpu_flags")):
        why.append(f"its CPU's vector flags '{r['cpu_flags']}', this CPU's '{built.get('cpu_flags')}'")
    if not why:
        return None
    return (f"the committed row {method_name} {setting} seed {seed} of {f} was computed with {'; '.join(why)}: this "
            f"folder is built anew and may not reproduce its perplexity ({r['ppl']}); to ship that row, "
            f"export at its commit on a CPU of its type (git worktree add ../frozen <commit>)")


def export_method(name: "str | Method", setting: str, profile: str, out: str | os.PathLike,
                  dtype: torch.dtype | None = None, overrides: dict[str, Any] | None = None,
                  max_shard_size: int | str = "2GB", overwrite: bool = False, progress: bool = True) -> Path:
    """Build ``method(name, setting)`` for a profile (from its cache entry; computed and cached first if missing) and
    write it as a packed folder with the profile model's tokenizer. ``name`` may also be a
    :class:`~rcp_lib.experiments.methods.Method` (then ``setting`` is its own).

    ``dtype`` None (default): stored as evaluated, i.e. in the built model's compute dtype (float32 for the CPU
    profiles), so the folder's perplexity is the table row's (the row's ``storage_dtype`` column).
    ``out`` is checked first (:func:`rcp_lib.deploy.check_output_folder`), before any model is built.

    Raises:
        ValueError: the method has no quantized weights (nothing to pack).
        FileExistsError: ``out`` holds other files, or a packed folder without ``overwrite``.
    """
    from .experiments.build import base_model, build
    from .experiments.methods import Method, method
    from .deploy import check_output_folder, save_quantized
    from .profiles import get_profile
    from .quant.apply import check_packable

    check_output_folder(out, overwrite)
    P = get_profile(profile, **(overrides or {}))
    m = name if isinstance(name, Method) else method(name, setting)
    if m.recipe(P).quant is None:
        raise ValueError(f"{name} {setting} is a full-precision method: nothing to pack")
    check_packable(m.recipe(P).quant)
    built = built_by()
    why = committed_row_mismatch(m.name, m.setting, P.run_name, P.seed, built,
                                 on_cpu=torch.device(P.device).type == "cpu")
    if why:
        warnings.warn(why, stacklevel=2)
    model = build(m, P, progress=progress)
    source = {"method": m.name, "setting": m.setting, "profile": P.name, "overrides": P.overrides, "seed": P.seed,
              **built}
    return save_quantized(model, out, tokenizer=base_model(P)[1], dtype=dtype, max_shard_size=max_shard_size,
                          overwrite=overwrite, source=source)


def evaluate_folder(path: str | os.PathLike, corpus: str = "wiki-excerpt", seqlen: int = 512,
                    max_windows: int | None = 32, tasks: list[str] | None = None, limit: int | None = None,
                    device: str = "cpu", spread: bool = True) -> dict[str, Any]:
    """Perplexity on the corpus' test split and, if ``tasks`` are given, zero-shot accuracy
    (:func:`rcp_lib.evaluation.zero_shot.zero_shot`, offline tasks allowed) of a packed folder.

    ``spread``: the ``max_windows`` windows evenly spread over the split (the tables' ``eval_spread``), not the first
    ones; with a profile's ``seqlen``, ``eval_windows`` and ``spread=True`` the windows of its perplexity rows.

    Returns:
        ``{"model": path, "corpus", "seqlen", "windows", "tokens_scored", "window_indices", "ppl",
        "zero_shot": [rows]}``.
    Raises:
        PackedFormatError: not a valid packed folder. ValueError: the folder has no tokenizer.
    """
    from .data import corpus_tokens
    from .evaluation import perplexity_details
    from .deploy import load_quantized, packed_source

    model, tok = load_quantized(path, device=device)
    if tok is None:
        raise ValueError(f"{path} has no tokenizer; re-export it with save_quantized(..., tokenizer=...)")
    ids = corpus_tokens(tok, corpus, "test")
    r = perplexity_details(model, ids, seqlen=seqlen, max_windows=max_windows, progress=False, spread=spread)
    out: dict[str, Any] = {"model": str(path), "corpus": corpus, "seqlen": seqlen, "windows": r.windows,
                           "tokens_scored": r.tokens_scored, "window_indices": r.window_indices, "ppl": r.ppl}
    source = packed_source(path)
    if source:  # what the folder was built from (save_quantized's ``source``)
        out["source"] = source
    if tasks:
        from .evaluation.zero_shot import zero_shot

        df = zero_shot(model, tok, tasks=tasks, limit=limit)
        out["zero_shot"] = df.to_dict(orient="records")
    return out
