"""A QAT run described by one YAML/JSON file (``python -m rcp_lib qat --config configs/cpu.yaml``).

The file says where and how much (``model``, ``corpus``, ``device``, ``eval``: ``seqlen``, ``max_windows``, ``spread``;
``calib``: ``windows``, ``seqlen`` of the GPTQ start; ``out_dir``, ``export_dir``) and what: the sections of a
:class:`~rcp_lib.recipe.Recipe` (``rotation``: the :class:`RotationConfig` fields or null; ``quant``: ``weight`` /
``act`` / ``kv``; ``ptq``; ``qat``: the :class:`QATConfig` fields), loaded into that one object (``RunConfig.recipe``).
Everything is validated before any model is loaded. ``configs/cpu.yaml`` is the recipe of the cpu table's RCP
W2A4KV4 row and ``configs/paper-llama2-7b.yaml`` the paper profile's (``tests/test_recipe.py`` checks both).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .distributed import full_state_dict, is_sharded, run_device
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
    # the calibration windows of a GPTQ start (qat.gptq_start): ``windows`` random windows of ``seqlen`` tokens of the
    # train split, drawn with the QAT seed (the windows of the tables' rows: rcp_lib.experiments.calibration)
    calib: dict = field(default_factory=lambda: {"windows": 32, "seqlen": 512})
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
        if path.is_dir():
            raise IsADirectoryError(f"run config {path} is a folder: give one file, e.g. configs/cpu.yaml")
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
        if self.export_dir:  # refused before training, not after it: the export is the run's last step
            from .quant.apply import check_packable

            check_packable(self.recipe.quant)
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r}; available: {CORPORA}")
        bad = set(self.eval) - {"seqlen", "max_windows", "spread"}
        if bad:
            raise ValueError(f"unknown eval keys {sorted(bad)}")
        bad = set(self.calib) - {"windows", "seqlen"}
        if bad:
            raise ValueError(f"unknown calib keys {sorted(bad)}; known: ['seqlen', 'windows']")
        for k, lo in (("windows", 1), ("seqlen", 2)):
            v = self.calib.get(k, lo)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"calib.{k} must be an integer >= {lo}, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        """The file's layout (recipe sections at the top level), JSON-ready."""
        d = asdict(self)
        return {**d.pop("recipe"), **d}

    def key(self) -> str:
        from .io import code_fingerprint, platform_key

        d = self.to_dict()
        d.pop("out_dir", None)
        d.pop("export_dir", None)
        d.pop("eval", None)
        return config_hash(d, {"code": code_fingerprint(), "platform": platform_key(self.device)})


def export_run(student, cfg: RunConfig, export_dir: str | Path, is_main: bool, skeleton=None,
               run_dir: str | Path | None = None) -> None:
    """Save the trained ``student`` as a packed model (:func:`rcp_lib.deploy.save_quantized`) from every rank:
    a sharded student's full state dict is gathered (all ranks), then rank 0 loads it into an unsharded skeleton of
    the same surgery on the CPU and writes; an unsharded student is written by rank 0 directly. A packed folder
    already at ``export_dir`` is replaced only when this run wrote it (its ``quant_map.json`` ``source`` names
    ``run_dir``: :func:`run_qat` checks that before training, and :func:`rcp_lib.deploy.check_output_folder` refuses a
    folder holding anything else).

    Args:
        skeleton: ``() -> nn.Module``, the unrotated full-precision model to rebuild on (default: ``load(cfg.model)``
            on the CPU in the gathered dtype); only called on rank 0 for a sharded student.
        run_dir: the run's folder, recorded as the folder's source (:func:`rcp_lib.deploy.save_quantized`).
    """
    source, run = None, str(Path(run_dir).resolve()) if run_dir else None
    if is_main:
        from .export import built_by

        source = {"run": run, **built_by()}
    if not is_sharded(student):
        if is_main:
            from .deploy import save_quantized

            save_quantized(student, export_dir, overwrite=True, source=source, replaces_run=run)
        return
    sd = full_state_dict(student)
    if is_main:
        from .models import load
        from .deploy import save_quantized
        from .quant.apply import quantize_model
        from .rotation.fuse import rotate_model

        model = skeleton() if skeleton is not None else load(cfg.model, device="cpu", dtype=_dtype_of(sd))[0]
        if cfg.recipe.rotation is not None:
            rotate_model(model, cfg.recipe.rotation, fuse_weights=False)
        quantize_model(model, cfg.recipe.quant)
        model.load_state_dict(sd, strict=True)
        save_quantized(model, export_dir, overwrite=True, source=source, replaces_run=run)


