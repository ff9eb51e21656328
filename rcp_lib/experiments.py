"""Experiments: named methods -> built models -> cached result rows with provenance.

Used by the notebooks and the CLI; holds no algorithm of its own (it composes ``rotate_model``,
``quantize_model``, GPTQ, ``train`` and the evaluators). Every row carries its full config (model,
rotation, quantization, PTQ/QAT recipe), corpus, seqlen, tokens, seed, versions, git commit and date.

Rows are cached as JSON under ``cache_dir()/rows/<hash>.json`` (outside the repo) keyed by the hash of
everything that determines them plus a fingerprint of the code (:func:`rcp_lib.io.code_fingerprint`), so
re-running a notebook reuses finished work and a code change recomputes it; trained QAT students and the frozen
weights of PTQ rows (GPTQ, clip-searched RTN) are cached likewise under ``cache_dir()/qat/<hash>/`` and
``cache_dir()/ptq/``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import calibration_windows, corpus_tokens
from .evaluation import perplexity_details
from .io import atomic_write_csv, atomic_write_json, config_hash, provenance
from .models import cache_dir, describe, load
from .profiles import Profile
from .qat import QATConfig, train
from .quant.apply import QuantConfig, preset, quantize_model
from .rotation.fuse import BLOCK_KINDS, RotationConfig, rotate_model

if TYPE_CHECKING:
    import pandas as pd

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Method:
    """One row of the paper's tables: how a model is rotated, quantized, and calibrated or trained."""

    name: str
    setting: str = "FP"  # full precision, or W2A4KV4 ...
    rotation: dict | None = None  # RotationConfig fields, None = no rotation
    quant: dict | None = None  # QuantConfig overrides on top of the setting preset; None with setting FP16
    ptq: str = "none"  # none | rtn | gptq
    qat: bool = False
    family: str = "baseline"  # baseline | ptq | qat

    def rotation_config(self, profile: Profile) -> RotationConfig | None:
        """The method's rotation for a profile: seeded with the profile's seed; a block-diagonal R1 (GSR and its
        block-Hadamard control) without an explicit block gets the profile's weight group size (our reading of
        GSR: its blocks match the weight quantization group)."""
        if self.rotation is None:
            return None
        r = {"seed": profile.seed, **self.rotation}
        if r.get("r1") in BLOCK_KINDS and r.get("r1_block") is None:
            r["r1_block"] = profile.w_group_size
        return RotationConfig(**r)

    def quant_config(self, profile: Profile) -> QuantConfig | None:
        if self.setting == "FP":
            return None
        return preset(self.setting, w_group_size=profile.w_group_size, **(self.quant or {}))

    def to_dict(self) -> dict:
        return asdict(self)


QUAROT = {"r1": "random_hadamard", "r2": True, "r3": True, "r4": True}
GSR = {"r1": "gsr", "r2": True, "r3": True, "r4": True}  # r1_block: the profile's group size (Method.rotation_config)
# The control of GSR: the same blocks with the rows in natural Hadamard order (separates sequency order from the
# block-diagonal structure; at block == group the two differ only by a permutation inside each group).
BLOCK_HAD = {"r1": "block_hadamard", "r2": True, "r3": True, "r4": True}
# Uniform baselines get QuaRot's weight clip search (--w_clip: per row and group, |e|^2.4 over r = 1.00 ... 0.20),
# in RTN and inside GPTQ, as their authors tune them.
RTN_Q = {"w_method": "rtn", "w_lwc": False, "w_clip_search": "mse"}
CONTROL_SETTINGS = ("W2A4KV4", "W2A16KV16")  # settings that also get the block-Hadamard control rows


