"""The saved form of a quantized model: the frozen-state tensors, ``save_quantized`` / ``check_folder`` /
``load_quantized``, and :func:`deploy`, which turns a fake-quant model into the deployed layers in memory. The deployed
layer itself, :class:`~rcp_lib.kernels.packed_linear.PackedLinear`, lives beside the kernels.

Lifecycle (one path for QAT students, GPTQ and RTN): a model prepared by ``rotate_model`` + ``quantize_model`` is
trained or calibrated, its layers end frozen (:meth:`rcp_lib.quant.linear.QuantLinear.freeze`: codes + level
table), :func:`quantized_state_dict` turns that state into named tensors (the one tensor format: the packed folder
stores it, the PTQ cache stores its projection part through :func:`save_quantized_state`), and loading re-runs the
same surgery on a meta skeleton built from the config (``rotate_model(..., fuse_weights=False)`` then
``quantize_model`` with a layer factory that builds empty :class:`PackedLinear` layers, optimum-quanto's
``requantize`` pattern) and loads the stored tensors into them. The PTQ cache instead freezes fake-quant layers to
stored codes (:func:`load_quantized_state_dict`); :func:`deploy` turns a fake-quant model into the same
:class:`PackedLinear` layers in memory.

Folder layout (format version :data:`FORMAT_VERSION`), a Hugging Face model folder:

* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json`` above
  ``max_shard_size``) — :func:`quantized_state_dict`: for every quantized projection ``<name>``: ``<name>.qweight``
  (int32 ``[N, ceil(K/16)]``, 2-bit codes packed 16 per word along K, the layout of :mod:`rcp_lib.kernels.bitpack`),
  ``<name>.lut`` (``[N, K/G, 2^bits]`` level table per group: float32 when the storage ``dtype`` is float32, else
  fp16) and ``<name>.bias`` if any; projections kept in full precision as ``<name>.weight``; every other tensor
  (embedding, lm_head, norms) in ``dtype`` (by default the model's compute dtype: the folder holds what was
  evaluated; ``dtype=torch.float16`` is the smaller opt-in). The names are the state dict of the deployed model.
* ``config.json`` — the transformers config (``model_type`` ``rcp_<family>`` of :mod:`rcp_lib.deploy.hf`, untied embeddings, ``dtype`` = the model's compute dtype) with
  ``quantization_config = {"quant_method": "rcp", "format_version", "storage_dtype", "rotation", "quant"}`` (the
  :class:`~rcp_lib.recipe.Recipe`'s rotation and quant dicts: what the loader re-runs) and ``auto_map`` to the shim.
* ``quant_map.json`` — the manifest: the format version, one entry per projection (bits, group size, N, K,
  activation bits and clip ratio, online R4: checked against the rebuilt skeleton), the name, shape, dtype and file
  of every tensor, the SHA-256 of every safetensors file and of ``config.json``'s ``quantization_config``
  (``quantization_config_sha256``; the rest of ``config.json`` is transformers' and not checked), and optionally
  ``source``: what the model was built from (method / run, commit, code fingerprint, CPU).
* ``modeling_rcp.py`` — the loader shim for ``trust_remote_code=True`` (imports rcp_lib, which registers the quantizer).
* ``generation_config.json``, and the tokenizer files if a tokenizer is given.

:func:`check_folder` checks the format version, the checksums, every shard's presence and that the tensors match the
manifest; :func:`install_packed_layers` re-runs the surgery on a meta skeleton and checks it against the manifest
(anything else raises :class:`PackedFormatError`); the "rcp" transformers quantizer (:mod:`rcp_lib.deploy.hf`) runs both
inside ``AutoModelForCausalLM.from_pretrained``, and :func:`load_quantized` calls that.

:class:`PackedLinear` is the one deployed form of a :class:`rcp_lib.quant.linear.QuantLinear`
(:meth:`PackedLinear.from_quant_linear`): packed codes + LUT, per-token A4 input quantization, the W2A4 op of
:mod:`rcp_lib.kernels` (torch reference on CPU, Triton on CUDA). It quantizes its input with the activation fake
quantizer's own formula (:func:`rcp_lib.quant.activations.quantize_per_token`), so a trained layer and its deployed
form agree to float rounding (with a float32 LUT, the default for a float32 model; an fp16 LUT adds the fp16 rounding
of the levels, which A4 turns into activation-code flips).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import models as M
from ..io import atomic_save_safetensors
from ..kernels import SUPPORTED_BITS, pack_codes, unpack_codes
from ..kernels.packed_linear import (GatedMLP, PackedLinear, SharedInputLinear, SharedInputSlice, _fusable_hadamard,
                                     check_gemv_format, clear_shared_inputs, deploy_bits)
from ..quant.linear import QuantLinear
from ..rotation.online import OnlineHadamard

if TYPE_CHECKING:
    from ..quant.apply import QuantConfig
    from ..rotation.fuse import RotationConfig

# Version 1: model.safetensors + quant_map.json holding the configs and one checksum (no config.json).
# Version 2: a Hugging Face model folder (config.json with quantization_config, sharded safetensors + index, tokenizer,
# generation config, loader shim); quant_map.json is the manifest (layers, tensors, one checksum per file).
# Version 3: version 2 with config.json's model_type "rcp_<family>" (rcp_lib.deploy.hf), so that transformers without rcp_lib
# refuses the folder instead of loading random weights. Version 2 folders are still read (same tensors).
FORMAT_VERSION = 3
READ_VERSIONS = (2, 3)
QUANT_METHOD = "rcp"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAP = "quant_map.json"


class PackedFormatError(ValueError):
    """A packed-model folder that does not match what this version reads (version, checksum, tensors)."""


def check_format_version(version: object, where: str) -> None:
    """PackedFormatError unless ``version`` (read from ``where``) is one of :data:`READ_VERSIONS`; the message says
    what to do: upgrade rcp_lib for a folder from a newer writer, re-export a folder from an older one."""
    if version in READ_VERSIONS:
        return
    if isinstance(version, int) and version > FORMAT_VERSION:
        todo = "it was written by a newer rcp_lib: upgrade rcp_lib to load it"
    else:
        todo = "re-export the model with this rcp_lib (python -m rcp_lib export)"
    raise PackedFormatError(f"packed format version {version!r} in {where}; this rcp_lib ({FORMAT_VERSION}) reads "
                            f"versions {', '.join(map(str, READ_VERSIONS))}: {todo}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _quantized_projections(model: nn.Module) -> dict[str, "QuantLinear | PackedLinear"]:
    out = {}
    for i, layer in enumerate(M.decoder_layers(model)):
        if isinstance(M.mlp(layer), GatedMLP):
            raise ValueError(f"model.layers.{i}.mlp is a fused GatedMLP (fuse_gated_mlps): a deploy-time layout that "
                             f"is not saved; save the model before fusing it")
    for name, mod in M.named_block_linears(model):
        if isinstance(mod, SharedInputSlice):
            raise ValueError(f"{name} is merged with the projections that share its input (merge_shared_inputs): a "
                             f"deploy-time layout that is not saved; save the model before merging it")
        if not isinstance(mod, (QuantLinear, PackedLinear)):
            raise ValueError(f"{name} is not a QuantLinear: save_quantized needs a model prepared by quantize_model")
        out[name] = mod
    return out


def _storage_bits(levels: int) -> int:
    """Code width a level table of ``levels`` entries is packed at: the smallest of
    :data:`rcp_lib.kernels.bitpack.SUPPORTED_BITS` holding ``ceil(log2(levels))`` bits (3-bit codes go in 4-bit
    slots; only the widths the W2A4 op runs, ``2**bits == levels``, can be deployed)."""
    need = max(1, math.ceil(math.log2(levels)))
    fits = [b for b in SUPPORTED_BITS if b >= need]
    if not fits:
        raise NotImplementedError(f"{levels} levels need {need} bits; packing supports {SUPPORTED_BITS}")
    return fits[0]


def _layer_entry(name: str, q: QuantLinear) -> dict:
    """The map entry of one projection (what the surgery decides: sizes, bits, group, activation quantizer, R4)."""
    transform = q.input_transform
    if transform is not None and not isinstance(transform, OnlineHadamard):
        raise ValueError(f"{name}: cannot export an input transform of type {type(transform).__name__}")
    entry = {"N": q.out_features, "K": q.in_features, "act_bits": q.act_bits, "act_clip_ratio": q.act_clip_ratio,
             "bias": q.bias is not None,
             "r4": None if transform is None else {"n": transform.n, "block": transform.block}}
    if isinstance(q, PackedLinear):
        entry.update(bits=q.bits, group_size=q.group_size)
        return entry
    wq = q.weight_quantizer
    if wq is None:
        entry.update(bits=16, group_size=None)
    else:
        entry.update(bits=wq.config.bits if wq.config is not None else wq.bits, group_size=wq.group_size)
    return entry


@torch.no_grad()
def quantized_state_dict(model: nn.Module, dtype: torch.dtype = torch.float16,
                         projections_only: bool = False) -> dict[str, torch.Tensor]:
    """The frozen state of a quantized model as named CPU tensors: the one tensor format of a saved quantized model.

    For every block projection ``<name>`` with a weight quantizer (learnable or frozen: its ``export()``, i.e. what
    :meth:`~rcp_lib.quant.linear.QuantLinear.freeze` would hold): ``<name>.qweight`` int32
    ``[N, ceil(K / (32 // b))]`` (codes packed at ``b = _storage_bits(L)``, 2 for W2) and ``<name>.lut``
    ``[N, K/G, L]`` (fp16, or float32 when ``dtype`` is float32). Unless ``projections_only``, also
    ``<name>.bias``, ``<name>.weight`` of projections without weight quantizer, and every other tensor of the
    state dict (embedding, lm_head, norms) in ``dtype``.

    Args:
        model: prepared with ``quantize_model``.
        dtype: storage dtype of the float tensors (fp16 default; float32 for bit-exact round trips).
        projections_only: only the codes and level tables (the PTQ cache: the rest is rebuilt).
    """
    projs = _quantized_projections(model)
    lut_dtype = torch.float32 if dtype == torch.float32 else torch.float16
    tensors: dict[str, torch.Tensor] = {}
    for name, q in projs.items():
        if isinstance(q, PackedLinear):  # a deployed or loaded model: its stored form as it is
            tensors[f"{name}.qweight"] = q.qweight.detach().contiguous().cpu()
            tensors[f"{name}.lut"] = q.lut.detach().to(lut_dtype).contiguous().cpu()
        elif q.weight_quantizer is not None:
            codes, levels = q.export()  # uint8 [N, K], float32 [N, K/G, L]
            tensors[f"{name}.qweight"] = pack_codes(codes, _storage_bits(levels.shape[-1])).contiguous().cpu()
            tensors[f"{name}.lut"] = levels.to(lut_dtype).contiguous().cpu()
        elif not projections_only:
            tensors[f"{name}.weight"] = q.weight.detach().to(dtype).contiguous().cpu()
        if q.bias is not None and not projections_only:
            tensors[f"{name}.bias"] = q.bias.detach().to(dtype).contiguous().cpu()
    if not projections_only:
        prefixes = tuple(n + "." for n in projs)
        for key, t in model.state_dict().items():
            if not key.startswith(prefixes):
                tensors[key] = t.detach().to(dtype).contiguous().cpu()
    return tensors


@torch.no_grad()
def load_quantized_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor],
                              projections_only: bool = False) -> nn.Module:
    """Inverse of :func:`quantized_state_dict`, in place, on a model prepared by the same surgery
    (``rotate_model`` + ``quantize_model``): every projection with a weight quantizer is frozen to the stored codes
    and levels (:meth:`~rcp_lib.quant.linear.QuantLinear.freeze`); unless ``projections_only`` every other tensor is
    loaded too, strictly. Returns the model.

    Raises:
        PackedFormatError: a projection without stored codes, a level table that does not fit its layer, missing
            or unexpected tensors.
    """
    projs = _quantized_projections(model)
    used: set[str] = set()
    for name, q in projs.items():
        if getattr(q, "weight_quantizer", None) is None:
            continue
        qk, lk = f"{name}.qweight", f"{name}.lut"
        if qk not in tensors or lk not in tensors:
            raise PackedFormatError(f"{name}: no stored codes and levels ({qk}, {lk})")
        lut = tensors[lk]
        if lut.dim() != 3 or lut.shape[0] != q.out_features or lut.shape[1] * q.weight_quantizer.group_size != q.in_features:
            raise PackedFormatError(f"{lk}: shape {tuple(lut.shape)} does not fit the layer ({q.out_features}, "
                                    f"{q.in_features}) with group size {q.weight_quantizer.group_size}")
        try:
            codes = unpack_codes(tensors[qk], q.in_features, _storage_bits(lut.shape[-1]))
        except (TypeError, ValueError) as e:
            raise PackedFormatError(f"{qk}: {e}") from e
        q.freeze(codes, lut.float())
        used |= {qk, lk}
    if not projections_only:
        rest = {k: v for k, v in tensors.items() if k not in used}
        missing, unexpected = model.load_state_dict(rest, strict=False)
        # not stored: the latent weight and the quantizer buffers of the frozen projections (rebuilt by freeze)
        frozen = tuple(f"{n}.{k}" for n, q in projs.items() if q.weight_quantizer is not None
                       for k in ("weight", "weight_quantizer."))
        missing = [k for k in missing if not k.startswith(frozen)]
        if missing or unexpected:
            raise PackedFormatError(f"the model needs {missing[:5]} / does not take {unexpected[:5]}")
    return model


def save_quantized_state(model: nn.Module, path: str | os.PathLike) -> Path:
    """The frozen codes + level tables of a quantized model's projections (:func:`quantized_state_dict` with
    ``projections_only``, float32 levels: bit-exact) as one safetensors file, written atomically (the PTQ cache)."""
    return atomic_save_safetensors(quantized_state_dict(model, torch.float32, projections_only=True), path)


def load_quantized_state(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Freeze the projections of a model prepared by the same surgery to a file of :func:`save_quantized_state`."""
    from safetensors.torch import load_file

    return load_quantized_state_dict(model, load_file(str(path)), projections_only=True)


def _max_shard_bytes(size: int | str) -> int:
    """Bytes of a shard size: an integer, or a number with a unit (``"2GB"``, ``"500MB"``, ``"1.5GiB"``, ``"64KB"``);
    also the ``type`` of the CLI's ``--max-shard-size`` (checked when the line is parsed, before any model is built).

    Raises:
        ValueError: not a positive size of that form (the message names the accepted forms).
    """
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
        s = str(size).strip().upper()
        unit = next((u for u in sorted(m, key=len, reverse=True) if s.endswith(u)), "")
        try:
            n = int(float(s[: len(s) - len(unit)].strip()) * m.get(unit, 1))
        except (ValueError, OverflowError):
            n = 0
    if n <= 0:
        raise ValueError(f"max shard size must be a positive number of bytes, optionally with a unit (B, KB, MB, GB, "
                         f"KiB, MiB, GiB), e.g. 2GB or 500MB; got {size!r}")
    return n


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Tensor names in sorted order, cut greedily into groups of at most ``max_bytes`` (a larger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for k in sorted(tensors):
        nb = tensors[k].numel() * tensors[k].element_size()
        if groups[-1] and size + nb > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nb
    return groups


SHIM = "modeling_rcp.py"
_SHIM_TEXT = '''"""Loader shim written by rcp_lib.deploy.save_quantized: lets a process that has not imported rcp_lib (the lm_eval
command line, a server) load this folder with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``.

config.json's model_type is {model_type!r}, which only rcp_lib defines: without rcp_lib (imported, or through this
file) transformers refuses the folder. Importing rcp_lib registers the "rcp" quantizer and the rcp_* model types; the
quantizer (config.json's quantization_config) builds the model on the meta device, re-runs rcp_lib's surgery and loads
the packed tensors. rcp_lib must be importable (pip install the rcp-companion repository, or put it on PYTHONPATH).
"""

from rcp_lib.hf import Rcp{config}, Rcp{base}  # noqa: F401  (importing rcp_lib registers them)
'''


def _hf_config_dict(model: nn.Module, qcfg: dict) -> dict:
    """The model's transformers config as written to ``config.json``: rcp_lib's own attributes replaced by
    ``quantization_config``, untied embeddings, the loader shim in ``auto_map``."""
    from ..families import family_of

    cfg = model.config.to_dict()
    for k in ("rcp_quant", "rcp_rotation", "quantization_config", "_attn_implementation", "_attn_implementation_internal",
              "auto_map", "_name_or_path", "name_or_path"):
        cfg.pop(k, None)
    fam = family_of(model)
    floats = [t.dtype for t in model.state_dict().values() if t.is_floating_point()]
    if floats:  # the dtype the model computes in (dtype="auto" of from_pretrained), not the storage dtype
        cfg["dtype"] = str(max(set(floats), key=floats.count)).replace("torch.", "")
    cfg.update(model_type=fam.packed_model_type, tie_word_embeddings=False,
               architectures=[f"Rcp{fam.causal_lm_class}"], quantization_config=qcfg,
               auto_map={"AutoConfig": f"{SHIM[:-3]}.Rcp{fam.config_class}",
                         "AutoModelForCausalLM": f"{SHIM[:-3]}.Rcp{fam.causal_lm_class}"})
    return cfg


def _is_packed_folder(path: Path) -> bool:
    """Whether ``path`` looks like a folder written by :func:`save_quantized`: ``config.json`` whose
    ``quantization_config.quant_method`` is "rcp", and ``quant_map.json`` (nothing else is read)."""
    cp = path / "config.json"
    try:
        qcfg = json.loads(cp.read_text()).get("quantization_config") if cp.is_file() else None
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qcfg, dict) and qcfg.get("quant_method") == QUANT_METHOD and (path / MAP).is_file()


#: the files :func:`save_quantized` writes besides the weight shards and the tokenizer's: with ``overwrite`` only a
#: folder holding nothing but these, shards and tokenizer files is replaced (:func:`check_output_folder`)
WRITER_FILES = frozenset({WEIGHTS, INDEX, MAP, "config.json", SHIM, "generation_config.json", "__pycache__",
                          "additional_chat_templates"})  # (a tokenizer's save_pretrained writes that folder)
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
#: the names a transformers tokenizer's ``save_pretrained`` writes
_TOKENIZER_FILE = re.compile(r"tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|merges\.txt"
                             r"|chat_template\.(jinja|json)|spiece\.model|sentencepiece\.bpe\.model")


def _foreign_entries(path: Path) -> list[str]:
    """The entries of the folder ``path`` that :func:`save_quantized` does not write (sorted names): what replacing the
    folder would delete besides an earlier export, e.g. ``.git`` or a user's results."""
    return sorted(e.name for e in path.iterdir()
                  if not (e.name in WRITER_FILES or _SHARD.fullmatch(e.name) or _TOKENIZER_FILE.fullmatch(e.name)))


def _config_digest(qcfg: dict) -> str:
    """sha256 of a ``quantization_config`` as canonical JSON (sorted keys): what :func:`check_folder` compares."""
    return hashlib.sha256(json.dumps(qcfg, sort_keys=True, default=str).encode()).hexdigest()


def packed_source(path: str | os.PathLike) -> dict | None:
    """What the packed folder ``path`` was built from (``quant_map.json``'s ``source``, :func:`save_quantized`); None
    when it records none (written before sources were recorded) or is not a packed folder."""
    try:
        src = json.loads((Path(path) / MAP).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    return src if isinstance(src, dict) else None


def check_replaces_run(path: str | os.PathLike, run: str | None) -> None:
    """FileExistsError when ``run`` is given and ``path`` holds a packed model whose ``source`` does not name that run
    (another run's export, an ``export --method`` folder, or one written before sources were recorded)."""
    path = Path(path)
    if run is None or not path.is_dir() or not any(path.iterdir()):
        return
    src = packed_source(path) or {}
    if src.get("run") != run:
        raise FileExistsError(f"{path} holds a packed model this run did not write (its source: "
                              f"{src.get('run') or src.get('method') or 'not recorded'}); nothing was changed: choose "
                              f"another export_dir, or delete that folder")


def check_output_folder(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that :func:`save_quantized` may write ``path``, before anything is built or written (the CLI's
    ``export`` calls it first). Allowed: a path that does not exist, an empty folder, and, with ``overwrite``, a
    packed folder that holds nothing else (:func:`save_quantized` replaces it whole). Nothing is changed here.
    Returns ``path`` made absolute (``"."`` is the current folder by its name, not an empty name).

    Raises:
        FileExistsError: ``path`` is a file or a link, or the root; a non-empty folder that is not a packed folder, or
            a packed folder that also holds entries the writer does not write (never replaced, whatever ``overwrite``
            says: they are named); a packed folder without ``overwrite``.
    """
    path = Path(os.path.abspath(os.path.expanduser(path)))  # "." and "a/.." get their names: replaced beside, not inside
    if path.is_symlink():
        raise FileExistsError(f"{path} exists and is not a folder (a link); nothing was changed")
    if not path.name:
        raise FileExistsError(f"{path} is the root of the file system: choose a folder for the model")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder (a file); nothing was changed")
    if not path.exists() or not any(path.iterdir()):
        return path
    if not _is_packed_folder(path):
        raise FileExistsError(f"{path} is not empty and holds files other than a packed model (no config.json with "
                              f"quantization_config.quant_method = {QUANT_METHOD!r} and {MAP}); nothing was changed: "
                              f"choose a new or empty folder")
    foreign = _foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(f"{path} holds a packed model and entries the export does not write ({shown}), which "
                              f"replacing it would delete; nothing was changed: move them, or choose another folder")
    if not overwrite:
        raise FileExistsError(f"{path} holds a packed model already; nothing was changed: pass --overwrite "
                              f"(overwrite=True) to replace it")
    return path


def _folder_mode(path: Path) -> int:
    """The permission bits ``path`` gets: those of the folder it replaces, else what a plain ``mkdir`` gives
    (``0o777`` less the umask), not the ``0o700`` of ``tempfile.mkdtemp``."""
    if path.is_dir():
        return path.stat().st_mode & 0o7777
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: the dtype holding the most elements among its floating-point parameters (among
    its floating-point state if it has no such parameter; float32 if none), so that many small quantizer parameters
    do not outvote the weights. :func:`save_quantized` stores in it by default."""
    count: dict[torch.dtype, int] = {}
    tensors = [p for p in model.parameters() if p.is_floating_point()] or \
        [t for t in model.state_dict().values() if t.is_floating_point()]
    for t in tensors:
        count[t.dtype] = count.get(t.dtype, 0) + t.numel()
    return max(count, key=count.get) if count else torch.float32


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None, dtype: torch.dtype | None = None,
                   overwrite: bool = False, max_shard_size: int | str = "2GB", source: dict | None = None,
                   replaces_run: str | None = None) -> Path:
    """Export a quantized model (after QAT, GPTQ or plain PTQ; frozen, or deployed / loaded) as a Hugging Face model
    folder (see module docstring) that ``AutoModelForCausalLM.from_pretrained`` loads after ``import rcp_lib`` (or with
    ``trust_remote_code=True`` in a process that has not imported it).

    Args:
        model: a model of a registered family prepared with ``quantize_model`` (and usually ``rotate_model``).
        path: output folder (written to a temporary folder, then renamed).
        tokenizer: saved next to the weights if given (lm_eval and the CLI need it).
        dtype: storage dtype of the non-quantized tensors and the LUTs. None (the default): the model's compute dtype
            (:func:`compute_dtype`; float32 for every CPU table row), so the folder holds exactly the levels and
            tensors that were evaluated and reloads to the same logits (float rounding). ``torch.float16`` is
            smaller (half the LUT and embedding bytes) but not bit-identical to the evaluated model: with A4 the fp16
            rounding of the levels flips activation codes downstream (on a tiny W2A4KV4 LLaMA, logits 0.15 relative
            from the evaluated model's, against 5e-7 with float32 storage; ``tests/test_packing_io.py``).
        overwrite: replace ``path`` if it is a packed folder (see :func:`check_output_folder`: a folder holding other
            files is never replaced; an empty folder is written into).
        max_shard_size: bytes (or "2GB", "500MB") per safetensors file; above it the tensors are sharded
            (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
        source: what the model was built from, recorded as ``quant_map.json``'s ``"source"`` (JSON values; the
            CLI's ``export`` writes the method / run, the commit, the code fingerprint and the CPU or GPU it was built
            on: :func:`rcp_lib.export.export_method`), so that a folder says which table row it can reproduce.
        replaces_run: with ``overwrite``, replace a packed folder only if its ``source`` names this run (the folder
            of a ``qat`` run: :func:`rcp_lib.run_config.run_qat`); checked again just before the swap, so another
            run that wrote the folder meanwhile is not overwritten.
    Returns:
        the folder (permissions: those of the folder it replaced, else ``0o777`` less the umask).
    Raises:
        NotImplementedError: a weight width the W2A4 op cannot run (e.g. 3 bits).
        FileExistsError: see :func:`check_output_folder` (checked before anything is written).
    """
    from safetensors.torch import save_file

    from ..recipe import Recipe

    if not getattr(model.config, "rcp_quant", None):
        raise ValueError("save_quantized needs a model prepared with quantize_model (config.rcp_quant is missing)")
    path = check_output_folder(path, overwrite)
    check_replaces_run(path, replaces_run)
    if dtype is None:
        dtype = compute_dtype(model)
    recipe = Recipe.from_dict({"rotation": getattr(model.config, "rcp_rotation", None), "quant": model.config.rcp_quant})
    layers = {name: _layer_entry(name, q) for name, q in _quantized_projections(model).items()}
    tensors = quantized_state_dict(model, dtype)
    for name, e in layers.items():
        if e["bits"] != 16:
            deploy_bits(tensors[f"{name}.lut"].shape[-1], name)
    storage = str(dtype).replace("torch.", "")
    qcfg = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "storage_dtype": storage,
            "rotation": recipe.to_dict()["rotation"], "quant": recipe.to_dict()["quant"]}
    groups = _shards(tensors, _max_shard_bytes(max_shard_size))
    names = [WEIGHTS] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        where: dict[str, str] = {}
        for fname, keys in zip(names, groups):
            save_file({k: tensors[k] for k in keys}, str(tmp / fname), metadata={"format": "pt"})
            where.update({k: fname for k in keys})
        if len(names) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": where}, indent=1,
                                                sort_keys=True))
        qmap = {
            "format_version": FORMAT_VERSION,
            "attn_implementation": "eager" if "eager" in (model.config._attn_implementation or "") else "sdpa",
            "storage_dtype": storage,
            "layers": layers,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "file": where[k]}
                        for k, v in tensors.items()},
            "files": {f: _sha256(tmp / f) for f in names},
            # config.json's quantization_config (rotation, quantizers, KV cache) is what rebuilds the layers: an edit
            # of it would load another model from the same tensors (check_folder compares)
            "quantization_config_sha256": _config_digest(qcfg),
            **({"source": source} if source else {}),
        }
        (tmp / MAP).write_text(json.dumps(qmap, indent=1, sort_keys=True, default=str))
        (tmp / "config.json").write_text(json.dumps(_hf_config_dict(model, qcfg), indent=2, sort_keys=True,
                                                    default=str) + "\n")
        from ..families import family_of

        fam = family_of(model)
        (tmp / SHIM).write_text(_SHIM_TEXT.format(base=fam.causal_lm_class, config=fam.config_class,
                                                  model_type=fam.packed_model_type))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        os.chmod(tmp, _folder_mode(path))
        check_output_folder(path, overwrite)  # again: the folder may have changed while the tensors were written
        check_replaces_run(path, replaces_run)
        _replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_folder(new: Path, path: Path) -> None:
    """Put the finished folder ``new`` at ``path`` (a sibling): an existing ``path`` is renamed aside first, restored
    if the rename of ``new`` fails, and deleted only once ``new`` is in place; so an interruption leaves the old
    folder or the new one at ``path``, never neither (at worst a hidden ``.NAME.old-*`` sibling to delete)."""
    if not path.exists():
        os.replace(new, path)
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{time.time_ns()}")
    try:
        here = os.getcwd() == str(path)
    except OSError:
        here = False
    os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        os.replace(old, path)
        raise
    if here:  # this process sat in the replaced folder: into the new one, not the deleted old one
        os.chdir(path)
        # a shell that started this process sat there too, and stays in the deleted old folder (it shows as empty)
        warnings.warn(f"{path} was replaced while it was the working directory: a shell that sat in it is now in the "
                      f"deleted old folder; cd into {path} again", stacklevel=3)
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        warnings.warn(f"{path} was replaced, but its old contents could not be deleted: remove {old}", stacklevel=3)


