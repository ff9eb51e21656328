"""Export of a rotated, quantized model to real packed tensors, and loading it back (``save_quantized`` /
``load_quantized``).

Folder layout (format version :data:`FORMAT_VERSION`):

* ``model.safetensors`` — for every quantized projection ``<name>``: ``<name>.qweight`` (int32 ``[N, ceil(K/16)]``,
  2-bit codes packed 16 per word along K, the layout of :mod:`rcp_lib.kernels.bitpack`), ``<name>.lut`` (fp16
  ``[N, K/G, 2^bits]`` level table per group; float32 when ``dtype=float32``) and ``<name>.bias`` if any; projections kept in full precision as
  ``<name>.weight``; every other tensor (embedding, lm_head, norms) in ``dtype`` (fp16 by default).
* ``quant_map.json`` — the format version, the transformers config, the rotation and quantization configs, one
  entry per projection (bits, group size, N, K, activation bits and clip ratio, online R4), the name, shape and
  dtype of every tensor, and the SHA-256 of ``model.safetensors``.
* the tokenizer files, if a tokenizer is given.

:func:`load_quantized` checks the format version, the checksum and that the tensors match the map (anything else
raises :class:`PackedFormatError`), rebuilds the architecture from the config, installs the online rotations
(R3 on queries/keys, R4 on the down_proj input: R1/R2 are already in the weights) and the KV quantizer, and puts a
:class:`PackedLinear` (packed codes + LUT, per-token A4 input quantization, the W2A4 op of
:mod:`rcp_lib.kernels`: torch reference on CPU, Triton on CUDA) in place of every quantized projection.

:class:`PackedLinear` is the one deployed form of a :class:`rcp_lib.quant.linear.QuantLinear`
(:meth:`PackedLinear.from_quant_linear`); it quantizes its input with the activation fake quantizer's own formula
(:func:`rcp_lib.quant.activations.quantize_per_token`), so a trained layer and its deployed form agree to float
rounding (with a float32 LUT; the fp16 LUT of the default storage adds the fp16 rounding of the levels).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import models as M
from .kernels import SUPPORTED_BITS, dequantize, pack_codes, w2a4_gemv
from .quant.activations import quantize_per_token
from .quant.linear import QuantLinear
from .rotation.online import InputRotatedLinear, OnlineHadamard, use_rcp_attention

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MAP = "quant_map.json"


class PackedFormatError(ValueError):
    """A packed-model folder that does not match what this version reads (version, checksum, tensors)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _quantized_projections(model: nn.Module) -> dict[str, QuantLinear]:
    out = {}
    for name, mod in M.named_block_linears(model):
        if not isinstance(mod, QuantLinear):
            raise ValueError(f"{name} is not a QuantLinear: save_quantized needs a model prepared by quantize_model")
        out[name] = mod
    return out


