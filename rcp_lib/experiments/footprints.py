"""Memory tables (notebook 04): footprints from the accountant :mod:`rcp_lib.memory`, and the accountant against
the bytes that ``save_quantized`` writes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..io import provenance
from ..memory import PAPER_GROUP, Scheme, footprint
from ..profiles import Profile
from .build import base_model, build
from ..quant.apply import preset
from .methods import method

if TYPE_CHECKING:
    import pandas as pd

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
    from ..models import dims

    cfgs = dict(REFERENCE_CONFIGS)
    d = dims(base_model(profile)[0])
    cfgs[profile.model] = dict(hidden_size=d.hidden, intermediate_size=d.intermediate, num_hidden_layers=d.n_layers,
                               num_attention_heads=d.n_heads, num_key_value_heads=d.n_kv_heads, head_dim=d.head_dim,
                               vocab_size=d.vocab, tie_word_embeddings=d.tied)
    return cfgs


def _scheme(setting: str, group: int, head_dim: int) -> Scheme:
    """The accountant's scheme of a memory-table setting (``FP16`` or a preset name) at a weight group."""
    return Scheme.of(None if setting == "FP16" else preset(setting, w_group_size=group), head_dim=head_dim, name=setting)


def memory_table(profile: Profile, seq_len: int = 2048) -> list[dict]:
    """Footprints (FP16, W2A4KV4, W4A4KV4, W2A16KV16) of the reference models and the profile's model.

    The weight group is the paper's 128 for the published configs and the profile's ``w_group_size`` for its
    model. Quantized rows count ``lm_head`` separately even for tied models (rotation needs untied embeddings);
    the FP16 row keeps the published tying. Ratios are FP16 bytes / scheme bytes.
    """
    rows = []
    for name, cfg in _memory_configs(profile).items():
        gs = profile.w_group_size if name == profile.model else PAPER_GROUP
        fp = footprint(cfg, "FP16", seq_len=seq_len)
        for sname in ("FP16", "W2A4KV4", "W4A4KV4", "W2A16KV16"):
            scheme = _scheme(sname, gs, cfg["head_dim"])
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
    """KV-cache size against sequence length (128 ... 32768 tokens, batch 1), FP16 and W2A4KV4, of LLaMA-2-7B and
    LLaMA-3.2-1B."""
    import pandas as pd

    rows = []
    for name in ("LLaMA-2-7B", "LLaMA-3.2-1B"):
        cfg = REFERENCE_CONFIGS[name]
        for sname in ("FP16", "W2A4KV4"):
            for s in [2 ** k for k in range(7, 16)]:
                scheme = _scheme(sname, PAPER_GROUP, cfg["head_dim"])
                rows.append({"model": name, "scheme": sname, "seq_len": s,
                             "kv_gb": footprint(cfg, scheme, seq_len=s).kv_cache / 1e9})
    return pd.DataFrame(rows)


def memory_vs_saved(profile: Profile) -> dict:
    """Accountant vs bytes on disk for the profile's model exported with ``save_quantized`` (W2A4KV4)."""
    import tempfile

    import torch

    from ..deploy import packed_model_bytes, save_quantized

    m = method("QuaRot-RTN", "W2A4KV4")  # the table row's recipe; the accountant reads the same object
    model = build(m, profile, progress=False)
    cfg = {**_memory_configs(profile)[profile.model], "tie_word_embeddings": False}
    # what the packed folder stores: a level table per group even for this uniform row (one kernel for all methods)
    f = footprint(cfg, Scheme.of(m.recipe(profile).quant, lut_levels=True))
    with tempfile.TemporaryDirectory() as d:
        save_quantized(model, d, dtype=torch.float16)  # the format the accountant counts (fp16 levels and tensors)
        disk = packed_model_bytes(d)
    block_acc = sum(v for k, v in f.per_kind.items() if k.startswith(("attn_", "mlp_")))
    return {"model": profile.model, "scheme": "W2A4KV4", "group_size": profile.w_group_size,
            "accountant_block_bytes": block_acc, "disk_block_bytes": disk.get("block_linears"),
            "accountant_weight_bytes": f.weights, "disk_total_bytes": disk.get("total"),
            "block_rel_diff": abs(disk.get("block_linears", 0) - block_acc) / block_acc,
            "total_rel_diff": abs(disk.get("total", 0) - f.weights) / f.weights, **provenance()}