@dataclass
class PackedFolder:
    """What :func:`check_folder` read from a packed folder (nothing of the tensors but their headers).

    Attributes:
        path: the folder. rotation / quant: the rebuilt configs. storage_dtype: "float16" or "float32".
        manifest: ``quant_map.json`` (layers, tensors with shape / dtype / file, checksum per file).
    """

    path: Path
    rotation: "RotationConfig | None"
    quant: "QuantConfig"
    storage_dtype: str
    manifest: dict


def check_folder(path: str | os.PathLike) -> PackedFolder:
    """Check a packed folder without loading its tensors: ``config.json`` with an rcp ``quantization_config`` of this
    format version, configs this rcp_lib rebuilds, the manifest, every listed file present with its SHA-256, and the
    safetensors headers equal to the manifest (names, shapes, dtypes, files).

    Raises:
        PackedFormatError: a folder that is not an rcp_lib packed model, another format version, configs this version
            cannot rebuild, a missing shard, a checksum mismatch, tensors that do not match the manifest.
    """
    from safetensors import safe_open

    from ..quant.apply import QuantConfig
    from ..rotation.fuse import RotationConfig

    path = Path(path)
    cp = path / "config.json"
    try:
        qcfg = json.loads(cp.read_text()).get("quantization_config") if cp.is_file() else None
    except json.JSONDecodeError as e:
        raise PackedFormatError(f"{cp} is not valid JSON: {e}") from e
    if not cp.is_file() and (path / MAP).is_file():  # written before config.json existed (version 1)
        try:
            old = json.loads((path / MAP).read_text()).get("format_version")
        except (OSError, ValueError, AttributeError):
            old = None
        if old is not None:
            check_format_version(old, f"{path / MAP}")
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != QUANT_METHOD or not (path / MAP).is_file():
        raise PackedFormatError(f"{path} is not an rcp_lib packed model folder (needs config.json with "
                                f"quantization_config.quant_method = {QUANT_METHOD!r} and {MAP}; "
                                f"write one with rcp_lib.deploy.save_quantized)")
    try:
        qmap = json.loads((path / MAP).read_text())
    except json.JSONDecodeError as e:
        raise PackedFormatError(f"{path / MAP} is not valid JSON: {e}") from e
    for where, ver in (("config.json", qcfg.get("format_version")), (MAP, qmap.get("format_version"))):
        check_format_version(ver, f"{path / where}")
    digest = qmap.get("quantization_config_sha256")  # absent in folders written before it was recorded
    if digest is not None and digest != _config_digest(qcfg):
        raise PackedFormatError(f"{cp}: quantization_config differs from the one the folder was written with ({MAP} "
                                f"records its checksum): the tensors would be rebuilt into another model; restore the "
                                f"file or re-export the model")
    if qcfg.get("format_version") == 2:
        warnings.warn(f"{path} is a format-2 folder: rcp_lib loads it, but plain transformers (no `import rcp_lib`) "
                      f"loads its model_type as an unquantized model with random weights; re-export it (python -m "
                      f"rcp_lib export, or save_quantized of the loaded model) to write format {FORMAT_VERSION}",
                      stacklevel=2)
    try:
        rot = RotationConfig.from_dict(qcfg["rotation"]) if qcfg.get("rotation") else None
        quant = QuantConfig.from_dict(qcfg["quant"])
        if rot is not None:
            rot.validate()
        quant.validate()
    except (KeyError, TypeError, ValueError) as e:
        raise PackedFormatError(f"{path}: the stored rotation / quantization configs cannot be rebuilt by this "
                                f"rcp_lib ({e}); re-export the model with this version") from e
    files = qmap.get("files") or {}
    for fname, digest in files.items():
        fp = path / fname
        if not fp.is_file():
            raise PackedFormatError(f"{path}: missing shard {fname} (listed in {MAP})")
        got = _sha256(fp)
        if got != digest:
            raise PackedFormatError(f"{fp}: checksum mismatch (truncated or modified file): expected {digest}, "
                                    f"got {got}")
    want = qmap.get("tensors", {})
    stored: dict[str, tuple[list[int], str, str]] = {}
    for fname in files:
        try:
            with safe_open(str(path / fname), framework="pt") as f:
                for k in f.keys():
                    sl = f.get_slice(k)
                    stored[k] = (list(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), fname)
        except Exception as e:  # pragma: no cover - the checksum catches corruption first
            raise PackedFormatError(f"{path / fname} cannot be read: {e}") from e
    missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
    if missing or extra:
        raise PackedFormatError(f"{path}: tensors do not match {MAP}: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, meta in want.items():
        if stored[k] != (meta["shape"], meta["dtype"], meta["file"]):
            raise PackedFormatError(f"{k}: stored {stored[k]}, {MAP} says {meta['shape']} {meta['dtype']} in "
                                    f"{meta['file']}")
    return PackedFolder(path, rot, quant, qcfg.get("storage_dtype", "float16"), qmap)


_ST_DTYPES = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "F64": "float64", "I32": "int32",
              "I64": "int64", "I8": "int8", "U8": "uint8", "I16": "int16", "BOOL": "bool"}


