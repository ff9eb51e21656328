"""Rotations: Hadamard family matrices, sequency Walsh / GSR, fusion into a model (R1-R4) (their statistics: rcp_lib.experiments.rotation_stats)."""

from .fuse import R1_KINDS, RotationConfig, rotate_model
from .hadamard import apply_hadamard, hadamard, random_hadamard, random_orthogonal
from .walsh import block_hadamard, gsr, walsh

__all__ = ["RotationConfig", "rotate_model", "R1_KINDS", "hadamard", "random_hadamard", "random_orthogonal",
           "apply_hadamard", "walsh", "gsr", "block_hadamard"]
