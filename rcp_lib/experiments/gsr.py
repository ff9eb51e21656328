"""GSR, decided (issue "RCP as the paper describes it", item 5): where GSR's deficit at W2A4KV4 comes from.

:func:`gsr_decision` computes two parts, one cached row each (``results/<profile>/gsr_decision.csv``):

* ``activations``: the model with weights in full precision and per-token 4-bit activations (W16A4KV16), for each
  R1 of :data:`ACTIVATION_R1`: QuaRot's random Hadamard and GSR's sequency-ordered Walsh blocks with random signs
  (both seeded), and the deterministic full Hadamard and GSR without signs. A
  block-diagonal R1 spreads an outlier channel over one block only, while the per-token scale of a 4-bit activation
  spans the whole hidden size: this part measures that effect alone (no weight is quantized).
* ``weights``: 2-bit weights, 16-bit activations (W2A16KV16, GSR's own setting), GPTQ with the clip search as the PTQ
  rows, blocks of ``block`` and weight groups smaller than the block: GSR against its control (same blocks, natural
  order). With group = block (the tables' rows) the two differ by a permutation inside each group, which per-group
  quantizers cannot see; with smaller groups the sequency order decides which columns share a group.

Every row is seeded (``profile.ablation_seeds``: R1 signs where the R1 has them, calibration windows), so orders
come from t-tests over seeds (:func:`rcp_lib.experiments.ablation.separation`), p shown.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from ..io import provenance
from ..profiles import Profile
from ..quant.apply import preset, quantize_model
from ..rotation.fuse import RotationConfig, rotate_model
from .methods import method
from .rows import cached_row, eval_key

#: the activation part's R1s: (label, r1 kind, random signs, seeded). The block kinds use ``block``. GSR's blocks in
#: natural order (block-Hadamard) are left out: they permute the coordinates inside each block, which a per-token
#: quantizer over the whole hidden size cannot see (equal to GSR by construction; tests/test_gsr_decision.py checks
#: it). An R1 without random signs is deterministic: computed once (at the first seed; ``deterministic`` True), not
#: counted as seeds.
ACTIVATION_R1 = (("QuaRot (random Hadamard)", "random_hadamard", False, True),
                 ("GSR + random signs", "gsr", True, True),
                 ("Hadamard (natural order, no signs)", "hadamard", False, False),
                 ("GSR", "gsr", False, False))
#: the weight part's rows: GSR-GPTQ and its control at W2A16KV16
WEIGHT_METHODS = ("GSR-GPTQ", "BlockHadamard-GPTQ")


def _eval(model, profile: Profile, progress: bool) -> float:
    from .build import _test_ppl

    return _test_ppl(model, profile, progress)


def _key(part: str, rotation: RotationConfig, quant, profile: Profile, gptq: bool) -> dict:
    return eval_key(f"gsr-{part}", rotation, quant, profile, calib=gptq)


def _activation_setup(r1: str, signs: bool, block: int | None, profile: Profile):
    rot = RotationConfig(r1=r1, r1_block=block if r1 in ("gsr", "block_hadamard") else None, r1_random_signs=signs,
                         seed=profile.seed)
    return rot, preset("W16A4KV16")


def _weight_setup(name: str, group: int, block: int, profile: Profile):
    r = method(name, "W2A16KV16").recipe(profile)
    return replace(r.rotation, r1_block=block), r.quant.with_weight(group_size=group)


def _block_groups(profile: Profile, block: int | None, groups: tuple[int, ...] | None) -> tuple[int, tuple[int, ...]]:
    """The R1 block (default: the profile's weight group) and the weight part's groups (default:
    ``profile.gsr_weight_groups``); ValueError unless each group divides the block and is smaller than it."""
    block = block or profile.w_group_size
    groups = tuple(profile.gsr_weight_groups) if groups is None else tuple(groups)
    bad = [g for g in groups if g >= block or block % g]
    if bad:
        raise ValueError(f"weight groups {bad} must divide the R1 block {block} and be smaller than it")
    return block, groups


def decision_plan(profile: Profile, block: int | None = None,
                  groups: tuple[int, ...] | None = None) -> list[tuple[str, int, str, dict]]:
    """The rows :func:`gsr_decision` reads or computes, in its order: ``(part, seed, label, cache key)`` each (the key
    of :func:`rcp_lib.experiments.rows.row_cached` for kind "gsr"); nothing is computed."""
    block, groups = _block_groups(profile, block, groups)
    plan = []
    for i, seed in enumerate(profile.ablation_seeds):
        p = replace(profile, seed=int(seed))
        plan += [("activations", int(seed), label, _key("activations", *_activation_setup(r1, signs, block, p), p, False))
                 for label, r1, signs, seeded in ACTIVATION_R1 if seeded or i == 0]
        plan += [("weights", int(seed), f"{n} g{g}", _key("weights", *_weight_setup(n, g, block, p), p, True))
                 for g in groups for n in WEIGHT_METHODS]
    return plan


def activation_row(label: str, r1: str, signs: bool, block: int | None, profile: Profile,
                   progress: bool = True) -> dict:
    """Perplexity of the FP model rotated by one R1 (R2-R4 as in every row) with W16A4KV16 fake quantization, on the
    profile's test windows (cached)."""
    from .build import base_model

    rot, quant = _activation_setup(r1, signs, block, profile)

    def compute() -> dict:
        model = copy.deepcopy(base_model(profile)[0]).float()
        rotate_model(model, rot)
        quantize_model(model, quant)
        return {"ppl": _eval(model, profile, progress)}

    row = cached_row("gsr", _key("activations", rot, quant, profile, False), compute)
    return {"method": label, "part": "activations", "r1": r1, "setting": "W16A4KV16", "block": rot.r1_block, "w_group": None,
            "seed": profile.seed, "ppl": row["ppl"], "rotation": rot.to_dict()}


def weight_row(name: str, group: int, block: int, profile: Profile, progress: bool = True) -> dict:
    """Perplexity of a GSR-GPTQ / BlockHadamard-GPTQ row at W2A16KV16 with R1 blocks of ``block`` and weight groups of
    ``group`` (the recipe file's quantizer and GPTQ, the profile's calibration windows; cached)."""
    from ..quant.calibrate import gptq_model
    from .build import base_model, calibration

    rot, quant = _weight_setup(name, group, block, profile)

    def compute() -> dict:
        model = copy.deepcopy(base_model(profile)[0]).float()
        rotate_model(model, rot)
        quantize_model(model, quant)
        gptq_model(model, calibration(profile), progress=progress)
        return {"ppl": _eval(model, profile, progress)}

    row = cached_row("gsr", _key("weights", rot, quant, profile, True), compute)
    return {"method": f"{name} g{group}", "part": "weights", "r1": rot.r1, "setting": "W2A16KV16", "block": block, "w_group": group,
            "seed": profile.seed, "ppl": row["ppl"], "rotation": rot.to_dict()}


def gsr_decision(profile: Profile, progress: bool = True, parts: tuple[str, ...] = ("activations", "weights"),
                 block: int | None = None, groups: tuple[int, ...] | None = None) -> list[dict]:
    """Both parts (module docstring) for every seed of ``profile.ablation_seeds``: one row per (part, R1, group,
    seed) with ``ppl`` and provenance. ``block`` defaults to the profile's weight group (the tables' GSR block),
    ``groups`` to ``profile.gsr_weight_groups`` (none: no weight part)."""
    block, groups = _block_groups(profile, block, groups)  # validated before any model is touched
    rows = []
    for i, seed in enumerate(profile.ablation_seeds):
        p = replace(profile, seed=int(seed))
        if "activations" in parts:
            rows += [{**activation_row(label, r1, signs, block, p, progress), "deterministic": not seeded}
                     for label, r1, signs, seeded in ACTIVATION_R1 if seeded or i == 0]
        if "weights" in parts:
            rows += [{**weight_row(n, g, block, p, progress), "deterministic": False}
                     for g in groups for n in WEIGHT_METHODS]
    prov = provenance()
    return [{**r, **prov} for r in rows]