def save_quantized(model: nn.Module, path: str | os.PathLike, tokenizer=None, dtype: torch.dtype = torch.float16,
                   overwrite: bool = True) -> Path:
    """Export a quantized model (after QAT, GPTQ or plain PTQ) to packed tensors (see module docstring).

    Args:
        model: a LLaMA-family model prepared with ``quantize_model`` (and usually ``rotate_model``).
        path: output folder (written to a temporary folder, then renamed).
        tokenizer: saved next to the weights if given.
        dtype: storage dtype of the non-quantized tensors (fp16 default; float32 for bit-exact round trips).
    Returns:
        the folder.
    """
    from safetensors.torch import save_file

    if not getattr(model.config, "rcp_quant", None):
        raise ValueError("save_quantized needs a model prepared with quantize_model (config.rcp_quant is missing)")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (overwrite=False)")
    projs = _quantized_projections(model)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, q in projs.items():
        N, K = q.weight.shape
        transform = q.input_transform
        entry = {"N": N, "K": K, "act_bits": q.act_bits, "act_clip_ratio": q.act_clip_ratio,
                 "bias": q.bias is not None,
                 "r4": None if transform is None else {"n": transform.n, "block": transform.block}}
        if transform is not None and not isinstance(transform, OnlineHadamard):
            raise ValueError(f"{name}: cannot export an input transform of type {type(transform).__name__}")
        if q.weight_quantizer is None:
            entry.update(bits=16, group_size=None)
            tensors[f"{name}.weight"] = q.weight.detach().to(dtype).contiguous().cpu()
        else:
            # the LUT is fp16 (the kernel format) unless the caller asks for float32 storage (exact round trips)
            p = PackedLinear.from_quant_linear(q, lut_dtype=torch.float32 if dtype == torch.float32 else torch.float16,
                                               name=name)
            entry.update(bits=p.bits, group_size=p.group_size)
            tensors[f"{name}.qweight"] = p.qweight.contiguous().cpu()
            tensors[f"{name}.lut"] = p.lut.contiguous().cpu()
        if q.bias is not None:
            tensors[f"{name}.bias"] = q.bias.detach().to(dtype).contiguous().cpu()
        layers[name] = entry
    for key, t in model.state_dict().items():
        if any(key.startswith(n + ".") for n in projs):
            continue
        tensors[key] = t.detach().to(dtype).contiguous().cpu()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(tensors, str(tmp / WEIGHTS))
        cfg = model.config.to_dict()
        qmap = {
            "format_version": FORMAT_VERSION,
            "config": cfg,
            "rotation": getattr(model.config, "rcp_rotation", None),
            "quant": model.config.rcp_quant,
            "attn_implementation": model.config._attn_implementation,
            "storage_dtype": str(dtype).replace("torch.", ""),
            "layers": layers,
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
            "sha256": _sha256(tmp / WEIGHTS),
        }
        (tmp / MAP).write_text(json.dumps(qmap, indent=1, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


class PackedLinear(nn.Module):
    """The deployed form of a :class:`~rcp_lib.quant.linear.QuantLinear`: packed codes + LUT, computed with the W2A4
    op of :mod:`rcp_lib.kernels` (``torch.ops.rcp.w2a4_gemv``: torch reference on CPU, Triton on CUDA).

    Buffers: ``qweight`` int32 ``[N, ceil(K / (32 // bits))]`` (:func:`rcp_lib.kernels.bitpack.pack_codes`), ``lut``
    ``[N, K / G, 2**bits]`` (fp16 in the kernel format, float32 for exact round trips), ``bias`` ``[N]`` or None.

    ``forward(x [..., K]) -> [..., N]`` in ``x.dtype``: optional online rotation (R4), then the per-token activation
    quantizer of fake quantization in its integer form (:func:`rcp_lib.quant.activations.quantize_per_token`, formula
    and float zero point documented there), then ``x̂ Ŵᵀ`` with fp32 accumulation. With ``act_bits=None`` the input
    stays in full precision and the weight is dequantized on the fly.
    """

    def __init__(self, qweight: torch.Tensor, lut: torch.Tensor, K: int, group_size: int, bits: int,
                 bias: torch.Tensor | None, act_bits: int | None, act_clip_ratio: float,
                 input_transform: nn.Module | None = None, backend: str | None = None):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("lut", lut)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = K, lut.shape[0]
        self.group_size, self.bits = group_size, bits
        self.act_bits, self.act_clip_ratio = act_bits, act_clip_ratio
        self.input_transform = input_transform
        self.backend = backend

    @classmethod
    @torch.no_grad()
    def from_quant_linear(cls, q: QuantLinear, lut_dtype: torch.dtype = torch.float16, backend: str | None = None,
                          name: str = "layer") -> "PackedLinear":
        """Deploy a fake-quantized layer: its exported codes packed, its levels as the LUT (in ``lut_dtype``), its
        bias, activation quantizer settings and input transform (shared, not copied).

        Raises:
            ValueError: ``q`` has no weight quantizer. NotImplementedError: levels not ``2**bits`` for ``bits`` in
                :data:`rcp_lib.kernels.bitpack.SUPPORTED_BITS`.
        """
        if q.weight_quantizer is None:
            raise ValueError(f"{name}: a QuantLinear without weight quantizer has nothing to pack")
        codes, levels = q.export()  # uint8 [N, K], float32 [N, K/G, L]
        K = codes.shape[1]
        L = levels.shape[-1]
        bits = int(round(math.log2(L)))
        if bits not in SUPPORTED_BITS or 2**bits != L:
            raise NotImplementedError(f"{name}: {L} levels ({bits} bits) cannot be packed; supported bits: {SUPPORTED_BITS}")
        bias = None if q.bias is None else q.bias.detach().clone()
        return cls(pack_codes(codes, bits), levels.to(lut_dtype).contiguous(), K, K // levels.shape[1], bits, bias,
                   q.act_bits, q.act_clip_ratio, q.input_transform, backend)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [N, K]`` in ``dtype`` (the LUT values converted, not re-rounded)."""
        return dequantize(self.qweight, self.lut, self.in_features, self.group_size, self.bits, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.act_bits is None:
            y = F.linear(x2, self.dequantized_weight(x.dtype))
        else:
            codes, s, z = quantize_per_token(x2, self.act_bits, self.act_clip_ratio)
            y = w2a4_gemv(codes, s, z, self.qweight, self.lut, self.in_features, self.group_size, self.bits,
                          backend=self.backend).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        a = "a16" if self.act_bits is None else f"a{self.act_bits} clip {self.act_clip_ratio}"
        return f"in={self.in_features}, out={self.out_features}, w{self.bits} group {self.group_size}, {a}"


def _read_checked(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    mp, wp = path / MAP, path / WEIGHTS
    if not mp.exists() or not wp.exists():
        raise PackedFormatError(f"{path} is not a packed model folder (needs {MAP} and {WEIGHTS})")
    try:
        qmap = json.loads(mp.read_text())
    except json.JSONDecodeError as e:
        raise PackedFormatError(f"{mp} is not valid JSON: {e}") from e
    ver = qmap.get("format_version")
    if ver != FORMAT_VERSION:
        raise PackedFormatError(f"{path}: packed format version {ver!r}; this rcp_lib reads version {FORMAT_VERSION}")
    digest = _sha256(wp)
    if digest != qmap.get("sha256"):
        raise PackedFormatError(f"{wp}: checksum mismatch (truncated or modified file): expected "
                                f"{qmap.get('sha256')}, got {digest}")
    try:
        tensors = load_file(str(wp))
    except Exception as e:  # pragma: no cover - the checksum catches corruption first
        raise PackedFormatError(f"{wp} cannot be read: {e}") from e
    want = qmap.get("tensors", {})
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise PackedFormatError(f"{path}: tensors do not match {MAP}: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, meta in want.items():
        t = tensors[k]
        if list(t.shape) != meta["shape"] or str(t.dtype).replace("torch.", "") != meta["dtype"]:
            raise PackedFormatError(f"{k}: stored {list(t.shape)} {t.dtype}, map says {meta['shape']} {meta['dtype']}")
    return qmap, tensors


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", backend: str | None = None,
                   dtype: torch.dtype = torch.float32):
    """Load a folder written by :func:`save_quantized`. Returns ``(model, tokenizer or None)``.

    Raises:
        PackedFormatError: other format version, checksum mismatch, tensors that do not match the map.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .quant.apply import OFF, KVQuantizer, QuantConfig

    path = Path(path)
    qmap, tensors = _read_checked(path)
    cfg_dict = dict(qmap["config"])
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **{k: v for k, v in cfg_dict.items() if k not in ("rcp_quant", "rcp_rotation")})
    cfg.tie_word_embeddings = False
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    M.check_supported(model)
    d = M.dims(model)
    rot, quant = qmap.get("rotation") or {}, QuantConfig.from_dict(qmap["quant"])
    for name, e in qmap["layers"].items():
        transform = OnlineHadamard(e["r4"]["n"], e["r4"]["block"]) if e["r4"] else None
        bias = tensors.get(f"{name}.bias")
        bias = bias.to(dtype) if bias is not None else None
        if e["bits"] == 16:
            lin = nn.Linear(e["K"], e["N"], bias=bias is not None, dtype=dtype)
            lin.weight.data = tensors[f"{name}.weight"].to(dtype)
            if bias is not None:
                lin.bias.data = bias
            new = InputRotatedLinear.wrap(lin, transform) if transform is not None else lin
        else:
            new = PackedLinear(tensors[f"{name}.qweight"], tensors[f"{name}.lut"], e["K"], e["group_size"], e["bits"],
                               bias, e["act_bits"], e["act_clip_ratio"], transform, backend)
        M.set_submodule(model, name, new)
    rest = {k: v.to(dtype) for k, v in tensors.items() if not any(k.startswith(n + ".") for n in qmap["layers"])}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    block_prefixes = tuple(n + "." for n in qmap["layers"])
    missing = [k for k in missing if not k.startswith(block_prefixes)]
    if missing or unexpected:
        raise PackedFormatError(f"{path}: the model needs {missing[:5]} / does not take {unexpected[:5]}")
    if rot.get("r3"):
        for layer in M.decoder_layers(model):
            M.attention(layer).rcp_qk_rotation = OnlineHadamard(d.head_dim)
    if quant.kv.bits != OFF:
        for layer in M.decoder_layers(model):
            M.attention(layer).rcp_kv_quantizer = KVQuantizer.of(quant.kv, d.head_dim)
    base = qmap.get("attn_implementation") or "sdpa"
    model.config._attn_implementation = "eager" if "eager" in base else "sdpa"
    if rot.get("r3") or quant.kv.bits != OFF:
        use_rcp_attention(model)
    model.config.rcp_rotation = qmap.get("rotation")
    model.config.rcp_quant = qmap["quant"]
    model.to(device).eval()
    tok = None
    if (path / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    return model, tok


def packed_model_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of the stored tensors by kind (block_linears = packed codes + LUTs + biases), the tensor total
    and the file size."""
    qmap, tensors = _read_checked(Path(path))
    out = {"block_linears": 0, "embed": 0, "lm_head": 0, "norms": 0, "other": 0}
    layer_prefixes = tuple(n + "." for n in qmap["layers"])
    for k, t in tensors.items():
        nb = t.numel() * t.element_size()
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
    out["file_bytes"] = (Path(path) / WEIGHTS).stat().st_size
    return out
