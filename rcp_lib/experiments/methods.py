"""The named methods of the paper's tables, each defined once (:data:`NAMED`), and the :class:`Recipe` each one is
for a profile (:meth:`Method.recipe`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..profiles import Profile
from ..qat import QATConfig
from ..quant.apply import preset
from ..recipe import Recipe
from ..rotation.fuse import BLOCK_KINDS, RotationConfig

# Uniform baselines get QuaRot's weight clip search (--w_clip: per row and group, |e|^2.4 over r = 1.00 ... 0.20),
# in RTN and inside GPTQ, as their authors tune them. RCP's quantizer: LDP levels on an LWC range.
RTN_W: dict[str, Any] = {"method": "rtn", "lwc": False, "clip_search": "mse"}
RCP_W: dict[str, Any] = {"method": "ldp", "lwc": True}


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
        qat: trained with the profile's QAT budget (:func:`qat_config`).
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
        """The full recipe for ``profile``: the setting's preset with the profile's weight group size and the
        method's weight fields (for QAT rows also the profile's ``qat_weight`` fields that apply to it); the rotation seeded with the profile's seed, a block-diagonal R1 (GSR and its
        block-Hadamard control) with blocks of the weight group (our reading of GSR); the profile's QAT budget."""
        g = profile.w_group_size
        rot = None if self.r1 is None else RotationConfig(
            r1=self.r1, r1_block=g if self.r1 in BLOCK_KINDS else None, seed=profile.seed)
        weight = {**self.weight, **(_qat_weight_fields(self.weight, profile.qat_weight) if self.qat else {})}
        quant = None if self.setting == "FP" else preset(self.setting, w_group_size=g).with_weight(**weight)
        qat = None
        if self.qat:
            from dataclasses import replace

            qat = replace(qat_config(profile), **self.qat_fields)
        recipe = Recipe(rotation=rot, quant=quant, ptq=self.ptq, qat=qat)
        recipe.validate()
        return recipe

    def rotation_config(self, profile: Profile) -> RotationConfig | None:
        """``recipe(profile).rotation``."""
        return self.recipe(profile).rotation


# profile.qat_weight fields that need a learnable clip (LWC); range_mode applies to every row ("static" without LWC:
# the range fixed where it starts, so that a "w/o Clip" row can take a GPTQ start too)
CLIP_FIELDS = ("clip_init", "lwc_init", "range_param")
LDP_FIELDS = ("ldp_init", "ldp_granularity", "lloyd_iters")  # ... that need LDP levels