def ptq_methods(settings: list[str]) -> list[Method]:
    """FP, RTN without rotation, QuaRot-style (random Hadamard R1-R4) + RTN / + GPTQ, GSR R1 + GPTQ, and the
    block-Hadamard + GPTQ control of GSR at the 2-bit settings. Every uniform baseline uses the clip search."""
    rows = [Method("FP", family="baseline")]
    for s in settings:
        rows += [
            Method("RTN", s, None, RTN_Q, "rtn", family="ptq"),
            Method("QuaRot-RTN", s, QUAROT, RTN_Q, "rtn", family="ptq"),
            Method("QuaRot-GPTQ", s, QUAROT, RTN_Q, "gptq", family="ptq"),
            Method("GSR-GPTQ", s, GSR, RTN_Q, "gptq", family="ptq"),
        ]
        if s in CONTROL_SETTINGS:
            rows.append(Method("BlockHadamard-GPTQ", s, BLOCK_HAD, RTN_Q, "gptq", family="ptq"))
    return rows


def qat_methods(settings: list[str]) -> list[Method]:
    """RCP and its ablations, all through the same QAT loop (our reconstruction; see README)."""
    rcp_q = {"w_method": "ldp", "w_lwc": True}
    rows = []
    for s in settings:
        if s == "W2A4KV4":
            rows += [
                Method("RCP", s, QUAROT, rcp_q, qat=True, family="qat"),
                Method("RCP w/o Partition (LWC+uniform)", s, QUAROT, {"w_method": "rtn", "w_lwc": True}, qat=True, family="qat"),
                Method("RCP w/o Rotate", s, None, rcp_q, qat=True, family="qat"),
                Method("RCP w/o Clip", s, QUAROT, {"w_method": "ldp", "w_lwc": False}, qat=True, family="qat"),
                Method("RCP+GSR", s, GSR, rcp_q, qat=True, family="qat"),
                Method("RCP+BlockHadamard", s, BLOCK_HAD, rcp_q, qat=True, family="qat"),
            ]
        else:
            rows.append(Method("RCP", s, QUAROT, rcp_q, qat=True, family="qat"))
    return rows


# ---------------------------------------------------------------------------------------------------
# building models
# ---------------------------------------------------------------------------------------------------

_BASE: dict[tuple[str, str], tuple[nn.Module, object]] = {}


def base_model(profile: Profile) -> tuple[nn.Module, object]:
    """The full-precision model of a profile (loaded once per process; callers get deep copies)."""
    key = (profile.model, profile.device)
    if key not in _BASE:
        _BASE[key] = load(profile.model, device=profile.device)
    return _BASE[key]


def tokens(profile: Profile, split: str) -> torch.Tensor:
    return corpus_tokens(base_model(profile)[1], profile.corpus, split)


def calibration(profile: Profile) -> torch.Tensor:
    """``[calib_windows, calib_seqlen]`` random windows of the train split (GPTQ/QuaRot convention)."""
    return calibration_windows(tokens(profile, "train"), profile.calib_windows, profile.calib_seqlen, seed=profile.seed)


