"""The named methods of the paper's tables, each defined once, by its recipe file (``configs/recipes/*.yaml``,
:data:`NAMED`), and the :class:`Recipe` each one is for a profile (:meth:`Method.recipe`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..profiles import Profile
from ..qat import QATConfig
from ..recipe import RECIPES_DIR, QATRecipe, Recipe, read_recipe_file, resolve
from ..rotation.fuse import RotationConfig


@dataclass(frozen=True)
class Method:
    """One row of the paper's tables: a named recipe at a setting, resolved against a profile by :meth:`recipe`.

    Attributes:
        name: the row's name (a key of :data:`NAMED` for the table rows).
        setting: ``"FP"`` (no quantization) or a preset name (``"W2A4KV4"`` ...).
        family: ``"baseline"``, ``"ptq"`` or ``"qat"`` (the table section).
        r1: the R1 kind (``"random_hadamard"``: QuaRot, ``"gsr"``, ``"block_hadamard"``), R2-R4 on; None: no rotation.
        weight: :class:`~rcp_lib.quant.quantizers.WeightQuantConfig` fields on top of the setting's preset.
        ptq: ``"none"``, ``"rtn"`` or ``"gptq"``.
        qat: trained with the profile's QAT recipe and budget (:func:`qat_config`).
        qat_fields: :class:`~rcp_lib.qat.QATConfig` fields on top of the profile's (e.g. ``{"freeze": ["levels"]}``).
    """

    name: str
    setting: str = "FP"
    family: str = "baseline"
    r1: str | None = None
    weight: dict[str, Any] = field(default_factory=dict, hash=False)
    ptq: str = "none"
    qat: bool = False
    qat_fields: dict[str, Any] = field(default_factory=dict, hash=False)

    def recipe(self, profile: Profile) -> Recipe:
        """The full recipe for ``profile`` (:func:`rcp_lib.recipe.resolve`): the setting's preset with the profile's
        weight group and the method's weight fields (for QAT rows also the start fields of the profile's QAT recipe
        that apply to it); the rotation seeded with the profile's seed, a block-diagonal R1 (GSR and its
        block-Hadamard control) with blocks of the weight group; the profile's QAT recipe with its budget."""
        return resolve(self.r1, self.weight, self.ptq, dict(self.qat_fields) if self.qat else None, self.setting,
                       profile.budget, profile_qat_recipe(profile) if self.qat else None)

    def rotation_config(self, profile: Profile) -> RotationConfig | None:
        """``recipe(profile).rotation``."""
        return self.recipe(profile).rotation


def _recipe_files(folder: Path = RECIPES_DIR) -> list[dict[str, Any]]:
    """The recipe files ``folder/*.yaml`` (:func:`rcp_lib.recipe.read_recipe_file`); two naming one method raise."""
    files = [read_recipe_file(p) for p in sorted(folder.glob("*.yaml"))]
    names = [d["name"] for d in files]
    if len(set(names)) != len(names) or not files:
        raise ValueError(f"the recipe files of {folder} must name distinct methods, got {names}")
    return files


_FILES = _recipe_files()
# The one definition of every named method (the setting is given when a row is made, see :func:`method`).
NAMED: dict[str, Method] = {d["name"]: Method(d["name"], "FP", d["family"], d["r1"], d["weight"], d["ptq"], d["qat"],
                                              d["qat_fields"]) for d in _FILES}
_FULL_PRECISION = frozenset(d["name"] for d in _FILES if d["full_precision"])  # always at setting "FP"

# which named methods the tables hold, and where
PTQ_ROWS = ("RTN", "QuaRot-RTN", "QuaRot-GPTQ", "QuaRot-GPTQ static", "GSR-GPTQ")
#: QAT rows of every setting besides RCP: the fair rival (uniform grid, same start, budget and learning rates)
QAT_BASELINES = ("Uniform-QAT",)
#: at W2A4KV4 also the uniform grid at the bits LDP stores at the profile's group (group 32: 3.0 bits, as LDP at 64)
EQUAL_BITS = ("Uniform-QAT g32",)
#: PTQ rows the ``ablation`` profile also runs once per seed (the seed sets the R1 signs and the calibration windows),
#: so that "RCP below the best PTQ row" is decided by a test over seeds, not read off one run each
SEEDED_PTQ = ("QuaRot-GPTQ", "QuaRot-GPTQ static")
ABLATIONS = ("RCP levels frozen", "RCP clip frozen", "RCP w/o Rotate", "RCP w/o Clip", "RCP+GSR", "RCP+BlockHadamard")
CONTROL_SETTINGS = ("W2A4KV4", "W2A16KV16")  # settings that also get the block-Hadamard control rows


