"""The named methods of the paper's tables (one :class:`Method` per row) and the recipes a profile implies."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..profiles import Profile
from ..qat import QATConfig
from ..quant.apply import QuantConfig, preset
from ..rotation.fuse import BLOCK_KINDS, RotationConfig


@dataclass
class Method:
    """One row of the paper's tables: how a model is rotated, quantized, and calibrated or trained."""

    name: str
    setting: str = "FP"  # full precision, or W2A4KV4 ...
    rotation: dict | None = None  # RotationConfig fields, None = no rotation
    quant: dict | None = None  # QuantConfig overrides on top of the setting preset; None with setting FP16
    ptq: str = "none"  # none | rtn | gptq
    qat: bool = False
    family: str = "baseline"  # baseline | ptq | qat

    def rotation_config(self, profile: Profile) -> RotationConfig | None:
        """The method's rotation for a profile: seeded with the profile's seed; a block-diagonal R1 (GSR and its
        block-Hadamard control) without an explicit block gets the profile's weight group size (our reading of
        GSR: its blocks match the weight quantization group)."""
        if self.rotation is None:
            return None
        r = {"seed": profile.seed, **self.rotation}
        if r.get("r1") in BLOCK_KINDS and r.get("r1_block") is None:
            r["r1_block"] = profile.w_group_size
        return RotationConfig(**r)

    def quant_config(self, profile: Profile) -> QuantConfig | None:
        """The setting's preset with the profile's weight group size and the method's overrides (None for FP)."""
        if self.setting == "FP":
            return None
        return preset(self.setting, w_group_size=profile.w_group_size, **(self.quant or {}))

    def to_dict(self) -> dict:
        return asdict(self)


QUAROT = {"r1": "random_hadamard", "r2": True, "r3": True, "r4": True}
GSR = {"r1": "gsr", "r2": True, "r3": True, "r4": True}  # r1_block: the profile's group size (Method.rotation_config)
# The control of GSR: the same blocks with the rows in natural Hadamard order (separates sequency order from the
# block-diagonal structure; at block == group the two differ only by a permutation inside each group).
BLOCK_HAD = {"r1": "block_hadamard", "r2": True, "r3": True, "r4": True}
# Uniform baselines get QuaRot's weight clip search (--w_clip: per row and group, |e|^2.4 over r = 1.00 ... 0.20),
# in RTN and inside GPTQ, as their authors tune them.
RTN_Q = {"w_method": "rtn", "w_lwc": False, "w_clip_search": "mse"}
CONTROL_SETTINGS = ("W2A4KV4", "W2A16KV16")  # settings that also get the block-Hadamard control rows


def ptq_methods(settings: list[str]) -> list[Method]:
    """FP, RTN without rotation, QuaRot-style (random Hadamard R1-R4) + RTN / + GPTQ, GSR R1 + GPTQ, and the
    block-Hadamard + GPTQ control of GSR at the 2-bit settings. Every uniform baseline uses the clip search."""
    rows = [Method("FP", family="baseline")]
    for s in settings:
        rows += [
            Method("RTN", s, None, RTN_Q, "rtn", family="ptq"),
            Method("QuaRot-RTN", s, QUAROT, RTN_Q, "rtn", family="ptq"),
            Method("QuaRot-GPTQ", s, QUAROT, RTN_Q, "gptq", family="ptq"),
            Method("GSR-GPTQ", s, GSR, RTN_Q, "gptq", family="ptq"),
        ]
        if s in CONTROL_SETTINGS:
            rows.append(Method("BlockHadamard-GPTQ", s, BLOCK_HAD, RTN_Q, "gptq", family="ptq"))
    return rows


def qat_methods(settings: list[str]) -> list[Method]:
    """RCP and its ablations, all through the same QAT loop (our reconstruction; see README)."""
    rcp_q = {"w_method": "ldp", "w_lwc": True}
    rows = []
    for s in settings:
        if s == "W2A4KV4":
            rows += [
                Method("RCP", s, QUAROT, rcp_q, qat=True, family="qat"),
                Method("RCP w/o Partition (LWC+uniform)", s, QUAROT, {"w_method": "rtn", "w_lwc": True}, qat=True, family="qat"),
                Method("RCP w/o Rotate", s, None, rcp_q, qat=True, family="qat"),
                Method("RCP w/o Clip", s, QUAROT, {"w_method": "ldp", "w_lwc": False}, qat=True, family="qat"),
                Method("RCP+GSR", s, GSR, rcp_q, qat=True, family="qat"),
                Method("RCP+BlockHadamard", s, BLOCK_HAD, rcp_q, qat=True, family="qat"),
            ]
        else:
            rows.append(Method("RCP", s, QUAROT, rcp_q, qat=True, family="qat"))
    return rows


def all_methods(profile: Profile) -> list[Method]:
    """Every row of the tables for the profile's settings (PTQ rows, then QAT rows), restricted to
    ``profile.methods`` when it is set."""
    ms = ptq_methods(profile.settings) + qat_methods(profile.settings)
    return ms if profile.methods is None else [m for m in ms if m.name in profile.methods]


def qat_config(profile: Profile) -> QATConfig:
    """The QAT recipe of a profile (the same budget for every QAT row)."""
    return QATConfig(steps=profile.qat_steps, seqlen=profile.qat_seqlen, batch_size=profile.qat_batch_size,
                     grad_accum=profile.qat_grad_accum, val_every=profile.qat_val_every,
                     checkpoint_every=max(1, min(profile.qat_val_every, profile.qat_steps)),
                     warmup_steps=max(0, min(10, profile.qat_steps // 10)), seed=profile.seed)
