"""Perplexity and zero-shot tables: one cached, provenance-carrying row per method (notebooks 02 and 03)."""

from __future__ import annotations

import time
from dataclasses import replace

from ..evaluation import perplexity_details
from ..io import provenance
from ..models import describe
from ..profiles import Profile
from .build import base_model, build, qat_history, qat_stats, step0_windows, tokens
from .methods import Method, all_methods, method
from .rows import cached_row, row_key, method_config


#: movement / start columns of every perplexity row (None for rows without QAT); see :mod:`rcp_lib.movement`
QAT_COLUMNS = ("step0_ppl", "clip_ratio_init", "clip_ratio_final", "clip_shift", "range_shift", "level_shift",
               "weight_shift", "code_flips")


def _window_note(idx: list[int], n_total: int) -> str:
    """Compact description of the scored windows, e.g. ``"32 of 235 evenly spread: floor(i*235/32)"``."""
    if idx == list(range(n_total)):
        return f"all {n_total}"
    if idx == list(range(len(idx))):
        return f"first {len(idx)} of {n_total}"
    return f"{len(idx)} of {n_total} evenly spread: floor(i*{n_total}/{len(idx)})"


def storage_dtype(model, method: Method, profile: Profile) -> str | None:
    """The ``storage_dtype`` column of a row: the dtype ``python -m rcp_lib export`` writes the row's packed folder in
    by default (:func:`rcp_lib.deploy.save_quantized` with ``dtype=None``: the built model's compute dtype, so the
    folder holds the evaluated model); None for a full-precision row (nothing to pack). Provenance only: not part of
    the row's cache key."""
    from ..deploy import compute_dtype

    if method.recipe(profile).quant is None:
        return None
    return str(compute_dtype(model)).replace("torch.", "")


def bits_per_weight(method: Method, profile: Profile) -> float:
    """Bits per block-linear weight of the row's method in its own deployment format, fp16 metadata
    (:attr:`rcp_lib.memory.Scheme.bits_per_weight`: codes plus what its grid needs per group, a level table for LDP,
    scale + zero for a uniform grid; 16 for FP): the bits of an equal-bits comparison. Not the size of rcp_lib's packed
    folder, which stores a level table for every method, in the row's ``storage_dtype`` (float32 on the CPU)."""
    from ..memory import Scheme

    return Scheme.of(method.recipe(profile).quant).bits_per_weight


