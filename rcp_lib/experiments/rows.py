"""Cache keys, the row cache and result files.

Every cached object is named ``<kind>-<config_hash(key)>`` (:func:`cache_name`), where the key holds everything that
determines it plus the code fingerprint and the CPU type (:func:`code_key`), so a code or config change, or another
CPU type, recomputes it: result rows as JSON under ``cache_dir()/rows/`` (:func:`cached_row`), trained QAT students under
``cache_dir()/qat/<hash>/`` (:func:`qat_key`) and frozen PTQ weights under ``cache_dir()/ptq/`` (:func:`ptq_key`).
Finished tables go to ``results/<profile>/<name>.csv`` (:func:`write_rows`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from ..io import atomic_write_csv, atomic_write_json, config_hash, provenance, require_clean_tree
from ..paths import cache_dir
from ..paths import results_dir
from ..profiles import Profile
from .methods import Method


def code_key(device: str = "cpu") -> str:
    """What every cache key carries besides its own settings: the code fingerprint and the rounding of the machine
    that computes on ``device`` (:func:`rcp_lib.io.platform_key`), ``"<fingerprint> <platform>"``. A code or config
    change, or a run on another CPU type (GPU model), recomputes instead of reading the cache (a table is never resumed
    on a machine that rounds differently)."""
    from ..io import code_fingerprint, platform_key  # looked up at call time (the tests replace them)

    return f"{code_fingerprint()} {platform_key(device)}"


def eval_key(kind: str, rotation, quant, profile, calib: bool = False) -> dict:
    """Cache key of a row that rotates and quantizes the profile's base model and scores it on the profile's test
    windows (the GSR decision, the R4 blocks): what made it (``rotation``, ``quant``: configs with ``to_dict``), the
    model, corpus, windows and code; with ``calib``, the calibration windows (a GPTQ row)."""
    key = {"kind": kind, "model": profile.model, "corpus": profile.corpus, "dtype": profile.dtype,
           "rotation": rotation.to_dict(), "quant": quant.to_dict(), "seqlen": profile.seqlen,
           "eval_windows": profile.eval_windows, "eval_spread": profile.eval_spread, "code": code_key(profile.device)}
    if calib:
        key["calib"] = [profile.calib_windows, profile.calib_seqlen, profile.seed]
    return key


def cache_name(kind: str, key: dict) -> str:
    """File stem of a cached object: ``<kind>-<16 hex digits of config_hash(key)>``."""
    return f"{kind}-{config_hash(key)}"


def row_key(method: Method, profile: Profile) -> dict:
    """What determines a result row of ``method``: its name and recipe (:func:`method_config`), the profile fields
    that change its number (not names, device, table selections or, for non-QAT rows, the QAT budget) and the code."""
    p = profile.to_dict()
    for k in ("name", "overrides", "analysis_layers", "analysis_rotations", "zero_shot_tasks", "zero_shot_limit", "settings", "device",
              "methods", "full_eval_methods", "ablation_seeds", "sweep_val_windows", "qat_ablation_rows",
              "gsr_weight_groups", "notebooks", "zero_shot_methods", "search_seeds", "search_points",
              "search_curve_length"):
        p.pop(k, None)
    if not method.qat:
        for k in list(p):
            if k.startswith("qat_"):
                p.pop(k)
    return {"method": method_config(method, profile), "profile": p, "code": code_key(profile.device)}


def qat_key(method: Method, profile: Profile) -> str:
    """Cache key of a trained student: what determines the weights (the method's name and recipe, which holds the
    weight group and the QAT budget; the model, its parameter dtype and the corpus; with a GPTQ start the calibration
    windows), not the evaluation settings."""
    config = method_config(method, profile)
    key = {"method": config, "model": profile.model, "corpus": profile.corpus, "dtype": profile.dtype,
           "code": code_key(profile.device),
           "kind": "qat-student"}
    if (config.get("qat") or {}).get("gptq_start"):
        key["calib"] = [profile.calib_windows, profile.calib_seqlen]
    return config_hash(key)


def ptq_key(method: Method, profile: Profile) -> dict:
    """What determines a PTQ row's quantized weights: the rotation, the weight quantizer and, for GPTQ, the
    calibration data. Not the activation / KV bits: RTN never sees activations, and GPTQ collects its Hessians and
    propagates block outputs with 16-bit activations and KV cache (QuaRot's protocol, ``gptq_model``'s default), so
    e.g. QuaRot-GPTQ at W2A4KV4 and at W2A16KV16 share one set of codes (a test checks this)."""
    r = method.recipe(profile)
    weight = r.quant.weight if r.quant is not None else None
    key = {"kind": f"ptq-{r.ptq}", "model": profile.model, "dtype": profile.dtype,
           "rotation": r.rotation.to_dict() if r.rotation else None,
           "weights": weight.to_dict() if weight is not None else None, "code": code_key(profile.device)}
    if r.ptq == "gptq":
        key.update({"corpus": profile.corpus, "calib_windows": profile.calib_windows,
                    "calib_seqlen": profile.calib_seqlen, "seed": profile.seed, "gptq_activations": "16-bit"})
    return key


def _cache_label(key: dict) -> str:
    """Short human label of a cache key for the hit/miss log (``"RCP W2A4KV4"``, ``"rotation gsr"``)."""
    m = key.get("method")
    if isinstance(m, dict):
        return f"{m.get('method') or m.get('name') or '?'} {m.get('setting', '')}".strip()
    return " ".join(str(key[k]) for k in ("kind", "rotation") if k in key) or "?"


def _log_cache(hit: bool, name: str, label: str) -> None:
    """One stderr line per cache look-up: ``[rcp_lib cache] hit ppl-<hash> (RCP W2A4KV4)``."""
    print(f"[rcp_lib cache] {'hit' if hit else 'miss'} {name} ({label})" + ("" if hit else " computing"),
          file=sys.stderr, flush=True)


def row_cached(kind: str, key: dict) -> bool:
    """True when :func:`cached_row` would read the row ``(kind, key)`` from the cache instead of computing it (no side
    effect: nothing is logged, read or written)."""
    return (cache_dir() / "rows" / f"{cache_name(kind, key)}.json").exists()


def cached_row(kind: str, key: dict, compute: Callable[[], dict]) -> dict:
    """Row cache: ``cache_dir()/rows/<kind>-<hash of key>.json``; ``compute()`` runs on a miss. A computed row is
    returned as read back from its file, so a cold and a cached run give the same row (values, types, key order)."""
    name = cache_name(kind, key)
    path = cache_dir() / "rows" / f"{name}.json"
    if path.exists():
        _log_cache(True, name, _cache_label(key))
        return json.loads(path.read_text())
    _log_cache(False, name, _cache_label(key))
    atomic_write_json(compute(), path)
    return json.loads(path.read_text())


def method_config(method: Method, profile: Profile) -> dict:
    """The ``config`` column of a row: the method's name, setting and family, and its :class:`~rcp_lib.recipe.Recipe`
    (``rotation``, ``quant``, ``ptq``, ``qat``; read back with :meth:`Recipe.of_row`)."""
    return {"method": method.name, "setting": method.setting, "family": method.family,
            **method.recipe(profile).to_dict()}


def write_rows(rows: list[dict], profile: Profile, name: str) -> Path:
    """Write result rows atomically to ``results/<run name>/<name>.csv`` (see :mod:`rcp_lib.paths`): the profile's
    name, or ``<name>-<hash>`` for a profile with overrides. Each row gets the columns ``run_name`` (that folder
    name) and ``overrides`` (the overridden profile fields as JSON, ``{}`` for the named profile). A row without
    provenance of its own (``git_commit``: rows computed in this process, e.g. the memory accountant's) gets
    :func:`rcp_lib.io.provenance` now; rows that carry it (cached rows: the commit that computed them) keep theirs.

    Raises :class:`rcp_lib.io.DirtyTreeError` when code or configs have uncommitted changes, unless dirty runs
    are allowed (``--allow-dirty`` / ``RCP_ALLOW_DIRTY=1``).
    """
    require_clean_tree()
    extra = {"run_name": profile.run_name, "overrides": json.dumps(profile.overrides, sort_keys=True, default=str)}
    prov = provenance() if any("git_commit" not in r for r in rows) else {}
    out = [{**r, **({} if "git_commit" in r else {k: v for k, v in prov.items() if k not in r}), **extra} for r in rows]
    return atomic_write_csv(out, results_dir(profile) / f"{name}.csv")
