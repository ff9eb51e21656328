"""Rotation impact (notebook 01): per-layer weight statistics of each analysis rotation, cached per rotation.

The statistics themselves are :mod:`rcp_lib.experiments.rotation_stats`; this module turns the profile's rotation specs
(``kind[:block][/g<group>]``) into its arguments and caches the rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..io import provenance
from ..profiles import Profile
from ..rotation.fuse import BLOCK_KINDS
from .build import base_model
from .rows import cached_row, code_key

if TYPE_CHECKING:
    import pandas as pd


def _parse_rotation(name: str) -> tuple[str, int | None, int | None]:
    """An analysis rotation spec ``kind[:block][/g<group>]`` -> (kind, block, group size).

    ``"hadamard"`` -> ("hadamard", None, None); ``"gsr:16"`` -> ("gsr", 16, None); ``"gsr:64/g16"`` ->
    ("gsr", 64, 16): Walsh blocks of 64 quantized in groups of 16 (a block larger than the group, where the
    sequency order inside a block can matter). None means: the block kinds use the group size as block, and the
    group size is the profile's ``w_group_size``.
    """
    spec, _, group = name.partition("/")
    kind, _, block = spec.partition(":")
    if group and not group.startswith("g"):
        raise ValueError(f"bad rotation spec {name!r}: expected kind[:block][/g<group>], e.g. 'gsr:64/g16'")
    try:
        return kind, int(block) if block else None, int(group[1:]) if group else None
    except ValueError:
        raise ValueError(f"bad rotation spec {name!r}: expected kind[:block][/g<group>], e.g. 'gsr:64/g16'") from None


def _rotation_setting(name: str, profile: Profile) -> tuple[str, int | None, int]:
    """(kind, block, group size) that an analysis rotation spec means under ``profile``."""
    kind, block, group = _parse_rotation(name)
    group = group or profile.w_group_size
    return kind, (block or group) if kind in BLOCK_KINDS else block, group


def rotation_key(name: str, profile: Profile) -> dict:
    """Row-cache key (kind ``"rotation"``) of the analysis of the R1 spec ``name`` under ``profile``."""
    from .rotation_stats import CLIP_RATIOS, SEARCH

    kind, block, group = _rotation_setting(name, profile)
    key = {"kind": "rotation-analysis", "model": profile.model, "rotation": name, "layers": profile.analysis_layers,
           "group_size": profile.w_group_size, "seed": profile.seed, "code": code_key(profile.device)}
    # what determines a row beyond the spec string: the block and group it resolves to, the search settings
    key["setting"] = {"kind": kind, "block": block, "group_size": group, "search": SEARCH,
                      "ratios": [CLIP_RATIOS[0], CLIP_RATIOS[-1], len(CLIP_RATIOS)]}
    return key


def rotation_analysis(profile: Profile, progress: bool = True) -> "pd.DataFrame":
    """Per-layer weight statistics for each rotation in ``profile.analysis_rotations`` (cached per rotation)."""
    import pandas as pd
    from ..progress import bar as tqdm

    from .rotation_stats import layer_statistics

    frames = []
    for name in tqdm(profile.analysis_rotations, desc="rotations", disable=not progress):
        kind, block, group = _rotation_setting(name, profile)
        key = rotation_key(name, profile)

        def compute(kind=kind, block=block, group=group, name=name):
            df = layer_statistics(base_model(profile)[0], kind, block=block, seed=profile.seed,
                                  group_size=group, bits=2, layers=profile.analysis_layers)
            df["rotation"] = name
            prov = provenance()  # cached with the rows: the commit that computed them
            return {"rows": [{**r, **prov} for r in df.to_dict("records")]}

        frames.append(pd.DataFrame(cached_row("rotation", key, compute)["rows"]))
    df = pd.concat(frames, ignore_index=True)
    df["model"] = profile.model
    return df


def summarize_rotation(df: "pd.DataFrame", by: tuple[str, ...] = ("rotation",)) -> "pd.DataFrame":
    """Means per rotation (or per ``by``) with the range/shape ratios (see :func:`rcp_lib.experiments.rotation_stats.summarize`)."""
    from .rotation_stats import summarize

    return summarize(df, by)


def rotation_example(profile: Profile, layer: int = 0, proj: str = "q_proj", group: int = 0) -> dict:
    """One weight group of a real layer before/after each rotation, with its 2-bit levels: uniform min-max,
    uniform with the MSE-optimal clip, pinned-end non-uniform (LDP-representable) and Lloyd-Max."""
    from ..models import dims, input_norm, layer_linears
    from . import rotation_stats as A

    model = base_model(profile)[0]
    lay = model.model.layers[layer]
    W = (layer_linears(lay)[f"self_attn.{proj}"].weight.detach().double().cpu()
         * input_norm(lay).weight.detach().double().cpu()[None, :])
    out = {}
    for name in profile.analysis_rotations:
        kind, block, gs = _rotation_setting(name, profile)
        R1, _ = A.analysis_r1(kind, dims(model).hidden, block, gs, profile.seed)
        Wr = A.rotated_weight(W, rot_in=R1)
        row = Wr[: max(1, 4096 // gs)].reshape(-1, gs)  # a few rows' worth of groups for the histogram
        g = Wr.reshape(-1, gs)[group : group + 1]
        lv = A.group_levels(g, 2)
        out[name] = {"name": f"{profile.model} layer {layer} {proj}", "group_size": gs, "weights": row.flatten().cpu().numpy(),
                     "kurtosis": A.kurtosis(Wr), **{f"{k}_levels": v[0].tolist() for k, v in lv.items()}}
    return out