def _qat_weight_fields(weight: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``profile.qat_weight`` that apply to a QAT row with these weight fields: clip fields only with
    LWC (a "w/o Clip" row has no clip to initialise), LDP fields only with LDP levels, any other field (``range_mode``
    included) always."""
    lwc = weight.get("lwc", True)
    ldp = weight.get("method", "ldp") == "ldp"
    return {k: v for k, v in extra.items() if (k not in CLIP_FIELDS or lwc) and (k not in LDP_FIELDS or ldp)}


def _m(name: str, family: str, r1: str | None = None, weight: dict[str, Any] | None = None, ptq: str = "none",
       qat: bool = False, qat_fields: dict[str, Any] | None = None) -> Method:
    return Method(name, "FP", family, r1, dict(weight or {}), ptq, qat, dict(qat_fields or {}))


# The one definition of every named method (the setting is given when a row is made, see :func:`method`).
NAMED: dict[str, Method] = {m.name: m for m in (
    _m("FP", "baseline"),
    _m("RTN", "ptq", None, RTN_W, "rtn"),
    _m("QuaRot-RTN", "ptq", "random_hadamard", RTN_W, "rtn"),
    _m("QuaRot-GPTQ", "ptq", "random_hadamard", RTN_W, "gptq"),
    _m("GSR-GPTQ", "ptq", "gsr", RTN_W, "gptq"),
    # The control of GSR: the same blocks with the rows in natural Hadamard order (separates sequency order from the
    # block-diagonal structure; at block == group the two differ only by a permutation inside each group).
    _m("BlockHadamard-GPTQ", "ptq", "block_hadamard", RTN_W, "gptq"),
    _m("RCP", "qat", "random_hadamard", RCP_W, qat=True),
    # RCP without Partition = the fair rival: uniform-grid QAT with a learnable range (scale and zero point,
    # EfficientQAT-style), the same start procedure, budget and learning rates; at group 32 it stores the bits LDP
    # stores at group 64 (3.0 per weight)
    _m("Uniform-QAT", "qat", "random_hadamard", {"method": "rtn", "lwc": True}, qat=True),
    _m("Uniform-QAT g32", "qat", "random_hadamard", {"method": "rtn", "lwc": True, "group_size": 32}, qat=True),
    _m("RCP w/o Rotate", "qat", None, RCP_W, qat=True),
    _m("RCP w/o Clip", "qat", "random_hadamard", {"method": "ldp", "lwc": False}, qat=True),
    _m("RCP+GSR", "qat", "gsr", RCP_W, qat=True),
    _m("RCP+BlockHadamard", "qat", "block_hadamard", RCP_W, qat=True),
    # what training each part of RCP buys: the same run with a part left at its (GPTQ) start
    _m("RCP levels frozen", "qat", "random_hadamard", RCP_W, qat=True, qat_fields={"freeze": ["levels"]}),
    _m("RCP clip frozen", "qat", "random_hadamard", RCP_W, qat=True, qat_fields={"freeze": ["clip"]}),
    # QuaRot-GPTQ with each group's range fixed at the start (static groups), as RCP's GPTQ start keeps it
    _m("QuaRot-GPTQ static", "ptq", "random_hadamard", {**RTN_W, "range_mode": "static"}, "gptq"),
)}
PTQ_ROWS = ("RTN", "QuaRot-RTN", "QuaRot-GPTQ", "QuaRot-GPTQ static", "GSR-GPTQ")
#: QAT rows of every setting besides RCP: the fair rival (uniform grid, same start, budget and learning rates)
QAT_BASELINES = ("Uniform-QAT",)
#: at W2A4KV4 also the uniform grid at the bits LDP stores at the profile's group (group 32: 3.0 bits, as LDP at 64)
EQUAL_BITS = ("Uniform-QAT g32",)
ABLATIONS = ("RCP levels frozen", "RCP clip frozen", "RCP w/o Rotate", "RCP w/o Clip", "RCP+GSR", "RCP+BlockHadamard")
CONTROL_SETTINGS = ("W2A4KV4", "W2A16KV16")  # settings that also get the block-Hadamard control rows


def method(name: str, setting: str = "W2A4KV4") -> Method:
    """The named method ``name`` (a key of :data:`NAMED`) at ``setting`` (FP is always at ``"FP"``)."""
    if name not in NAMED:
        raise ValueError(f"unknown method {name!r}; named methods: {sorted(NAMED)}")
    m = NAMED[name]
    return Method(m.name, "FP" if name == "FP" else setting, m.family, m.r1, m.weight, m.ptq, m.qat, m.qat_fields)


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
#: leave them to the ``ablation`` profile, which runs each with several seeds (RCP+GSR stays: a method of its own)
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


def qat_config(profile: Profile) -> QATConfig:
    """The QAT recipe of a profile (the same budget and learning rates for every QAT row).

    With ``profile.qat_recipe`` (the ``paper`` profile: ``configs/paper-llama2-7b.yaml``) the ``qat`` section of that
    run config, with the profile's budget fields (steps, seqlen, batch, accumulation, validation interval; warm-up and
    checkpoint interval capped by the steps): one recipe for the notebooks and ``accelerate launch``. Otherwise built
    from the profile's fields (budget, learning rates, gradient clip, precision, Block-AP, GPTQ start).
    """
    if profile.qat_recipe is not None:
        from dataclasses import replace

        base = paper_qat_recipe(profile.qat_recipe)
        steps = profile.qat_steps
        return replace(base, steps=steps, seqlen=profile.qat_seqlen, batch_size=profile.qat_batch_size,
                       grad_accum=profile.qat_grad_accum, val_every=profile.qat_val_every,
                       warmup_steps=min(base.warmup_steps, steps // 10), checkpoint_every=min(base.checkpoint_every, steps),
                       seed=profile.seed)
    return QATConfig(steps=profile.qat_steps, seqlen=profile.qat_seqlen, batch_size=profile.qat_batch_size,
                     grad_accum=profile.qat_grad_accum, val_every=profile.qat_val_every,
                     checkpoint_every=max(1, min(profile.qat_val_every, profile.qat_steps)),
                     warmup_steps=max(0, min(10, profile.qat_steps // 10)), seed=profile.seed,
                     lr_weights=profile.qat_lr_weights, lr_quant=profile.qat_lr_quant, lr_range=profile.qat_lr_range,
                     grad_clip=profile.qat_grad_clip,
                     mixed_precision=profile.qat_mixed_precision, teacher_precision=profile.qat_teacher_precision,
                     block_ap_steps=profile.qat_block_ap_steps, block_ap_samples=profile.qat_block_ap_samples,
                     block_ap_lr_weights=profile.qat_block_ap_lr_weights,
                     block_ap_lr_quant=profile.qat_block_ap_lr_quant, gptq_start=profile.qat_gptq_start)


def paper_qat_recipe(path: str) -> QATConfig:
    """The ``qat`` section of a run config file (``path`` relative to the checkout, or absolute)."""
    from pathlib import Path

    from ..paths import REPO_ROOT
    from ..run_config import RunConfig

    p = Path(path)
    return RunConfig.load(p if p.is_absolute() else REPO_ROOT / p).recipe.qat
