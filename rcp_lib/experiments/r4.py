"""What a power-of-two R4 block costs (issue 36, "a power-of-two or fused factor R4"): the fused W2A4 pre-kernel
runs R4 (the online Hadamard on down_proj's input) only for the orders of
:func:`rcp_lib.kernels.triton_w2a4.hadamard_supported`; LLaMA-2-7B's MLP width 11008 = 172 · 64 is not one of them
(its rows would need a 256 × 256 mixing operand), so a deployment either keeps a torch transform in front of the
pre-kernel or trains with a block-diagonal R4 of power-of-two blocks (``RotationConfig.r4_block``), which the
pre-kernel runs. This table measures what the blocks cost where R4 acts on activations:

:func:`r4_blocks` scores the FP model rotated as every row (QuaRot's seeded R1, R2, R3) with R4 the full Hadamard of
the MLP width or block-diagonal with each block of :data:`R4_BLOCKS` that divides it, at W16A4KV16 (weights in full
precision: the R4 rotation folded into down_proj's weight changes nothing there; only the 4-bit quantization of
down_proj's input sees the block), once per seed of ``profile.ablation_seeds`` (the seed sets R1's signs; R4 has
none), on the profile's test windows. One cached row each (``results/<profile>/r4_blocks.csv``); orders come from
seed-paired t-tests against the full R4 in the report.
"""

from __future__ import annotations

import copy
from dataclasses import replace

from ..io import provenance
from ..profiles import Profile
from ..quant.apply import preset, quantize_model
from ..rotation.fuse import RotationConfig, rotate_model
from .rows import cached_row, eval_key

#: the R4 blocks compared with the full Hadamard (None): the powers of two the pre-kernel runs without mixing rows
#: (<= 128) and one that mixes rows (512); a block that does not divide the MLP width is skipped
R4_BLOCKS: tuple[int | None, ...] = (None, 512, 256, 128, 64)
#: the label of the full R4 (the reference of the table's tests)
FULL = "full Hadamard"


def _label(block: int | None) -> str:
    return FULL if block is None else f"blocks of {block}"


def _setup(block: int | None, profile: Profile) -> tuple[RotationConfig, object]:
    return RotationConfig(r1="random_hadamard", r4=True, r4_block=block, seed=profile.seed), preset("W16A4KV16")


def _key(rotation: RotationConfig, quant, profile: Profile) -> dict:
    return eval_key("r4-blocks", rotation, quant, profile)


def r4_block_sizes(profile: Profile, blocks: tuple[int | None, ...] = R4_BLOCKS) -> list[int | None]:
    """The blocks of ``blocks`` that divide the MLP width of the profile's model (None, the full R4, always)."""
    from ..models import model_dims

    inter = model_dims(profile.model).intermediate
    return [b for b in blocks if b is None or (b < inter and inter % b == 0)]


def r4_plan(profile: Profile, blocks: tuple[int | None, ...] = R4_BLOCKS) -> list[tuple[int, str, dict]]:
    """The rows :func:`r4_blocks` reads or computes, in its order: ``(seed, label, cache key)``; nothing computed."""
    sizes = r4_block_sizes(profile, blocks)
    seeded = [replace(profile, seed=int(s)) for s in profile.ablation_seeds]
    return [(p.seed, _label(b), _key(*_setup(b, p), p)) for p in seeded for b in sizes]


def r4_blocks(profile: Profile, progress: bool = True, blocks: tuple[int | None, ...] = R4_BLOCKS) -> list[dict]:
    """One row per (seed, R4) of :func:`r4_plan` (module docstring): ``method`` (the R4's label), ``r4_block``,
    ``seed``, ``ppl`` (W16A4KV16 on the profile's test windows), the rotation and provenance."""
    from .build import _test_ppl, base_model

    sizes = r4_block_sizes(profile, blocks)  # before any model is touched
    rows = []
    for seed in profile.ablation_seeds:
        p = replace(profile, seed=int(seed))
        for b in sizes:
            rot, quant = _setup(b, p)

            def compute(rot=rot, quant=quant, p=p) -> dict:
                model = copy.deepcopy(base_model(p)[0]).float()
                rotate_model(model, rot)
                quantize_model(model, quant)
                return {"ppl": _test_ppl(model, p, progress)}

            row = cached_row("r4", _key(rot, quant, p), compute)
            rows.append({"method": _label(b), "r4_block": b, "setting": "W16A4KV16", "seed": int(seed),
                         "ppl": row["ppl"], "rotation": rot.to_dict()})
    prov = provenance()
    return [{**r, **prov} for r in rows]
