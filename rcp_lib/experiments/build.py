"""Building the model of a method: the FP base model, its data, and rotate -> quantize -> GPTQ/RTN or QAT, with the
PTQ weights and the trained QAT students cached (keys: :mod:`rcp_lib.experiments.rows`)."""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from ..data import calibration_windows, corpus_tokens
from ..io import atomic_save_torch, atomic_write_json
from ..models import load
from ..paths import cache_dir
from ..profiles import Profile
from ..qat import train
from ..quant.apply import quantize_model
from ..rotation.fuse import rotate_model
from .methods import Method
from .rows import _log_cache, _qat_key, cache_name, ptq_key

_BASE: dict[tuple[str, str], tuple[nn.Module, object]] = {}


def base_dtype(profile: Profile) -> torch.dtype:
    """The base model's parameter dtype: ``profile.dtype`` or :func:`rcp_lib.models.default_dtype` (bf16 on CUDA)."""
    from ..models import default_dtype

    if profile.dtype is None:
        return default_dtype(profile.device)
    dt = getattr(torch, profile.dtype, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"profile dtype {profile.dtype!r} is not a torch floating dtype (e.g. 'bfloat16', 'float32')")
    return dt


def base_model(profile: Profile) -> tuple[nn.Module, object]:
    """The full-precision model of a profile (loaded once per process; callers get deep copies)."""
    key = (profile.model, profile.device, base_dtype(profile))
    if key not in _BASE:
        for k in [k for k in _BASE if k[:2] != key[:2] or k[2] != key[2]]:  # one base model per process
            del _BASE[k]
        _free(profile.device)
        _BASE[key] = load(profile.model, device=profile.device, dtype=base_dtype(profile))
    return _BASE[key]


def _free(device: str | torch.device) -> None:
    """Return freed memory (a previous row's model) to the device before the next allocation."""
    import gc

    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def tokens(profile: Profile, split: str) -> torch.Tensor:
    """Token ids ``[1, n]`` of a split of the profile's corpus, with the profile's tokenizer."""
    return corpus_tokens(base_model(profile)[1], profile.corpus, split)


def calibration(profile: Profile) -> torch.Tensor:
    """``[calib_windows, calib_seqlen]`` random windows of the train split (GPTQ/QuaRot convention)."""
    return calibration_windows(tokens(profile, "train"), profile.calib_windows, profile.calib_seqlen, seed=profile.seed)


def build(method: Method, profile: Profile, progress: bool = True) -> nn.Module:
    """A fresh model for ``method``: copy of the FP model -> rotate -> quantize -> GPTQ or QAT (cached)."""
    fp, _ = base_model(profile)
    _free(profile.device)
    recipe = method.recipe(profile)
    model = copy.deepcopy(fp)
    if recipe.quant is not None and model.dtype != torch.float32:
        # quantized rows start from fp32 weights (rotation fusion, GPTQ updates and the latent QAT weights need
        # them); the bf16 base is the teacher and the FP row
        model = model.float()
    if recipe.rotation is not None:
        rotate_model(model, recipe.rotation)
    if recipe.quant is None:
        return model
    quantize_model(model, recipe.quant)
    if recipe.ptq in ("rtn", "gptq"):
        _ptq_cached(model, method, profile, progress)
    if recipe.qat is not None:
        out = cache_dir() / "qat" / _qat_key(method, profile)
        done = out / "student.pt"
        if done.exists():
            model.load_state_dict(torch.load(done, map_location=profile.device), strict=True)
        else:
            from ..qat import resolve_mixed_precision, teacher_dtype

            td = teacher_dtype(resolve_mixed_precision(recipe.qat), fp)
            teacher = fp if fp.dtype == td else copy.deepcopy(fp).to(td)  # train() never changes the shared base
            res = train(model, teacher, tokens(profile, "train"), recipe.qat, out_dir=out, resume=True,
                        progress=progress)
            del teacher
            atomic_save_torch(model.state_dict(), done)
            atomic_write_json(res.history, out / "history.json")
    return model


def _ptq_cached(model: nn.Module, method: Method, profile: Profile, progress: bool) -> None:
    """Quantize the weights of a PTQ row once (GPTQ, or RTN with its clip search) and freeze them as codes + level
    tables, or restore that frozen state from the cache (``cache_dir()/ptq/``, keyed by :func:`ptq_key`), through
    the same frozen-state functions as the packed export (:func:`rcp_lib.packing.save_quantized_state` /
    :func:`~rcp_lib.packing.load_quantized_state`). Every later use of the same weights (another activation setting,
    the zero-shot table, the export of the memory check) loads them."""
    from ..packing import load_quantized_state, save_quantized_state
    from ..quant.calibrate import gptq_model
    from ..quant.linear import freeze_model

    key = ptq_key(method, profile)
    name = cache_name(key["kind"], key)
    path = cache_dir() / "ptq" / f"{name}.safetensors"
    label = f"{method.name} weights ({method.recipe(profile).quant.w_bits}-bit)"
    _log_cache(path.exists(), name, label)
    if path.exists():
        load_quantized_state(model, path)
        return
    if method.ptq == "gptq":
        gptq_model(model, calibration(profile), progress=progress)  # ends frozen
    freeze_model(model)
    save_quantized_state(model, path)


def qat_history(method: Method, profile: Profile) -> list[dict]:
    """The training history of a cached QAT student (``[]`` before it is trained)."""
    p = cache_dir() / "qat" / _qat_key(method, profile) / "history.json"
    return json.loads(p.read_text()) if p.exists() else []