def method(name: str, setting: str = "W2A4KV4") -> Method:
    """The named method ``name`` (a key of :data:`NAMED`) at ``setting`` (FP is always at ``"FP"``)."""
    if name not in NAMED:
        raise ValueError(f"unknown method {name!r}; named methods: {sorted(NAMED)}")
    m = NAMED[name]
    return Method(m.name, "FP" if name in _FULL_PRECISION else setting, m.family, m.r1, m.weight, m.ptq, m.qat,
                  m.qat_fields)


def ptq_methods(settings: list[str]) -> list[Method]:
    """FP, RTN without rotation, QuaRot-style (random Hadamard R1-R4) + RTN / + GPTQ, GSR R1 + GPTQ, and the
    block-Hadamard + GPTQ control of GSR at the 2-bit settings. Every uniform baseline uses the clip search."""
    rows = [method("FP")]
    for s in settings:
        rows += [method(n, s) for n in PTQ_ROWS]
        if s in CONTROL_SETTINGS:
            rows.append(method("BlockHadamard-GPTQ", s))
    return rows


#: ablation rows whose order needs seeds: with ``Profile.qat_ablation_rows=False`` (the ``cpu`` profile) the tables
#: leave them to the ``ablation`` profile, which runs each with several seeds (RCP+GSR is not one: a method of its own,
#: which the cpu profile leaves out by name, rcp_lib.profiles.CPU_METHODS)
SEEDED_ABLATIONS = ("RCP levels frozen", "RCP clip frozen", "RCP w/o Rotate", "RCP w/o Clip", "RCP+BlockHadamard")


def qat_methods(settings: list[str], ablations: bool = True) -> list[Method]:
    """RCP at every setting and its ablations at W2A4KV4, all through the same QAT loop (our reconstruction);
    ``ablations=False`` leaves out :data:`SEEDED_ABLATIONS`."""
    abl = ABLATIONS if ablations else tuple(n for n in ABLATIONS if n not in SEEDED_ABLATIONS)
    return [method(n, s) for s in settings
            for n in ("RCP",) + QAT_BASELINES + (EQUAL_BITS + abl if s == "W2A4KV4" else ())]


def all_methods(profile: Profile) -> list[Method]:
    """Every row of the tables for the profile's settings (PTQ rows, then QAT rows), restricted to
    ``profile.methods`` when it is set."""
    ms = ptq_methods(profile.settings) + qat_methods(profile.settings, profile.qat_ablation_rows)
    return ms if profile.methods is None else [m for m in ms if m.name in profile.methods]


def profile_qat_recipe(profile: Profile) -> QATRecipe:
    """The QAT recipe of a profile's QAT rows: the file ``profile.qat_recipe`` with ``profile.qat_overrides`` on top
    (:meth:`rcp_lib.recipe.QATRecipe.load`)."""
    return QATRecipe.load(profile.qat_recipe, profile.qat_overrides)


def qat_config(profile: Profile) -> QATConfig:
    """The QAT recipe of a profile with its budget (the same for every QAT row; a method's own fields, e.g. ``freeze``,
    go on top): the ``qat`` section of ``profile.qat_recipe`` (``configs/recipes/qat/cpu.yaml``; the ``paper``
    profile's ``configs/paper-llama2-7b.yaml``: one recipe for the notebooks and ``accelerate launch``) with the
    profile's steps, seqlen, batch, accumulation, validation interval and seed (warm-up and checkpoint interval capped
    by the steps, :meth:`rcp_lib.recipe.QATRecipe.config`)."""
    return profile_qat_recipe(profile).config(profile.budget)