def _dtype_of(sd: dict):
    import torch

    return next((v.dtype for v in sd.values() if torch.is_floating_point(v)), torch.float32)


def run_qat(cfg: RunConfig, progress: bool = True) -> dict:
    """Load -> rotate -> quantize -> (GPTQ start) -> train (resumable, cached by config hash) -> evaluate -> export.

    With ``qat.gptq_start`` the quantized student is first GPTQ'd on its own quantizer grid with the ``calib`` windows
    of the train split (:func:`rcp_lib.experiments.build.gptq_start`, as the tables' QAT rows are); the evaluation
    takes ``eval.max_windows`` windows of ``eval.seqlen`` tokens of the test split, evenly spread with
    ``eval.spread`` (the tables' windows), else the first ones.

    Under ``accelerate launch`` every process loads onto its own device (:func:`run_device`), the student in float32
    (its latent weights are the optimizer's master copy) and the teacher as :func:`rcp_lib.qat.train` keeps it
    (bf16 under bf16 mixed precision). Every process takes part in the evaluation (a sharded forward needs all
    ranks); the export gathers a full state dict and rank 0 writes (:func:`export_run`).
    """
    import torch
    from accelerate import PartialState

    from .data import corpus_tokens
    from .evaluation import perplexity_details
    from .io import atomic_write_json, provenance
    from .models import describe, load, model_dims
    from .paths import cache_dir
    from .quant.apply import check_model_sizes, quantize_model
    from .qat import resolve_mixed_precision, train
    from .rotation.fuse import rotate_model

    cfg.validate()
    out = Path(cfg.out_dir) if cfg.out_dir else cache_dir() / "qat-cli" / cfg.key()
    if cfg.export_dir:  # a folder holding other files, or another run's model, fails now, not after training
        from .deploy.format import check_output_folder, check_replaces_run

        check_replaces_run(check_output_folder(cfg.export_dir, overwrite=True), str(out.resolve()))
    recipe = cfg.recipe
    check_model_sizes(recipe.quant, model_dims(cfg.model), cfg.model)  # from the model's config, before loading it
    torch.manual_seed(recipe.qat.seed)
    state = PartialState()
    device = run_device(cfg.device)
    student, tok = load(cfg.model, device=device, dtype=torch.float32)
    train_ids = corpus_tokens(tok, cfg.corpus, "train")
    test_ids = corpus_tokens(tok, cfg.corpus, "test")
    teacher_dt = torch.bfloat16 if resolve_mixed_precision(recipe.qat) == "bf16" else torch.float32
    teacher = copy.deepcopy(student).to(teacher_dt)
    if recipe.rotation is not None:
        rotate_model(student, recipe.rotation)
    quantize_model(student, recipe.quant)
    if recipe.qat.gptq_start:
        from .data import calibration_windows
        from .experiments.build import gptq_start

        calib = calibration_windows(train_ids, cfg.calib.get("windows", 32), cfg.calib.get("seqlen", 512),
                                    seed=recipe.qat.seed)
        gptq_start(student, calib, progress=progress and state.is_main_process)
    res = train(student, teacher, train_ids, recipe.qat, out_dir=out, resume=True, progress=progress)
    del teacher
    ev = perplexity_details(student, test_ids, seqlen=cfg.eval.get("seqlen", 512),
                            max_windows=cfg.eval.get("max_windows"), progress=progress and state.is_main_process,
                            spread=bool(cfg.eval.get("spread", False)))
    summary = {"model": cfg.model, "model_note": describe(cfg.model), "corpus": cfg.corpus, "setting": recipe.label,
               "test_ppl": ev.ppl, "eval_seqlen": ev.seqlen, "eval_windows": ev.windows, "tokens_scored": ev.tokens_scored,
               "eval_window_indices": ev.window_indices, "eval_spread": bool(cfg.eval.get("spread", False)),
               "train_steps": res.steps, "final_loss": res.final_loss, "train_tokens": res.tokens, "out_dir": str(out),
               "num_processes": state.num_processes, "config": cfg.to_dict(), **provenance()}
    if cfg.export_dir:
        export_run(student, cfg, cfg.export_dir, state.is_main_process, run_dir=out)
        summary["export_dir"] = cfg.export_dir
    if state.is_main_process:
        atomic_write_json(summary, out / "summary.json")
    state.wait_for_everyone()
    return summary if state.is_main_process else {**summary, "rank": state.process_index}