def _packed_layer_factory(lut_dtype: torch.dtype):
    """The ``layer_factory`` of :func:`~rcp_lib.quant.apply.quantize_model` for loading: an empty
    :class:`PackedLinear` (buffers on the linear's device, usually meta) of the sizes the weight config gives, or a
    full-precision :class:`QuantLinear` when the weights are not quantized."""
    from ..quant.quantizers import resolve_group_size

    def make(linear: nn.Module, wcfg, act_bits: int | None = None, act_clip_ratio: float = 1.0,
             name: str = "layer") -> nn.Module:
        if wcfg is None:
            return QuantLinear.from_linear(linear, None, act_bits=act_bits, act_clip_ratio=act_clip_ratio, name=name)
        N, K = linear.weight.shape
        return PackedLinear.empty(N, K, resolve_group_size(K, wcfg.group_size, name), deploy_bits(2**wcfg.bits, name),
                                  getattr(linear, "bias", None) is not None, act_bits, act_clip_ratio,
                                  lut_dtype=lut_dtype, dtype=linear.weight.dtype, device=linear.weight.device)

    return make


def install_packed_layers(model: nn.Module, folder: PackedFolder) -> nn.Module:
    """Turn a model skeleton of the stored config (normally on the meta device) into the deployed form the folder's
    tensors load into, in place: ``rotate_model(fuse_weights=False)`` and ``quantize_model`` with the stored configs,
    every quantized projection built as an empty :class:`PackedLinear`. Then check that the surgery rebuilt the layers
    of the manifest and that the model's state dict is exactly the stored tensors (names and shapes), so that loading
    can neither leave a tensor uninitialised nor drop one. Returns the model.

    Raises:
        PackedFormatError: rebuilt layers or state-dict entries that differ from the manifest.
    """
    from ..quant.apply import quantize_model
    from ..rotation.fuse import rotate_model

    for k in ("rcp_quant", "rcp_rotation"):  # a config read back from a folder never carries them; be safe
        if hasattr(model.config, k):
            delattr(model.config, k)
    lut_dtype = torch.float32 if folder.storage_dtype == "float32" else torch.float16
    # transformers builds the skeleton under a default-device context of "meta": the surgery's own matrices (the
    # Hadamard checks, cached for the forward pass) must be real; the skeleton's tensors follow the weights' device.
    with torch.device("cpu"):
        if folder.rotation is not None:
            rotate_model(model, folder.rotation, fuse_weights=False)
        quantize_model(model, folder.quant, layer_factory=_packed_layer_factory(lut_dtype))
    projs = _quantized_projections(model)
    layers = folder.manifest.get("layers", {})
    if set(layers) != set(projs):
        raise PackedFormatError(f"{folder.path}: the manifest's layers are not the rebuilt model's projections")
    for name, q in projs.items():
        rebuilt, stored = json.loads(json.dumps(_layer_entry(name, q))), layers[name]
        if rebuilt != stored:
            raise PackedFormatError(f"{folder.path}: {name}: the surgery rebuilds {rebuilt}, {MAP} says {stored}")
    want = folder.manifest["tensors"]
    have = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing, extra = sorted(set(have) - set(want)), sorted(set(want) - set(have))
    bad = sorted(k for k in set(have) & set(want) if have[k] != want[k]["shape"])
    if missing or extra or bad:
        raise PackedFormatError(f"{folder.path}: the rebuilt model needs {missing[:5]}, does not take {extra[:5]}, "
                                f"has other shapes for {bad[:5]}")
    return model