def qat_config(profile: Profile) -> QATConfig:
    return QATConfig(steps=profile.qat_steps, seqlen=profile.qat_seqlen, batch_size=profile.qat_batch_size,
                     grad_accum=profile.qat_grad_accum, val_every=profile.qat_val_every,
                     checkpoint_every=max(1, min(profile.qat_val_every, profile.qat_steps)),
                     warmup_steps=max(0, min(10, profile.qat_steps // 10)), seed=profile.seed)


def build(method: Method, profile: Profile, progress: bool = True) -> nn.Module:
    """A fresh model for ``method``: copy of the FP model -> rotate -> quantize -> GPTQ or QAT (cached)."""
    fp, _ = base_model(profile)
    model = copy.deepcopy(fp)
    rot = method.rotation_config(profile)
    if rot is not None:
        rotate_model(model, rot)
    qcfg = method.quant_config(profile)
    if qcfg is None:
        return model
    quantize_model(model, qcfg)
    if method.ptq in ("rtn", "gptq"):
        _ptq_cached(model, method, profile, progress)
    if method.qat:
        out = cache_dir() / "qat" / _qat_key(method, profile)
        done = out / "student.pt"
        if done.exists():
            model.load_state_dict(torch.load(done), strict=True)
        else:
            res = train(model, fp, tokens(profile, "train"), qat_config(profile), out_dir=out, resume=True, progress=progress)
            from .io import atomic_save_torch

            atomic_save_torch(model.state_dict(), done)
            atomic_write_json(res.history, out / "history.json")
    return model


def ptq_key(method: Method, profile: Profile) -> dict:
    """What determines a PTQ row's quantized weights: the rotation, the weight quantizer and, for GPTQ, the
    calibration data. Not the activation / KV bits: RTN never sees activations, and GPTQ collects its Hessians and
    propagates block outputs with 16-bit activations and KV cache (QuaRot's protocol, ``gptq_model``'s default), so
    e.g. QuaRot-GPTQ at W2A4KV4 and at W2A16KV16 share one set of codes (a test checks this)."""
    rot = method.rotation_config(profile)
    qcfg = method.quant_config(profile)
    key = {"kind": f"ptq-{method.ptq}", "model": profile.model, "rotation": rot.to_dict() if rot else None,
           "weights": qcfg.weight_config().to_dict() if qcfg and qcfg.weight_config() else None, "code": _code()}
    if method.ptq == "gptq":
        key.update({"corpus": profile.corpus, "calib_windows": profile.calib_windows,
                    "calib_seqlen": profile.calib_seqlen, "seed": profile.seed, "gptq_activations": "16-bit"})
    return key


def _ptq_cached(model: nn.Module, method: Method, profile: Profile, progress: bool) -> None:
    """Quantize the weights of a PTQ row once (GPTQ, or RTN with its clip search) and freeze them as codes + level
    tables, or restore those from the cache (``cache_dir()/ptq/``, keyed by :func:`ptq_key`). Every later use of the
    same weights (another activation setting, the zero-shot table, the export of the memory check) loads them."""
    from .io import atomic_save_torch
    from .quant.apply import quantized_linears
    from .quant.calibrate import FrozenLevelsQuantizer, gptq_model

    key = ptq_key(method, profile)
    name = f"{key['kind']}-{config_hash(key)}"
    path = cache_dir() / "ptq" / f"{name}.pt"
    label = f"{method.name} weights ({method.quant_config(profile).weight_config().bits}-bit)"
    _log_cache(path.exists(), name, label)
    if path.exists():
        saved = torch.load(path)
    else:
        if method.ptq == "gptq":
            gptq_model(model, calibration(profile), progress=progress)
        saved = {n: q.weight_quantizer.export(q.weight) for n, q in quantized_linears(model)}
        atomic_save_torch(saved, path)
    for n, q in quantized_linears(model):
        codes, levels = saved[n]
        fq = FrozenLevelsQuantizer(codes, levels, q.weight_quantizer.config).to(q.weight.device)
        q.weight.data = fq(q.weight.data)
        q.weight_quantizer = fq


def qat_history(method: Method, profile: Profile) -> list[dict]:
    p = cache_dir() / "qat" / _qat_key(method, profile) / "history.json"
    return json.loads(p.read_text()) if p.exists() else []


# ---------------------------------------------------------------------------------------------------
# rows
# ---------------------------------------------------------------------------------------------------


def _row_key(method: Method, profile: Profile) -> dict:
    p = profile.to_dict()
    for k in ("name", "analysis_layers", "analysis_rotations", "zero_shot_tasks", "zero_shot_limit", "settings", "device",
              "methods", "full_eval_methods"):
        p.pop(k, None)
    if not method.qat:
        for k in list(p):
            if k.startswith("qat_"):
                p.pop(k)
    return {"method": method.to_dict(), "profile": p, "code": _code()}


def _code() -> str:
    """The code fingerprint that every cache key carries (a code or config change invalidates the caches)."""
    from .io import code_fingerprint

    return code_fingerprint()


def _cache_label(key: dict) -> str:
    """Short human label of a cache key for the hit/miss log (``"RCP W2A4KV4"``, ``"rotation gsr"``)."""
    m = key.get("method")
    if isinstance(m, dict):
        return f"{m.get('name', '?')} {m.get('setting', '')}".strip()
    return " ".join(str(key[k]) for k in ("kind", "rotation") if k in key) or "?"


def _log_cache(hit: bool, name: str, label: str) -> None:
    """One stderr line per cache look-up: ``[rcp_lib cache] hit ppl-<hash> (RCP W2A4KV4)``."""
    import sys

    print(f"[rcp_lib cache] {'hit' if hit else 'miss'} {name} ({label})" + ("" if hit else " computing"),
          file=sys.stderr, flush=True)


def _cached(kind: str, key: dict, compute) -> dict:
    """Row cache: ``cache_dir()/rows/<kind>-<hash of key>.json``; ``compute()`` runs on a miss."""
    name = f"{kind}-{config_hash(key)}"
    path = cache_dir() / "rows" / f"{name}.json"
    if path.exists():
        _log_cache(True, name, _cache_label(key))
        return json.loads(path.read_text())
    _log_cache(False, name, _cache_label(key))
    row = compute()
    atomic_write_json(row, path)
    return row


def _qat_key(method: Method, profile: Profile) -> str:
    """Cache key of a trained student: what determines the weights (not the evaluation settings)."""
    return config_hash({"method": method.to_dict(), "model": profile.model, "corpus": profile.corpus,
                        "w_group_size": profile.w_group_size, "qat": qat_config(profile).to_dict(),
                        "code": _code(), "kind": "qat-student"})


def method_config(method: Method, profile: Profile) -> dict:
    q = method.quant_config(profile)
    r = method.rotation_config(profile)
    return {"method": method.name, "setting": method.setting, "family": method.family,
            "rotation": r.to_dict() if r else None, "quant": q.to_dict() if q else None,
            "ptq": method.ptq, "qat": qat_config(profile).to_dict() if method.qat else None}


def _window_note(idx: list[int], n_total: int) -> str:
    """Compact description of the scored windows, e.g. ``"32 of 235: every 7.3th from 0 (0, 7, 14, ...)"``."""
    if idx == list(range(n_total)):
        return f"all {n_total}"
    if idx == list(range(len(idx))):
        return f"first {len(idx)} of {n_total}"
    return f"{len(idx)} of {n_total} evenly spread: floor(i*{n_total}/{len(idx)})"


def ppl_row(method: Method, profile: Profile, progress: bool = True) -> dict:
    """Perplexity row for a method (cached). Records which windows of the test split were scored."""

    def compute():
        t0 = time.time()
        model = build(method, profile, progress=progress)
        build_s = time.time() - t0
        test = tokens(profile, "test")
        r = perplexity_details(model, test, seqlen=profile.seqlen, max_windows=profile.eval_windows,
                               progress=progress, spread=profile.eval_spread)
        rot = method.rotation_config(profile)
        return {"method": method.name, "setting": method.setting, "family": method.family, "ppl": r.ppl,
                "model": profile.model, "model_note": describe(profile.model), "corpus": profile.corpus,
                "split": "test", "seqlen": profile.seqlen, "windows": r.windows, "tokens_scored": r.tokens_scored,
                "windows_note": _window_note(r.window_indices, test.numel() // profile.seqlen),
                "window_indices": r.window_indices,
                "seed": profile.seed, "rotation_seed": rot.seed if rot is not None else None,
                "r1_block": rot.r1_block if rot is not None else None,
                "build_seconds": round(build_s, 1), "eval_seconds": round(r.seconds, 1),
                "config": method_config(method, profile), **provenance()}

    return _cached("ppl", _row_key(method, profile), compute)


def full_split_table(profile: Profile, progress: bool = True) -> list[dict]:
    """Rows of ``profile.full_eval_methods`` (first setting) scored on every window of the test split (cached).

    The same trained / calibrated models as the main table (their caches are shared); only the evaluation differs.
    """
    from dataclasses import replace as _replace

    full = _replace(profile, eval_windows=None)
    keep = set(profile.full_eval_methods)
    s = profile.settings[0]
    return [ppl_row(m, full, progress=progress) for m in all_methods(profile)
            if m.name in keep and m.setting in (s, "FP")]


def results_dir(profile: Profile) -> Path:
    return REPO / "results" / profile.name


def figures_dir(profile: Profile) -> Path:
    d = REPO / "figures" / profile.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_rows(rows: list[dict], profile: Profile, name: str) -> Path:
    """Write result rows atomically to ``results/<profile>/<name>.csv``.

    Raises :class:`rcp_lib.io.DirtyTreeError` when code or configs have uncommitted changes, unless dirty runs
    are allowed (``--allow-dirty`` / ``RCP_ALLOW_DIRTY=1``).
    """
    from .io import require_clean_tree

    require_clean_tree()
    return atomic_write_csv(rows, results_dir(profile) / f"{name}.csv")


# ---------------------------------------------------------------------------------------------------
# tables used by the notebooks
# ---------------------------------------------------------------------------------------------------


def all_methods(profile: Profile) -> list[Method]:
    ms = ptq_methods(profile.settings) + qat_methods(profile.settings)
    return ms if profile.methods is None else [m for m in ms if m.name in profile.methods]


def ppl_table(profile: Profile, progress: bool = True, families: tuple[str, ...] = ("baseline", "ptq", "qat")) -> list[dict]:
    """Perplexity rows: FP, the PTQ baselines and the QAT rows for every setting of the profile.

    ``families`` selects a part of the table (e.g. ``("baseline", "ptq")`` for the PTQ table alone).
    """
    from tqdm.auto import tqdm

    methods = [m for m in all_methods(profile) if m.family in families]
    rows = []
    for m in tqdm(methods, desc="methods", unit="row", disable=not progress):
        rows.append(ppl_row(m, profile, progress=progress))
    return rows


def qat_curves(profile: Profile) -> dict[str, list[dict]]:
    """Training histories of the QAT rows (``"RCP W2A4KV4"`` -> list of {step, loss, ...})."""
    return {f"{m.name} {m.setting}": qat_history(m, profile) for m in all_methods(profile) if m.qat}


def zero_shot_methods(profile: Profile) -> list[Method]:
    """The rows of the zero-shot table: FP, the PTQ baselines and RCP / RCP+GSR at the first setting."""
    s = profile.settings[0]
    keep = {"FP", "RTN", "QuaRot-RTN", "QuaRot-GPTQ", "GSR-GPTQ", "RCP", "RCP+GSR"}
    return [m for m in all_methods(profile) if m.name in keep and m.setting in (s, "FP")]


def zero_shot_table(profile: Profile, progress: bool = True) -> list[dict]:
    """Zero-shot rows (lm-evaluation-harness) for :func:`zero_shot_methods` (cached per method)."""
    from .evaluation.zero_shot import zero_shot

    rows: list[dict] = []
    for m in zero_shot_methods(profile):
        key = {**_row_key(m, profile), "tasks": profile.zero_shot_tasks, "limit": profile.zero_shot_limit}

        def compute(m=m):
            model = build(m, profile, progress=progress)
            df = zero_shot(model, base_model(profile)[1], tasks=profile.zero_shot_tasks,
                           limit=profile.zero_shot_limit, config=method_config(m, profile), seed=profile.seed)
            recs = df.to_dict("records")
            prov = provenance()
            return {"rows": [{"method": m.name, "setting": m.setting, "model": profile.model, **r, **prov} for r in recs]}

        rows += _cached("zeroshot", key, compute)["rows"]
    return rows


def chance_level(task: str) -> float | None:
    """Random-guess accuracy of a multiple-choice task (None for generation/loglikelihood tasks)."""
    return {"wiki_nextsent": 0.25, "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "piqa": 0.5,
            "winogrande": 0.5, "boolq": 0.5}.get(task)


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------

# Published architecture sizes (config facts; no weights needed).
REFERENCE_CONFIGS = {
    "LLaMA-2-7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, head_dim=128, vocab_size=32000, tie_word_embeddings=False),
    "LLaMA-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "LLaMA-3.2-3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True),
}


def _memory_configs(profile: Profile) -> dict[str, dict]:
    from .models import dims

    cfgs = dict(REFERENCE_CONFIGS)
    d = dims(base_model(profile)[0])
    cfgs[profile.model] = dict(hidden_size=d.hidden, intermediate_size=d.intermediate, num_hidden_layers=d.n_layers,
                               num_attention_heads=d.n_heads, num_key_value_heads=d.n_kv_heads, head_dim=d.head_dim,
                               vocab_size=d.vocab, tie_word_embeddings=d.tied)
    return cfgs


def memory_table(profile: Profile, seq_len: int = 2048) -> list[dict]:
    """Footprints (FP16, W2A4KV4, W4A4KV4, W2A16KV16) of the reference models and the profile's model.

    Quantized rows count ``lm_head`` separately even for tied models (rotation needs untied embeddings);
    the FP16 row keeps the published tying. Ratios are FP16 bytes / scheme bytes.
    """
    from dataclasses import replace as _replace

    from .memory import PRESETS, footprint

    rows = []
    for name, cfg in _memory_configs(profile).items():
        gs = 128 if cfg["hidden_size"] % 128 == 0 and cfg["intermediate_size"] % 128 == 0 else 64
        fp = footprint(cfg, "FP16", seq_len=seq_len)
        for sname in ("FP16", "W2A4KV4", "W4A4KV4", "W2A16KV16"):
            scheme = PRESETS[sname] if sname == "FP16" else _replace(PRESETS[sname], group_size=gs, kv_group_size=cfg["head_dim"])
            c = cfg if sname == "FP16" else {**cfg, "tie_word_embeddings": False}
            f = footprint(c, scheme, seq_len=seq_len)
            rows.append({"model": name, "scheme": sname, "group_size": gs if sname != "FP16" else None,
                         "kv_seq_len": seq_len, "weights_gb": f.weights / 1e9, "kv_gb": f.kv_cache / 1e9,
                         "total_gb": f.total / 1e9, "weight_ratio_vs_fp16": fp.weights / f.weights,
                         "total_ratio_vs_fp16": fp.total / f.total, "weights_bytes": f.weights,
                         "kv_bytes": f.kv_cache, "quant_metadata_bytes": f.quant_metadata,
                         "paper_claim": "5.29x (LLaMA-2-7B W2A4KV4, RCP abstract)" if (name, sname) == ("LLaMA-2-7B", "W2A4KV4") else ""})
    return rows


def kv_curve(profile: Profile) -> "pd.DataFrame":
    import pandas as pd

    from .memory import PRESETS, footprint

    rows = []
    for name in ("LLaMA-2-7B", "LLaMA-3.2-1B"):
        cfg = REFERENCE_CONFIGS[name]
        for sname in ("FP16", "W2A4KV4"):
            for s in [2 ** k for k in range(7, 16)]:
                from dataclasses import replace as _replace

                scheme = PRESETS[sname] if sname == "FP16" else _replace(PRESETS[sname], kv_group_size=cfg["head_dim"])
                rows.append({"model": name, "scheme": sname, "seq_len": s,
                             "kv_gb": footprint(cfg, scheme, seq_len=s).kv_cache / 1e9})
    return pd.DataFrame(rows)


def memory_vs_saved(profile: Profile) -> dict:
    """Accountant vs bytes on disk for the profile's model exported with ``save_quantized`` (W2A4KV4)."""
    import tempfile
    from dataclasses import replace as _replace

    from .memory import PRESETS, footprint
    from .packing import packed_model_bytes, save_quantized

    m = Method("QuaRot-RTN", "W2A4KV4", QUAROT, RTN_Q, "rtn", family="ptq")  # the same recipe as the table row
    model = build(m, profile, progress=False)
    cfg = {**_memory_configs(profile)[profile.model], "tie_word_embeddings": False}
    scheme = _replace(PRESETS["W2A4KV4"], group_size=profile.w_group_size, kv_group_size=cfg["head_dim"])
    f = footprint(cfg, scheme)
    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, d)
        disk = packed_model_bytes(d)
    block_acc = sum(v for k, v in f.per_kind.items() if k.startswith(("attn_", "mlp_")))
    return {"model": profile.model, "scheme": "W2A4KV4", "group_size": profile.w_group_size,
            "accountant_block_bytes": block_acc, "disk_block_bytes": disk.get("block_linears"),
            "accountant_weight_bytes": f.weights, "disk_total_bytes": disk.get("total"),
            "block_rel_diff": abs(disk.get("block_linears", 0) - block_acc) / block_acc,
            "total_rel_diff": abs(disk.get("total", 0) - f.weights) / f.weights, **provenance()}


# ---------------------------------------------------------------------------------------------------
# kernel
# ---------------------------------------------------------------------------------------------------


def kernel_correctness(profile: Profile, interpret: bool = True) -> list[dict]:
    """W2A4 op vs a float64 dense product of the dequantized operands, on random and on real exported weights.

    Backends: the torch reference always; the Triton kernel on CUDA, or under ``TRITON_INTERPRET=1`` on CPU
    (small shapes only: the interpreter is slow).
    """
    import os

    from .kernels import dequantize_activation, pack_codes, quantize_activation_a4, triton_available, w2a4_gemv
    from .kernels.packing import dequantize

    cases = []
    g = torch.Generator().manual_seed(profile.seed)
    for (B, N, K, G) in ((1, 33, 200, 40), (3, 17, 72, 8)):
        codes = torch.randint(0, 4, (N, K), generator=g, dtype=torch.uint8)
        lut = torch.sort(torch.randn(N, -(-K // G), 4, generator=g), dim=-1).values.half()
        cases.append((f"random {N}x{K} g{G}", B, codes, lut, G))
    # a real layer of the profile's model, quantized to 2 bits with a Lloyd-initialised LDP grid and exported
    fp, _ = base_model(profile)
    layer = copy.deepcopy(fp.model.layers[0].self_attn.k_proj)
    holder = nn.Module()
    holder.lin = layer
    from .quant.linear import QuantLinear
    from .quant.quantizers import WeightQuantConfig

    q = QuantLinear.from_linear(layer, WeightQuantConfig(bits=2, group_size=profile.w_group_size, method="ldp", lwc=False,
                                                         ldp_init="lloyd"))
    codes, levels = q.export()
    cases.append((f"real {profile.model} layer0.k_proj {codes.shape[0]}x{codes.shape[1]}", 1, codes, levels.half(),
                  profile.w_group_size))
    rows = []
    use_triton = triton_available() and (torch.cuda.is_available() or interpret)
    for name, B, codes, lut, G in cases:
        N, K = codes.shape
        x = torch.randn(B, K, generator=g)
        xc, xs, xz = quantize_activation_a4(x)
        packed = pack_codes(codes)
        ref = dequantize_activation(xc, xs, xz).double() @ dequantize(packed, lut, K, G).double().T
        backends = ["torch"] + (["triton"] if use_triton else [])
        for be in backends:
            small = N * K <= 20_000
            if be == "triton" and not torch.cuda.is_available() and not small:
                continue  # the interpreter is too slow for big shapes
            if be == "triton" and not torch.cuda.is_available():
                os.environ["TRITON_INTERPRET"] = "1"
            dev = "cuda" if (be == "triton" and torch.cuda.is_available()) else "cpu"
            y = w2a4_gemv(xc.to(dev), xs.to(dev), xz.to(dev), packed.to(dev), lut.to(dev), K, G, backend=be).cpu()
            rel = ((y.double() - ref).norm() / ref.norm()).item()
            rows.append({"case": name, "backend": be + ("" if dev == "cuda" or be == "torch" else " (TRITON_INTERPRET)"),
                         "B": B, "N": N, "K": K, "G": G, "rel_err_vs_float64": rel, "ok": rel < 1e-3})
    return rows


def kernel_speed_table():
    """``results/kernel_speed.csv`` written by ``benchmarks/bench_kernel.py`` on a GPU, or None."""
    import pandas as pd

    p = REPO / "results" / "kernel_speed.csv"
    return pd.read_csv(p) if p.exists() else None


# ---------------------------------------------------------------------------------------------------
# rotation impact
# ---------------------------------------------------------------------------------------------------


def _parse_rotation(name: str) -> tuple[str, int | None, int | None]:
    """An analysis rotation spec ``kind[:block][/g<group>]`` -> (kind, block, group size).

    ``"hadamard"`` -> ("hadamard", None, None); ``"gsr:16"`` -> ("gsr", 16, None); ``"gsr:64/g16"`` ->
    ("gsr", 64, 16): Walsh blocks of 64 quantized in groups of 16 (a block larger than the group, where the
    sequency order inside a block can matter). None means: the block kinds use the group size as block, and the
    group size is the profile's ``w_group_size``.
    """
    spec, _, group = name.partition("/")
    kind, _, block = spec.partition(":")
    if group and not group.startswith("g"):
        raise ValueError(f"bad rotation spec {name!r}: expected kind[:block][/g<group>], e.g. 'gsr:64/g16'")
    try:
        return kind, int(block) if block else None, int(group[1:]) if group else None
    except ValueError:
        raise ValueError(f"bad rotation spec {name!r}: expected kind[:block][/g<group>], e.g. 'gsr:64/g16'") from None


def _rotation_setting(name: str, profile: Profile) -> tuple[str, int | None, int]:
    """(kind, block, group size) that an analysis rotation spec means under ``profile``."""
    from .rotation.fuse import BLOCK_KINDS

    kind, block, group = _parse_rotation(name)
    group = group or profile.w_group_size
    return kind, (block or group) if kind in BLOCK_KINDS else block, group


def rotation_analysis(profile: Profile, progress: bool = True) -> "pd.DataFrame":
    """Per-layer weight statistics for each rotation in ``profile.analysis_rotations`` (cached per rotation)."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .rotation.analysis import CLIP_RATIOS, SEARCH, layer_statistics

    frames = []
    for name in tqdm(profile.analysis_rotations, desc="rotations", disable=not progress):
        kind, block, group = _rotation_setting(name, profile)
        key = {"kind": "rotation-analysis", "model": profile.model, "rotation": name, "layers": profile.analysis_layers,
               "group_size": profile.w_group_size, "seed": profile.seed, "code": _code()}

        # what determines a row beyond the spec string: the block and group it resolves to, the search settings
        key["setting"] = {"kind": kind, "block": block, "group_size": group, "search": SEARCH,
                          "ratios": [CLIP_RATIOS[0], CLIP_RATIOS[-1], len(CLIP_RATIOS)]}

        def compute(kind=kind, block=block, group=group, name=name):
            df = layer_statistics(base_model(profile)[0], kind, block=block, seed=profile.seed,
                                  group_size=group, bits=2, layers=profile.analysis_layers)
            df["rotation"] = name
            return {"rows": df.to_dict("records")}

        frames.append(pd.DataFrame(_cached("rotation", key, compute)["rows"]))
    df = pd.concat(frames, ignore_index=True)
    df["model"] = profile.model
    return df


def summarize_rotation(df: "pd.DataFrame", by: tuple[str, ...] = ("rotation",)) -> "pd.DataFrame":
    """Means per rotation (or per ``by``) with the range/shape ratios (see :func:`rcp_lib.rotation.analysis.summarize`)."""
    from .rotation.analysis import summarize

    return summarize(df, by)


def rotation_example(profile: Profile, layer: int = 0, proj: str = "q_proj", group: int = 0) -> dict:
    """One weight group of a real layer before/after each rotation, with its 2-bit levels: uniform min-max,
    uniform with the MSE-optimal clip, pinned-end non-uniform (LDP-representable) and Lloyd-Max."""
    from .models import dims, input_norm, layer_linears
    from .rotation import analysis as A

    model = base_model(profile)[0]
    lay = model.model.layers[layer]
    W = layer_linears(lay)[f"self_attn.{proj}"].weight.detach().double() * input_norm(lay).weight.detach().double()[None, :]
    out = {}
    for name in profile.analysis_rotations:
        kind, block, gs = _rotation_setting(name, profile)
        R1, _ = A.analysis_r1(kind, dims(model).hidden, block, gs, profile.seed)
        Wr = A.rotated_weight(W, rot_in=R1)
        row = Wr[: max(1, 4096 // gs)].reshape(-1, gs)  # a few rows' worth of groups for the histogram
        g = Wr.reshape(-1, gs)[group : group + 1]
        lv = A.group_levels(g, 2)
        out[name] = {"name": f"{profile.model} layer {layer} {proj}", "group_size": gs, "weights": row.flatten().numpy(),
                     "kurtosis": A.kurtosis(Wr), **{f"{k}_levels": v[0].tolist() for k, v in lv.items()}}
    return out
