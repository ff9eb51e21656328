"""One object for one quantization setting: :class:`Recipe` = how a model is rotated, quantized, and calibrated or
trained. Nested, each part owned by its own config (none mirrors another):

* ``rotation``: :class:`~rcp_lib.rotation.fuse.RotationConfig` (R1-R4, seed) or None;
* ``quant``: :class:`~rcp_lib.quant.apply.QuantConfig` = ``weight`` (:class:`~rcp_lib.quant.quantizers.
  WeightQuantConfig`: bits, group size, method, LWC, clip search, LDP), ``act`` (bits, clip ratio) and ``kv``
  (bits, group, clip), or None for the full-precision model;
* ``ptq``: ``"none"``, ``"rtn"`` (weights frozen after RTN / its clip search) or ``"gptq"``;
* ``qat``: :class:`~rcp_lib.qat.QATConfig` or None.

Recipes are files. The named methods of the tables are ``configs/recipes/*.yaml`` (:data:`RECIPES_DIR`; read by
:func:`read_recipe_file`, :data:`rcp_lib.experiments.methods.NAMED`): each says what its method is (``name``,
``family``, the R1 kind, the weight quantizer's fields, ``ptq``, and for a QAT method its own ``qat`` fields such as
``freeze``), never how much. :meth:`Recipe.load` resolves one at a setting (``W2A4KV4`` ...) with a :class:`Budget`
(the weight group, the seed, the QAT steps / seqlen / batch / accumulation / validation interval) and, for a QAT method,
a :class:`QATRecipe`: the file that says how the QAT rows of a profile train (learning rates, gradient clip, the
start; ``configs/recipes/qat/cpu.yaml``, or the ``paper`` profile's ``configs/paper-llama2-7b.yaml``). A profile
(:mod:`rcp_lib.profiles`) says only where and how much, plus the path of its QAT recipe.

The CLI's run configs (``configs/*.yaml``, :mod:`rcp_lib.run_config`; ``configs/cpu.yaml`` is the cpu table's RCP
recipe, a test checks it), the memory accountant (:meth:`rcp_lib.memory.Scheme.of`) and the ``config`` column of every
result row (``Recipe.to_dict()`` plus the method's name) use the same object.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .config import JsonConfig, coerce_fields
from .paths import REPO_ROOT
from .qat import QATConfig
from .quant.apply import QuantConfig, preset
from .quant.quantizers import WeightQuantConfig
from .rotation.fuse import BLOCK_KINDS, RotationConfig

PTQ_ALGORITHMS = ("none", "rtn", "gptq")
FAMILIES = ("baseline", "ptq", "qat")

#: the named recipes of the tables: one file per method (:data:`rcp_lib.experiments.methods.NAMED`)
RECIPES_DIR = REPO_ROOT / "configs" / "recipes"

# Weight fields a QAT recipe sets for the rows it trains (their start): clip fields only where there is a learnable
# clip (LWC; a "w/o Clip" row has no clip to initialise), LDP fields only where there are LDP levels, range_mode
# everywhere ("static" without LWC: the range fixed where it starts, so that a "w/o Clip" row can take a GPTQ start)
CLIP_FIELDS = ("clip_init", "lwc_init", "range_param")
LDP_FIELDS = ("ldp_init", "ldp_granularity", "lloyd_iters")
QAT_WEIGHT_FIELDS = CLIP_FIELDS + LDP_FIELDS + ("range_mode",)
#: the QATConfig fields a profile's budget sets (:class:`Budget`): never a recipe file's
BUDGET_FIELDS = ("steps", "seqlen", "batch_size", "grad_accum", "val_every", "seed")


@dataclass
class Recipe(JsonConfig):
    """Rotation -> quantization -> PTQ or QAT. Round-trips to JSON (``to_dict`` / ``from_dict``, nested).

    Attributes:
        rotation: the rotations to fuse, or None (no rotation).
        quant: the quantizers to insert, or None (full precision; then ``ptq`` is ``"none"`` and ``qat`` None).
        ptq: ``"none"``, ``"rtn"`` or ``"gptq"`` (see :func:`rcp_lib.quant.calibrate.gptq_model`).
        qat: the QAT recipe, or None (no training).
    """

    rotation: RotationConfig | None = None
    quant: QuantConfig | None = None
    ptq: str = "none"
    qat: QATConfig | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        """The layout of :meth:`to_dict` (sections may be missing: their defaults; see :meth:`QuantConfig.from_dict`).
        Unknown sections raise ValueError."""
        unknown = set(d) - {"rotation", "quant", "ptq", "qat"}
        if unknown:
            raise ValueError(f"unknown recipe sections {sorted(unknown)}; known: ['ptq', 'qat', 'quant', 'rotation']")
        rot, quant, qat = d.get("rotation"), d.get("quant"), d.get("qat")
        return cls(rotation=None if rot is None else RotationConfig.from_dict(rot),
                   quant=None if quant is None else QuantConfig.from_dict(quant),
                   ptq=d.get("ptq", "none"), qat=None if qat is None else QATConfig.from_dict(qat))

    @classmethod
    def load(cls, path: str | Path, setting: str, budget: "Budget", qat_recipe: "QATRecipe | str | Path | None" = None
             ) -> "Recipe":
        """The recipe of a recipe file (``configs/recipes/<method>.yaml``, :func:`read_recipe_file`) at ``setting``
        (``"W2A4KV4"`` ...; ignored by a full-precision file) with ``budget`` and, for a QAT method, ``qat_recipe`` (a
        :class:`QATRecipe` or the path of its file); see :func:`resolve`."""
        d = read_recipe_file(path)
        if isinstance(qat_recipe, (str, Path)):
            qat_recipe = QATRecipe.load(qat_recipe)
        return resolve(d["r1"], d["weight"], d["ptq"], d["qat_fields"] if d["qat"] else None,
                       "FP" if d["full_precision"] else setting, budget, qat_recipe)

    @classmethod
    def of_row(cls, config: dict[str, Any]) -> "Recipe":
        """The recipe of a result row's ``config`` column (its method / setting / family keys dropped)."""
        return cls.from_dict({k: v for k, v in config.items() if k in ("rotation", "quant", "ptq", "qat")})

    def validate(self) -> None:
        """Raise ``ValueError`` on an invalid or inconsistent recipe (before any model is touched)."""
        if self.rotation is not None:
            self.rotation.validate()
        if self.quant is not None:
            self.quant.validate()
        if self.qat is not None:
            self.qat.validate()
        if self.ptq not in PTQ_ALGORITHMS:
            raise ValueError(f"ptq must be one of {PTQ_ALGORITHMS}, got {self.ptq!r}")
        if self.ptq != "none" and (self.quant is None or self.quant.weight is None):
            raise ValueError(f"ptq={self.ptq!r} needs quantized weights (quant.weight)")
        if self.ptq != "none" and self.qat is not None:
            raise ValueError("a recipe is PTQ (ptq='rtn'/'gptq') or QAT (qat set), not both")
        if self.qat is not None and self.quant is None:
            raise ValueError("qat needs a quantization (quant) to train")
        if self.qat is not None and self.qat.gptq_start and (self.quant.weight is None
                                                             or self.quant.weight.range_mode != "static"):
            raise ValueError("qat.gptq_start (GPTQ on the quantizer's grid, then QAT) needs quantized weights with "
                             "range_mode='static' (e.g. range_mode: static in the QAT recipe's quant.weight)")

    @property
    def label(self) -> str:
        """The setting's name: ``W2A4KV4`` ... or ``FP``."""
        return "FP" if self.quant is None else self.quant.label