def deploy(model: nn.Module, lut_dtype: torch.dtype = torch.float16, backend: str | None = None) -> nn.Module:
    """Replace every block projection that has a weight quantizer (frozen or not) by its :class:`PackedLinear`, in
    place; projections with full-precision weights stay :class:`~rcp_lib.quant.linear.QuantLinear`. Returns the model.

    Args:
        lut_dtype: dtype of the LUTs (fp16: the kernel format; float32: exact).
        backend: forced backend of the W2A4 op (None: the registered op's choice).
    """
    for name, q in list(M.named_block_linears(model)):
        if isinstance(q, QuantLinear) and q.weight_quantizer is not None:
            M.set_submodule(model, name, PackedLinear.from_quant_linear(q, lut_dtype, backend, name))
    return model


def merge_shared_inputs(model: nn.Module) -> int:
    """Merge, in every decoder block, the packed projections that read the same input (q / k / v and gate / up,
    :func:`rcp_lib.models.shared_input_groups`) into one :class:`PackedLinear` each (:meth:`PackedLinear.concat`),
    in place: each projection becomes a :class:`~rcp_lib.kernels.packed_linear.SharedInputSlice` of the group, so a
    block quantizes each input once and runs two products where it ran five, with the model's own forward unchanged.
    The group is registered on the module that calls its projections (``self_attn.merged_q_proj_k_proj_v_proj``,
    ``mlp.merged_gate_proj_up_proj``), whose forward pre-hook drops a kept product at each of its calls. Every group
    is checked before any is replaced. Returns the number of groups merged.

    A deploy-time layout, like ``backend`` and ``gemv_format``: not saved (:func:`save_quantized` refuses a merged
    model); for eager decoding and CUDA graphs, not ``torch.compile``.

    Raises:
        ValueError: a projection of a group that is not a :class:`PackedLinear` (not deployed, full precision, or
            already merged), or projections that :meth:`PackedLinear.concat` cannot merge; nothing is changed.
    """
    plan = []
    for i, layer in enumerate(M.decoder_layers(model)):
        if isinstance(M.mlp(layer), GatedMLP):
            raise ValueError(f"model.layers.{i}.mlp is a fused GatedMLP (its gate / up are merged already): merge "
                             f"before fuse_gated_mlps, or not at all")
        linears = M.layer_linears(layer)
        for group in M.shared_input_groups(layer):
            names = [f"model.layers.{i}.{n}" for n in group]
            mods = [linears[n] for n in group]
            for name, m in zip(names, mods):
                if not isinstance(m, PackedLinear):
                    what = "already merged" if isinstance(m, SharedInputSlice) else f"a {type(m).__name__}"
                    raise ValueError(f"{name} is {what}: merge_shared_inputs merges packed projections (load_quantized "
                                     f"or deploy first, and merge once)")
            plan.append((names, mods, PackedLinear.concat(mods, names)))
    hooked = set()
    for names, mods, merged in plan:
        short = [n.rsplit(".", 1)[1] for n in names]
        shared = SharedInputLinear(merged, [m.out_features for m in mods], short)
        parent = model.get_submodule(names[0].rsplit(".", 1)[0])  # the block's attention or MLP: it calls them
        parent.add_module("merged_" + "_".join(short), shared)
        if id(parent) not in hooked:  # a kept product lives for one call of its owner (SharedInputLinear)
            parent.register_forward_pre_hook(clear_shared_inputs)
            hooked.add(id(parent))
        for j, name in enumerate(names):
            M.set_submodule(model, name, SharedInputSlice(shared, j))
    return len(plan)


