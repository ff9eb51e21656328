"""A QAT run described by one YAML/JSON file (``python -m rcp_lib qat --config configs/cpu.yaml``).

The file says where and how much (``model``, ``corpus``, ``device``, ``eval``: ``seqlen``, ``max_windows``;
``out_dir``, ``export_dir``) and what: the sections of a :class:`~rcp_lib.recipe.Recipe` (``rotation``: the
:class:`RotationConfig` fields or null; ``quant``: ``weight`` / ``act`` / ``kv``; ``ptq``; ``qat``: the
:class:`QATConfig` fields), loaded into that one object (``RunConfig.recipe``). Everything is validated before any
model is loaded.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .io import config_hash
from .qat import QATConfig
from .quant.apply import QuantConfig
from .config import coerce_fields
from .recipe import Recipe
from .rotation.fuse import RotationConfig

RECIPE_SECTIONS = ("rotation", "quant", "ptq", "qat")


def _default_recipe() -> Recipe:
    return Recipe(rotation=RotationConfig(), quant=QuantConfig(), qat=QATConfig())


@dataclass
class RunConfig:
    """Where and how much (model, corpus, device, eval, output folders) + the :class:`Recipe` to run (QAT)."""

    model: str = "smollm2-135m"
    corpus: str = "wiki-excerpt"
    device: str = "cpu"
    recipe: Recipe = field(default_factory=_default_recipe)
    eval: dict = field(default_factory=lambda: {"seqlen": 512, "max_windows": 32})
    out_dir: str | None = None
    export_dir: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """The file's layout: the recipe's sections at the top level next to the run's fields."""
        known = {f.name for f in fields(cls)} - {"recipe"} | set(RECIPE_SECTIONS)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run-config sections {sorted(unknown)}; known: {sorted(known)}")
        run = {k: v for k, v in d.items() if k not in RECIPE_SECTIONS}
        default = _default_recipe().to_dict()
        recipe = Recipe.from_dict({k: d.get(k, default[k]) for k in RECIPE_SECTIONS})
        cfg = cls(recipe=recipe, **coerce_fields(cls, run))  # "2e-5" from YAML -> 2e-05, else names the field
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

        self.recipe.validate()
        if self.recipe.qat is None or self.recipe.quant is None:
            raise ValueError("a run config trains (QAT): it needs the quant and qat sections")
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; available: {CORPORA}")
        bad = set(self.eval) - {"seqlen", "max_windows"}
        if bad:
            raise ValueError(f"unknown eval keys {sorted(bad)}")

    def to_dict(self) -> dict[str, Any]:
        """The file's layout (recipe sections at the top level), JSON-ready."""
        d = asdict(self)
        return {**d.pop("recipe"), **d}

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
    recipe = cfg.recipe
    torch.manual_seed(recipe.qat.seed)
    teacher, tok = load(cfg.model, device=cfg.device)
    train_ids = corpus_tokens(tok, cfg.corpus, "train")
    test_ids = corpus_tokens(tok, cfg.corpus, "test")
    student = copy.deepcopy(teacher)
    if recipe.rotation is not None:
        rotate_model(student, recipe.rotation)
    quantize_model(student, recipe.quant)
    out = Path(cfg.out_dir) if cfg.out_dir else cache_dir() / "qat-cli" / cfg.key()
    res = train(student, teacher, train_ids, recipe.qat, out_dir=out, resume=True, progress=progress)
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under accelerate launch: evaluation and export on rank 0 only
        return {"rank": PartialState().process_index, "train_steps": res.steps}
    ev = perplexity_details(student, test_ids, seqlen=cfg.eval.get("seqlen", 512),
                            max_windows=cfg.eval.get("max_windows"), progress=progress)
    summary = {"model": cfg.model, "model_note": describe(cfg.model), "corpus": cfg.corpus, "setting": recipe.label,
               "test_ppl": ev.ppl, "eval_seqlen": ev.seqlen, "eval_windows": ev.windows, "tokens_scored": ev.tokens_scored,
               "train_steps": res.steps, "final_loss": res.final_loss, "train_tokens": res.tokens, "out_dir": str(out),
               "config": cfg.to_dict(), **provenance()}
    if cfg.export_dir:
        from .packing import save_quantized

        save_quantized(student, cfg.export_dir)
        summary["export_dir"] = cfg.export_dir
    atomic_write_json(summary, out / "summary.json")
    return summary
