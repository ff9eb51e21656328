"""A QAT run described by one YAML/JSON file (``python -m rcp_lib qat --config configs/cpu.yaml``).

The file has the sections ``model``, ``corpus``, ``device``, ``rotation`` (:class:`RotationConfig` fields),
``quant`` (:class:`QuantConfig`), ``qat`` (:class:`QATConfig`), ``eval`` (``seqlen``, ``max_windows``),
``out_dir`` and ``export_dir``. Everything is validated before any model is loaded.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .io import config_hash
from .qat import QATConfig
from .quant.apply import QuantConfig
from .rotation.fuse import RotationConfig


@dataclass
class RunConfig:
    model: str = "smollm2-135m"
    corpus: str = "wiki-excerpt"
    device: str = "cpu"
    rotation: RotationConfig | None = field(default_factory=RotationConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    eval: dict = field(default_factory=lambda: {"seqlen": 512, "max_windows": 32})
    out_dir: str | None = None
    export_dir: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run-config sections {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        rot = d.get("rotation", {})
        d["rotation"] = None if rot is None else RotationConfig.from_dict(rot)
        d["quant"] = QuantConfig.from_dict(d.get("quant", {}))
        d["qat"] = QATConfig.from_dict(d.get("qat", {}))
        cfg = cls(**d)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"run config {path} does not exist (see configs/ for examples)")
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
        return cls.from_dict(d)

    def validate(self) -> None:
        from .data import CORPORA

        if self.rotation is not None:
            self.rotation.validate()
        self.quant.validate()
        self.qat.validate()
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; available: {CORPORA}")
        bad = set(self.eval) - {"seqlen", "max_windows"}
        if bad:
            raise ValueError(f"unknown eval keys {sorted(bad)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    def key(self) -> str:
        from .io import code_fingerprint

        d = self.to_dict()
        d.pop("out_dir", None)
        d.pop("export_dir", None)
        d.pop("eval", None)
        return config_hash(d, {"code": code_fingerprint()})


def run_qat(cfg: RunConfig, progress: bool = True) -> dict:
    """Load -> rotate -> quantize -> train (resumable, cached by config hash) -> evaluate -> export."""
    import torch

    from .data import corpus_tokens
    from .evaluation import perplexity_details
    from .io import atomic_write_json, provenance
    from .models import describe, load
    from .paths import cache_dir
    from .quant.apply import quantize_model
    from .qat import train
    from .rotation.fuse import rotate_model

    cfg.validate()
    torch.manual_seed(cfg.qat.seed)
    teacher, tok = load(cfg.model, device=cfg.device)
    train_ids = corpus_tokens(tok, cfg.corpus, "train")
    test_ids = corpus_tokens(tok, cfg.corpus, "test")
    student = copy.deepcopy(teacher)
    if cfg.rotation is not None:
        rotate_model(student, cfg.rotation)
    quantize_model(student, cfg.quant)
    out = Path(cfg.out_dir) if cfg.out_dir else cache_dir() / "qat-cli" / cfg.key()
    res = train(student, teacher, train_ids, cfg.qat, out_dir=out, resume=True, progress=progress)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch: evaluation and export on rank 0 only
        return {"rank": PartialState().process_index, "train_steps": res.steps}
    ev = perplexity_details(student, test_ids, seqlen=cfg.eval.get("seqlen", 512),
                            max_windows=cfg.eval.get("max_windows"), progress=progress)
    summary = {"model": cfg.model, "model_note": describe(cfg.model), "corpus": cfg.corpus, "setting": cfg.quant.label,
               "test_ppl": ev.ppl, "eval_seqlen": ev.seqlen, "eval_windows": ev.windows, "tokens_scored": ev.tokens_scored,
               "train_steps": res.steps, "final_loss": res.final_loss, "train_tokens": res.tokens, "out_dir": str(out),
               "config": cfg.to_dict(), **provenance()}
    if cfg.export_dir:
        from .packing import save_quantized

        save_quantized(student, cfg.export_dir)
        summary["export_dir"] = cfg.export_dir
    atomic_write_json(summary, out / "summary.json")
    return summary