@dataclass(frozen=True)
class Budget:
    """How much a profile gives a recipe (what a recipe file leaves open): the weight group (``group_size``, a divisor
    of every layer input of the profile's model; a recipe's own ``group_size`` wins), the ``seed`` (R1 signs, QAT data
    order) and the QAT budget: ``steps`` optimizer steps of ``batch_size`` x ``grad_accum`` windows of ``seqlen``
    tokens, validation every ``val_every`` steps (:meth:`rcp_lib.profiles.Profile.budget`)."""

    group_size: int
    seed: int = 0
    steps: int = 40
    seqlen: int = 256
    batch_size: int = 1
    grad_accum: int = 1
    val_every: int = 20


def _resolve_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO_ROOT / p


@functools.lru_cache(maxsize=64)
def _read_yaml(path: str, mtime_ns: int) -> Any:
    import yaml

    return yaml.safe_load(Path(path).read_text())


def _yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML file (relative paths: from the checkout); a copy (the parsed file is cached)."""
    import copy

    p = _resolve_path(path)
    if not p.is_file():
        raise FileNotFoundError(f"recipe file {p} does not exist (see {RECIPES_DIR})")
    d = _read_yaml(str(p), p.stat().st_mtime_ns)
    if not isinstance(d, dict):
        raise ValueError(f"recipe file {p} is not a mapping")
    return copy.deepcopy(d)


def _check_keys(where: str, d: dict[str, Any], known: set[str] | tuple[str, ...]) -> None:
    unknown = set(d) - set(known)
    if unknown:
        raise ValueError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(known)}")


@dataclass(frozen=True)
class QATRecipe:
    """How the QAT rows of a profile train (:attr:`rcp_lib.profiles.Profile.qat_recipe`): :class:`QATConfig` fields
    (``qat``: learning rates, gradient clip, precision, Block-AP, GPTQ start ...) and the start fields of the weight
    quantizer (``weight``: :data:`QAT_WEIGHT_FIELDS`, applied per row by :meth:`weight_for`). The budget is not part
    of it: :meth:`config` takes it from a :class:`Budget`."""

    qat: dict[str, Any] = field(default_factory=dict)
    weight: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "QATRecipe":
        """The ``qat`` section and the :data:`QAT_WEIGHT_FIELDS` of ``quant.weight`` of a file (relative to the checkout;
        a run config such as ``configs/paper-llama2-7b.yaml`` qualifies: its other sections and weight fields, which
        describe its own run, are not read, and its :data:`BUDGET_FIELDS` give way to the profile's), then ``overrides`` in the same layout (``{"qat": {...}, "quant": {"weight":
        {...}}}``, e.g. a recipe sweep's point: :attr:`rcp_lib.profiles.Profile.qat_overrides`), field by field."""
        d = _yaml(path)
        qat = dict(d.get("qat") or {})
        weight = {k: v for k, v in ((d.get("quant") or {}).get("weight") or {}).items() if k in QAT_WEIGHT_FIELDS}
        _check_keys(f"{path}: qat", qat, {f.name for f in fields(QATConfig)})
        o = overrides or {}
        _check_keys("QAT recipe overrides", o, ("qat", "quant"))
        _check_keys("QAT recipe overrides: quant", o.get("quant") or {}, ("weight",))
        o_qat, o_weight = dict(o.get("qat") or {}), dict((o.get("quant") or {}).get("weight") or {})
        _check_keys("QAT recipe overrides: qat", o_qat, {f.name for f in fields(QATConfig)})
        _check_keys("QAT recipe overrides: quant.weight (start fields only)", o_weight, QAT_WEIGHT_FIELDS)
        return cls(qat={**qat, **o_qat}, weight={**weight, **o_weight})

    def config(self, budget: Budget, **extra: Any) -> QATConfig:
        """The :class:`QATConfig` of these fields with ``budget``'s steps, seqlen, batch, accumulation, validation
        interval and seed; ``warmup_steps`` (default 10) is capped at a tenth of the steps and ``checkpoint_every``
        (default: the validation interval) at the steps. ``extra``: a method's own fields on top (``freeze``)."""
        base = QATConfig.from_dict(self.qat)
        steps = budget.steps
        ckpt = base.checkpoint_every if "checkpoint_every" in self.qat else budget.val_every
        q = replace(base, steps=steps, seqlen=budget.seqlen, batch_size=budget.batch_size, grad_accum=budget.grad_accum,
                    val_every=budget.val_every, warmup_steps=min(base.warmup_steps, steps // 10),
                    checkpoint_every=min(ckpt, steps), seed=budget.seed)
        return replace(q, **coerce_fields(QATConfig, extra))

    def weight_for(self, weight: dict[str, Any]) -> dict[str, Any]:
        """The start fields that apply to a QAT row with these weight fields: clip fields only with LWC, LDP fields
        only with LDP levels, ``range_mode`` always."""
        lwc = weight.get("lwc", True)
        ldp = weight.get("method", "ldp") == "ldp"
        return {k: v for k, v in self.weight.items()
                if (k not in CLIP_FIELDS or lwc) and (k not in LDP_FIELDS or ldp)}


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """A named recipe file (``configs/recipes/<method>.yaml``): ``name``, ``family`` (``baseline`` / ``ptq`` /
    ``qat``), ``rotation`` (``{r1: <kind>}`` or null; R2-R4 on, the block of a block kind is the weight group, the
    seed the budget's), ``quant`` (``{weight: {...}}``: WeightQuantConfig fields on top of the setting's preset, or
    null for the full-precision model), ``ptq`` and ``qat`` (present for a QAT method: its own QATConfig fields on top
    of the profile's QAT recipe, e.g. ``freeze``). Returns ``{"name", "family", "r1", "weight", "ptq", "qat" (bool),
    "qat_fields", "full_precision"}``; unknown or malformed sections raise ValueError."""
    d = _yaml(path)
    where = f"recipe file {path}"
    _check_keys(where, d, ("name", "family", "rotation", "quant", "ptq", "qat"))
    if not isinstance(d.get("name"), str) or d.get("family") not in FAMILIES:
        raise ValueError(f"{where}: needs a name and a family among {FAMILIES}")
    rot = d.get("rotation")
    if rot is not None:
        _check_keys(f"{where}: rotation (r1 only: its block is the weight group, its seed the profile's)", rot, ("r1",))
    quant = d.get("quant", {})
    if quant is not None:
        _check_keys(f"{where}: quant (weight only: act and kv are the setting's)", quant, ("weight",))
        _check_keys(f"{where}: quant.weight", quant.get("weight") or {}, {f.name for f in fields(WeightQuantConfig)})
    qat = d.get("qat")
    if qat is not None:
        _check_keys(f"{where}: qat (no budget field: {', '.join(BUDGET_FIELDS)} are the profile's)", qat,
                    {f.name for f in fields(QATConfig)} - set(BUDGET_FIELDS))
    return {"name": d["name"], "family": d["family"], "r1": None if rot is None else rot.get("r1"),
            "weight": dict((quant or {}).get("weight") or {}), "ptq": d.get("ptq", "none"), "qat": "qat" in d,
            "qat_fields": dict(qat or {}), "full_precision": quant is None}


def resolve(r1: str | None, weight: dict[str, Any], ptq: str, qat_fields: dict[str, Any] | None, setting: str,
            budget: Budget, qat_recipe: QATRecipe | None = None) -> Recipe:
    """The full recipe: ``setting``'s preset (``"FP"``: none) with ``budget``'s weight group and the method's
    ``weight`` fields (for a QAT method also the start fields of ``qat_recipe`` that apply to it); the R1 of kind
    ``r1`` (R2-R4 on) seeded with the budget's seed, a block-diagonal R1 (GSR and its block-Hadamard control) with
    blocks of the weight group (our reading of GSR); for a QAT method (``qat_fields`` not None) ``qat_recipe``'s
    QATConfig with the budget, and ``qat_fields`` on top. Validated."""
    g = budget.group_size
    rot = None if r1 is None else RotationConfig(r1=r1, r1_block=g if r1 in BLOCK_KINDS else None, seed=budget.seed)
    qat = None
    if qat_fields is not None:
        if qat_recipe is None:
            raise ValueError("a QAT method needs a QAT recipe (a profile's qat_recipe, e.g. configs/recipes/qat/cpu.yaml)")
        weight = {**weight, **qat_recipe.weight_for(weight)}
        qat = qat_recipe.config(budget, **qat_fields)
    quant = None if setting == "FP" else preset(setting, w_group_size=g).with_weight(**weight)
    recipe = Recipe(rotation=rot, quant=quant, ptq=ptq, qat=qat)
    recipe.validate()
    return recipe
