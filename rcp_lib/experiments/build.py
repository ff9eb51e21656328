"""Building the model of a method: the FP base model, its data, and rotate -> quantize -> GPTQ/RTN or QAT, with the
PTQ weights and the trained QAT students cached (keys: :mod:`rcp_lib.experiments.rows`)."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..data import calibration_windows, corpus_tokens
from ..io import atomic_save_torch, atomic_write_json
from ..models import load
from ..paths import cache_dir
from ..profiles import Profile
from ..qat import QATConfig, train
from ..quant.apply import quantize_model
from ..quant.linear import QuantLinear
from ..rotation.fuse import rotate_model
from .methods import Method
from .rows import code_key, _log_cache, qat_key, cache_name, ptq_key

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


def build(method: Method, profile: Profile, progress: bool = True, check_memory: bool = True) -> nn.Module:
    """A fresh model for ``method``: copy of the FP model -> rotate -> quantize -> GPTQ or QAT (cached).

    A QAT row whose student is not cached is trained here, in this process, unless its estimated memory exceeds the
    profile's one CUDA device (``check_memory``; :func:`check_qat_fits` names the ``accelerate launch`` command that
    trains it into the cache instead, :func:`train_rows`).
    """
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
    out = cache_dir() / "qat" / qat_key(method, profile) if recipe.qat is not None else None
    trained = out is not None and (out / "student.pt").exists()
    # a trained student's state replaces every quantizer value the start would set (strict load): no clip search or
    # Lloyd fit for it (the same model, bit for bit; tests/quant/test_linear.py)
    quantize_model(model, recipe.quant,
                   layer_factory=functools.partial(QuantLinear.from_linear, init=False) if trained else None)
    if recipe.ptq in ("rtn", "gptq"):
        _ptq_cached(model, method, profile, progress)
    if recipe.qat is not None:
        done = out / "student.pt"
        if trained:  # (a GPTQ start needs no GPTQ here: the static quantizers take the trained state)
            model.load_state_dict(torch.load(done, map_location=profile.device), strict=True)
        else:
            if check_memory:
                check_qat_fits(method, profile, model.config)
            _train_and_save(model, method, profile, out, progress)
    return model


def _train_and_save(model: nn.Module, method: Method, profile: Profile, out: Path, progress: bool) -> None:
    """Train the quantized ``model`` of a QAT row in place and write ``out/student.pt`` + ``out/qat_stats.json`` (what
    :func:`build` loads; :func:`train_student`'s statistics and the number of ``processes``). Under a distributed launch every process trains, the full state dict is gathered (a
    collective: a sharded student's shards) and rank 0 writes."""
    from ..qat import resolve_mixed_precision, teacher_dtype
    from ..distributed import full_state_dict

    recipe = method.recipe(profile)
    fp, _ = base_model(profile)
    gptq_s = 0.0
    if recipe.qat.gptq_start:
        gptq_s = gptq_start(model, calibration(profile), progress, key=start_key(profile, recipe))
    td = teacher_dtype(resolve_mixed_precision(recipe.qat), fp)
    teacher = fp if fp.dtype == td else copy.deepcopy(fp).to(td)  # train() never changes the shared base
    stats = train_student(model, teacher, profile, recipe.qat, out_dir=out, progress=progress,
                          step0_eval=lambda m: _test_ppl(m, profile, progress))
    del teacher
    stats["seconds"] = round(stats["seconds"] + gptq_s, 1)
    # the windows step0_ppl was scored on (the student's key leaves out the evaluation settings: a row scored on other
    # windows must not pair its perplexity with this start, rcp_lib.experiments.tables.ppl_row)
    stats["step0_windows"] = step0_windows(profile)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    # the tokens per optimizer step scale with the processes (the rows' qat_tokens show it; the key does not)
    stats["processes"] = torch.distributed.get_world_size() if dist else 1
    state = full_state_dict(model) if dist else model.state_dict()
    if not dist or torch.distributed.get_rank() == 0:
        atomic_write_json(stats, out / "qat_stats.json")
        atomic_save_torch(state, out / "student.pt")
        drop_checkpoints(out)
    if dist:
        torch.distributed.barrier()


class QATDoesNotFitError(RuntimeError):
    """The QAT of a table row is estimated not to fit on the profile's one GPU: train it with ``accelerate launch``
    (:func:`train_rows`; the message names the command)."""


def qat_memory_gb(method: Method, profile: Profile, config) -> float:
    """Estimated GB of one process training the student of ``method`` alone (no sharding), from the model's
    ``config`` and the row's recipe (weight bits and group, QAT seqlen and micro-batch):
    :func:`rcp_lib.train_memory.qat_memory_per_gpu`, which assumes gradient checkpointing and a bf16 teacher."""
    from ..train_memory import qat_memory_per_gpu

    r = method.recipe(profile)
    return qat_memory_per_gpu(config, n_gpus=1, strategy="ddp", w_bits=r.quant.w_bits,
                              group_size=r.quant.weight.group_size, seq_len=r.qat.seqlen,
                              micro_batch=r.qat.batch_size)["total_gb"]


#: the multi-GPU launch that :func:`check_qat_fits` proposes (configs/accelerate/)
LAUNCH_CONFIG = "configs/accelerate/8gpu-fsdp.yaml"


def launch_command(method: Method, profile: Profile) -> str:
    """The shell command that trains the student of ``method`` under ``profile`` (and its overrides) on several
    GPUs into the cache where :func:`build` finds it (``python -m rcp_lib train-rows``)."""
    import shlex

    sets = "".join(f" --set {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in sorted(profile.overrides.items()))
    return (f"accelerate launch --config_file {LAUNCH_CONFIG} -m rcp_lib train-rows --profile {profile.name} "
            f"--method {shlex.quote(method.name)} --setting {method.setting}{sets}")


def check_qat_fits(method: Method, profile: Profile, config, device_bytes: int | None = None) -> None:
    """Refuse to train a QAT row on one CUDA device smaller than its estimated memory (:func:`qat_memory_gb`).

    Args:
        config: the model's transformers config (sizes only).
        device_bytes: the device's memory (None: the profile's CUDA device's; nothing is checked off CUDA).
    Raises:
        QATDoesNotFitError: one line with the estimate, the device's memory and the ``accelerate launch`` command
            (:func:`launch_command`) that trains the student into the cache, after which the same call loads it.
    """
    if device_bytes is None:
        dev = torch.device(profile.device)
        if dev.type != "cuda" or not torch.cuda.is_available():
            return
        device_bytes = torch.cuda.get_device_properties(dev).total_memory
    need, have = qat_memory_gb(method, profile, config), device_bytes / 1e9
    if need > have:
        raise QATDoesNotFitError(
            f"{method.name} {method.setting} of profile {profile.name!r} is not trained yet, and its QAT needs about "
            f"{need:.1f} GB on one GPU (estimate, rcp_lib.train_memory) while {profile.device} has {have:.1f} GB: "
            f"train it on several GPUs with `{launch_command(method, profile)}` (it writes "
            f"{cache_dir() / 'qat' / qat_key(method, profile) / 'student.pt'}), then run this again")


def train_rows(methods: list[Method], profile: Profile, progress: bool = True) -> list[Path]:
    """Train the QAT students of table rows into the cache where :func:`build` loads them: the entry of
    ``accelerate launch -m rcp_lib train-rows`` (any number of processes, DDP or FSDP from the launch config; every
    process trains on its own device, rank 0 writes). Rows already trained are skipped.

    Returns:
        the ``student.pt`` path of each method, in order.
    Raises:
        ValueError: a method without QAT.
    """
    from ..distributed import run_device

    bad = [f"{m.name} {m.setting}" for m in methods if not m.qat]
    if bad:
        raise ValueError(f"train-rows trains QAT rows only; not QAT: {bad}")
    dev = str(run_device(profile.device))  # this process's GPU under a launch, not GPU 0 in every process
    if dev != profile.device:
        profile = profile.with_overrides(device=dev)  # the device is no part of the cache keys
    paths = []
    for m in methods:
        done = cache_dir() / "qat" / qat_key(m, profile) / "student.pt"
        _log_cache(done.exists(), done.parent.name, f"{m.name} {m.setting} student")
        if not done.exists():
            build(m, profile, progress=progress, check_memory=False)
        paths.append(done)
    return paths


def drop_checkpoints(out: Path) -> None:
    """Delete the QAT checkpoints of a finished student's folder ``out`` (``student.pt`` stays): ``checkpoint``
    (weights + optimizer state, ~2.3x the student) only resumes an unfinished run of this key (another step count is
    another key), and so do the leftovers of a save interrupted between its renames (``.checkpoint-old``,
    ``.checkpoint-tmp-*``; :func:`rcp_lib.qat._atomic_save_state`)."""
    for ckpt in [out / "checkpoint", out / ".checkpoint-old", *out.glob(".checkpoint-tmp-*")]:
        shutil.rmtree(ckpt, ignore_errors=True)


def step0_windows(profile: Profile) -> list:
    """The evaluation windows of a profile as ``[seqlen, eval_windows, eval_spread]`` (what ``step0_ppl`` was scored
    on)."""
    return [profile.seqlen, profile.eval_windows, profile.eval_spread]


def _test_ppl(model: nn.Module, profile: Profile, progress: bool) -> float:
    """Perplexity on the profile's evaluation windows of the test split (the windows of the table rows)."""
    from ..evaluation import perplexity_details

    return perplexity_details(model, tokens(profile, "test"), seqlen=profile.seqlen, max_windows=profile.eval_windows,
                              progress=progress, spread=profile.eval_spread).ppl


def gptq_start(model: nn.Module, calib: torch.Tensor, progress: bool = True, key: dict | None = None) -> float:
    """"GPTQ on the LDP grid, then QAT", in place: GPTQ every projection of the quantized ``model`` (its quantizers
    built with ``range_mode="static"``) on its own quantizer's grid with the calibration windows ``calib``
    (``LongTensor [n, seqlen]``; a QAT row uses :func:`calibration`, the PTQ rows' windows), then make the layers
    trainable on that grid (:func:`rcp_lib.quant.calibrate.thaw_to_static`).

    With ``key`` (:func:`start_key`: what made ``model`` besides ``calib``) the started state is cached under
    ``cache_dir()/start/`` and loaded instead of recomputed: rows that differ only in how they train (learning rates,
    frozen parts, steps) share one start per seed. Loading gives the state the computation gives, bit for bit (a test
    checks the trained weights)."""
    from ..quant.calibrate import gptq_model, thaw_to_static

    path = None
    if key is not None:
        key = {**key, "calib": _tensor_digest(calib), "code": code_key(key.get("device", "cpu"))}
        name = cache_name("gptq-start", key)
        path = cache_dir() / "start" / f"{name}.pt"
        _log_cache(path.exists(), name, "GPTQ start")
        if path.exists():
            saved = torch.load(path, map_location="cpu", mmap=True)  # load_state_dict copies onto the model's device
            model.load_state_dict(saved["state"], strict=True)
            return float(saved["seconds"])
    t0 = time.perf_counter()
    gptq_model(model, calib, progress=progress)
    thaw_to_static(model)
    seconds = time.perf_counter() - t0
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    if path is not None and (not dist or torch.distributed.get_rank() == 0):
        atomic_save_torch({"state": model.state_dict(), "seconds": seconds}, path)
    return seconds


def start_key(profile: Profile, recipe) -> dict:
    """What determines a GPTQ start besides its calibration windows: the model, the dtype its base is loaded in and
    the device type (bf16 on CUDA, fp32 on the CPU by default), the rotation and the quantizers
    (:class:`rcp_lib.recipe.Recipe`'s ``rotation`` and ``quant``), not the QAT section (rows that differ only in how
    they train share a start)."""
    return {"model": profile.model, "dtype": str(base_dtype(profile)), "device": torch.device(profile.device).type,
            "rotation": recipe.rotation.to_dict() if recipe.rotation else None, "quant": recipe.quant.to_dict()}


def _tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's shape, dtype and values (a cache key for data, e.g. calibration windows)."""
    import hashlib

    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


def train_student(model: nn.Module, fp: nn.Module, profile: Profile, qat: QATConfig, out_dir=None,
                  progress: bool = True, step0_eval: Callable[[nn.Module], float] | None = None,
                  data: torch.Tensor | None = None) -> dict:
    """Train a quantized student in place and return the row statistics of the run.

    Records the quantizer state before the first step (:func:`rcp_lib.movement.snapshot`), the perplexity before the
    first step (``step0_eval(model)``, e.g. on the table's test windows; skipped when None) and the movement after
    training. ``data`` defaults to the profile's train split. With ``out_dir``, checkpoints and ``history.json`` go
    there (a killed run resumes).

    Returns:
        ``{"step0_ppl", "clip_ratio_init", "clip_ratio_final", "clip_shift", "range_shift", "level_shift", "weight_shift",
        "code_flips", "tokens",
        "seconds", "block_ap"}`` (``step0_ppl`` None without ``step0_eval``; ``seconds`` = Block-AP + training, without the
        evaluations).
    """
    from pathlib import Path

    from ..movement import movement, snapshot

    # the model handed in is the step-0 model even when train() then resumes from a checkpoint (it is rebuilt
    # deterministically), so a resumed run compares against the same start
    before = snapshot(model)
    step0 = step0_eval(model) if step0_eval is not None else None
    res = train(model, fp, tokens(profile, "train") if data is None else data, qat, out_dir=out_dir,
                resume=out_dir is not None, progress=progress)
    stats = {"step0_ppl": step0, **movement(before, snapshot(model)), "tokens": res.tokens,
             "seconds": round(res.seconds, 1), "block_ap": res.block_ap}
    if out_dir is not None:
        atomic_write_json(res.history, Path(out_dir) / "history.json")
    return stats


def qat_stats(method: Method, profile: Profile) -> dict:
    """The run statistics of a cached QAT student (:func:`train_student`'s dict; ``{}`` before it is trained)."""
    p = cache_dir() / "qat" / qat_key(method, profile) / "qat_stats.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _ptq_cached(model: nn.Module, method: Method, profile: Profile, progress: bool) -> None:
    """Quantize the weights of a PTQ row once (GPTQ, or RTN with its clip search) and freeze them as codes + level
    tables, or restore that frozen state from the cache (``cache_dir()/ptq/``, keyed by :func:`ptq_key`), through
    the same frozen-state functions as the packed export (:func:`rcp_lib.deploy.save_quantized_state` /
    :func:`~rcp_lib.deploy.load_quantized_state`). Every later use of the same weights (another activation setting,
    the zero-shot table, the export of the memory check) loads them."""
    from ..deploy import load_quantized_state, save_quantized_state
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
    freeze_model(model, progress=progress)  # RTN: the clip search runs here (a bar per layer)
    save_quantized_state(model, path)


def qat_history(method: Method, profile: Profile) -> list[dict]:
    """The training history of a cached QAT student (``[]`` before it is trained)."""
    p = cache_dir() / "qat" / qat_key(method, profile) / "history.json"
    return json.loads(p.read_text()) if p.exists() else []