def _is_silu(act: nn.Module | None) -> bool:
    """Whether a block's ``act_fn`` is the SiLU (torch's module, or transformers' ``SiLUActivation``, which calls
    ``F.silu``): what :class:`GatedMLP` computes."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" and type(act).__module__.startswith(
        "transformers.")


def fuse_gated_mlps(model: nn.Module) -> int:
    """Replace every decoder block's SiLU-gated MLP (``down_proj(act_fn(gate_proj(h)) * up_proj(h))``) with a
    :class:`~rcp_lib.kernels.packed_linear.GatedMLP` of the same packed tensors, in place: gate and up merged into one
    product (:meth:`PackedLinear.concat`, or the group :func:`merge_shared_inputs` made), and the SiLU, the product and
    ``down_proj``'s online Hadamard fused into the kernel that quantizes ``down_proj``'s input on the fused path. A
    block then runs its MLP in two products and no torch operation between them (where the pre-kernel applies
    down_proj's R4 itself, :func:`rcp_lib.kernels.triton_w2a4.hadamard_supported`). Every non-fused path computes
    what the model merged by :func:`merge_shared_inputs` computes, bit for bit (the unmerged model to the matrix
    product's blocking). Every block is checked before any is replaced. Returns the number of MLPs fused.

    A deploy-time layout, like :func:`merge_shared_inputs`: not saved (:func:`save_quantized` refuses a fused model).
    Where the pre-kernel does not build a ``down_proj``'s online Hadamard, its SiLU, product and R4 stay torch ops
    between the two products (correct, nothing fused but gate and up): a warning says how many blocks that is, and
    :attr:`GatedMLP.glu_in_kernel` says it per block.

    Raises:
        ValueError: a block whose MLP is not a SiLU-gated MLP of packed projections (not deployed, another activation,
            or already fused), or whose gate and up cannot be merged; nothing is changed.
    """
    plan = []
    for i, layer in enumerate(M.decoder_layers(model)):
        name = f"model.layers.{i}.mlp"
        mlp = M.mlp(layer)
        if isinstance(mlp, GatedMLP):
            raise ValueError(f"{name} is already fused: fuse_gated_mlps fuses each MLP once")
        if not all(hasattr(mlp, n) for n in M.MLP_LINEARS) or not _is_silu(getattr(mlp, "act_fn", None)):
            raise ValueError(f"{name} is not a SiLU-gated MLP (gate_proj, up_proj, down_proj, act_fn SiLU): "
                             f"fuse_gated_mlps fuses those only")
        gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        if not isinstance(down, PackedLinear):
            raise ValueError(f"{name}.down_proj is a {type(down).__name__}: fuse_gated_mlps fuses packed projections "
                             f"(load_quantized or deploy first)")
        shared = getattr(mlp, "merged_gate_proj_up_proj", None)
        if isinstance(gate, SharedInputSlice) and isinstance(up, SharedInputSlice) and gate.shared is shared \
                and up.shared is shared and shared.names == ("gate_proj", "up_proj"):
            gate_up = shared.linear  # merged by merge_shared_inputs: [gate | up]
        else:
            for n, m in (("gate_proj", gate), ("up_proj", up)):
                if not isinstance(m, PackedLinear):
                    raise ValueError(f"{name}.{n} is a {type(m).__name__}: fuse_gated_mlps fuses packed projections "
                                     f"(load_quantized or deploy first)")
            gate_up = PackedLinear.concat([gate, up], [f"{name}.gate_proj", f"{name}.up_proj"])
        plan.append((name, GatedMLP(gate_up, down)))
    for name, fused in plan:
        M.set_submodule(model, name, fused)
    torch_r4 = [n for n, f in plan if isinstance(f.down_proj.input_transform, OnlineHadamard)
                and not _fusable_hadamard(f.down_proj.input_transform)]
    if torch_r4:
        t = dict(plan)[torch_r4[0]].down_proj.input_transform
        warnings.warn(f"fuse_gated_mlps: the fused path's pre-kernel does not build down_proj's online Hadamard "
                      f"(order {t.n}, block {t.block}) in {len(torch_r4)} of {len(plan)} blocks: there the SiLU, the "
                      f"product and R4 stay torch ops between the two products (GatedMLP.glu_in_kernel)", stacklevel=2)
    return len(plan)


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", backend: str | None = None,
                   dtype: torch.dtype = torch.float32, gemv_format: str = "select", merge_projections: bool = False,
                   fuse_mlps: bool = False):
    """Load a folder written by :func:`save_quantized`. Returns ``(model, tokenizer or None)``.

    The folder is checked first (:func:`check_folder`: nothing is built from a bad folder), then loaded with
    ``AutoModelForCausalLM.from_pretrained``: the "rcp" quantizer (:mod:`rcp_lib.deploy.hf`) builds the model on the meta
    device, re-runs the stored rotation and quantization surgery with empty packed layers
    (:func:`install_packed_layers`) and transformers loads the stored tensors into them; no full-precision weight of a
    quantized projection is ever built. LUTs keep the stored dtype; the other float tensors are cast to ``dtype``.
    ``backend`` and ``gemv_format`` are set on every :class:`PackedLinear` (deploy-time choices, not stored);
    ``merge_projections=True`` then merges the projections of a block that share an input (:func:`merge_shared_inputs`);
    ``fuse_mlps=True`` replaces each block's gated MLP with a :class:`~rcp_lib.kernels.packed_linear.GatedMLP`
    (:func:`fuse_gated_mlps`: gate / up merged, the SiLU and product fused into ``down_proj``'s activation quantizer).

    Raises:
        PackedFormatError: see :func:`check_folder` and :func:`install_packed_layers`.
        ValueError: ``merge_projections`` / ``fuse_mlps`` on a model they cannot merge or fuse (e.g. a block left in
            full precision): see :func:`merge_shared_inputs`, :func:`fuse_gated_mlps`.
    """
    from transformers import AutoModelForCausalLM

    check_gemv_format(gemv_format)
    path = Path(path)
    folder = check_folder(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation=folder.manifest.get("attn_implementation") or "sdpa",
        trust_remote_code=False)
    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            mod.backend = backend
            mod.gemv_format = gemv_format
    if merge_projections:
        merge_shared_inputs(model)
    if fuse_mlps:
        fuse_gated_mlps(model)
    model.to(device).eval()
    tok = None
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
    return model, tok


def packed_model_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of the stored tensors by kind (block_linears = packed codes + LUTs + biases), the tensor total
    and the size of the safetensors files."""
    folder = check_folder(path)
    out = {"block_linears": 0, "embed": 0, "lm_head": 0, "norms": 0, "other": 0}
    layer_prefixes = tuple(n + "." for n in folder.manifest["layers"])
    for k, meta in folder.manifest["tensors"].items():
        nb = math.prod(meta["shape"]) * torch.empty(0, dtype=getattr(torch, meta["dtype"])).element_size()
        if k.startswith(layer_prefixes):
            out["block_linears"] += nb
        elif "embed_tokens" in k:
            out["embed"] += nb
        elif k.startswith("lm_head"):
            out["lm_head"] += nb
        elif "norm" in k:
            out["norms"] += nb
        else:
            out["other"] += nb
    out["total"] = sum(out.values())
    out["file_bytes"] = sum((Path(path) / f).stat().st_size for f in folder.manifest["files"])
    return out