def ppl_row(method: Method, profile: Profile, progress: bool = True) -> dict:
    """Perplexity row for a method (cached). Records which windows of the test split were scored and, for QAT rows,
    the perplexity before the first step on the same windows (``step0_ppl``), how far the clip, the levels and the
    latent weights moved (:data:`QAT_COLUMNS`), the training tokens and seconds (``qat_tokens``, ``qat_seconds``),
    and the dtype its exported folder stores by default (``storage_dtype``: the folder's perplexity is this row's)."""

    def compute():
        t0 = time.time()
        model = build(method, profile, progress=progress)
        build_s = time.time() - t0
        test = tokens(profile, "test")
        r = perplexity_details(model, test, seqlen=profile.seqlen, max_windows=profile.eval_windows,
                               progress=progress, spread=profile.eval_spread)
        rot = method.recipe(profile).rotation
        st = qat_stats(method, profile) if method.qat else {}
        if st.get("step0_windows", step0_windows(profile)) != step0_windows(profile):
            st = {**st, "step0_ppl": None}  # scored on other windows than this row: no pair for vs_start
        return {"method": method.name, "setting": method.setting, "family": method.family, "ppl": r.ppl,
                **{k: st.get(k) for k in QAT_COLUMNS}, "qat_tokens": st.get("tokens"), "qat_seconds": st.get("seconds"),
                "model": profile.model, "model_note": describe(profile.model), "corpus": profile.corpus,
                "split": "test", "seqlen": profile.seqlen, "windows": r.windows, "tokens_scored": r.tokens_scored,
                "windows_note": _window_note(r.window_indices, test.numel() // profile.seqlen),
                "window_indices": r.window_indices,
                "seed": profile.seed, "rotation_seed": rot.seed if rot is not None else None,
                "r1_block": rot.r1_block if rot is not None else None,
                "build_seconds": round(build_s, 1), "eval_seconds": round(r.seconds, 1),
                "config": method_config(method, profile), "storage_dtype": storage_dtype(model, method, profile),
                "bits_per_weight": bits_per_weight(method, profile),
                **provenance()}

    return cached_row("ppl", row_key(method, profile), compute)


def ppl_table(profile: Profile, progress: bool = True, families: tuple[str, ...] = ("baseline", "ptq", "qat")) -> list[dict]:
    """Perplexity rows: FP, the PTQ baselines and the QAT rows for every setting of the profile.

    ``families`` selects a part of the table (e.g. ``("baseline", "ptq")`` for the PTQ table alone).
    """
    from ..progress import bar as tqdm

    methods = [m for m in all_methods(profile) if m.family in families]
    rows = []
    for m in tqdm(methods, desc="methods", unit="row", disable=not progress):
        rows.append(ppl_row(m, profile, progress=progress))
    return rows


def full_split_table(profile: Profile, progress: bool = True) -> list[dict]:
    """Rows of ``profile.full_eval_methods`` (first setting) scored on every window of the test split (cached).

    The same trained / calibrated models as the main table (their caches are shared); only the evaluation differs.
    """
    full, methods = full_split_methods(profile)
    return [ppl_row(m, full, progress=progress) for m in methods]


def full_split_methods(profile: Profile) -> tuple[Profile, list[Method]]:
    """The profile of the whole-split rows (``eval_windows=None``) and their methods (:func:`full_split_table`)."""
    s = profile.settings[0]
    keep = set(profile.full_eval_methods)
    return replace(profile, eval_windows=None), [m for m in all_methods(profile)
                                                 if m.name in keep and m.setting in (s, "FP")]


def qat_curves(profile: Profile) -> dict[str, list[dict]]:
    """Training histories of the QAT rows (``"RCP W2A4KV4"`` -> list of {step, loss, ...})."""
    return {f"{m.name} {m.setting}": qat_history(m, profile) for m in all_methods(profile) if m.qat}


#: the default rows of the zero-shot table (among the profile's methods): RCP beside the PTQ rows and its fair QAT rival
ZERO_SHOT_ROWS = ("FP", "RTN", "QuaRot-RTN", "QuaRot-GPTQ", "GSR-GPTQ", "RCP", "Uniform-QAT")


def zero_shot_methods(profile: Profile) -> list[Method]:
    """The rows of the zero-shot table at the first setting: ``profile.zero_shot_methods`` in its order, else
    :data:`ZERO_SHOT_ROWS` among the profile's methods."""
    s = profile.settings[0]
    if profile.zero_shot_methods is not None:
        return [method(n, s) for n in profile.zero_shot_methods]
    return [m for m in all_methods(profile) if m.name in ZERO_SHOT_ROWS and m.setting in (s, "FP")]


def zero_shot_key(method: Method, profile: Profile) -> dict:
    """Row-cache key (kind ``"zeroshot"``) of the zero-shot rows of ``method``."""
    return {**row_key(method, profile), "tasks": profile.zero_shot_tasks, "limit": profile.zero_shot_limit}


def zero_shot_table(profile: Profile, progress: bool = True) -> list[dict]:
    """Zero-shot rows (lm-evaluation-harness) for :func:`zero_shot_methods` (cached per method)."""
    from ..evaluation.zero_shot import zero_shot

    rows: list[dict] = []
    for m in zero_shot_methods(profile):
        key = zero_shot_key(m, profile)

        def compute(m=m):
            model = build(m, profile, progress=progress)
            df = zero_shot(model, base_model(profile)[1], tasks=profile.zero_shot_tasks,
                           limit=profile.zero_shot_limit, config=method_config(m, profile), seed=profile.seed)
            recs = df.to_dict("records")
            prov = {"storage_dtype": storage_dtype(model, m, profile), **provenance()}
            return {"rows": [{"method": m.name, "setting": m.setting, "model": profile.model, **r, **prov} for r in recs]}

        rows += cached_row("zeroshot", key, compute)["rows"]
    return rows


def chance_level(task: str) -> float | None:
    """Random-guess accuracy of a multiple-choice task (None for generation/loglikelihood tasks)."""
    return {"wiki_nextsent": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "piqa": 0.5,
            "winogrande": 0.5, "boolq": 0.5}.get(task)
