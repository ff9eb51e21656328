"""One object for one quantization setting: :class:`Recipe` = how a model is rotated, quantized, and calibrated or
trained. Nested, each part owned by its own config (none mirrors another):

* ``rotation``: :class:`~rcp_lib.rotation.fuse.RotationConfig` (R1-R4, seed) or None;
* ``quant``: :class:`~rcp_lib.quant.apply.QuantConfig` = ``weight`` (:class:`~rcp_lib.quant.quantizers.
  WeightQuantConfig`: bits, group size, method, LWC, clip search, LDP), ``act`` (bits, clip ratio) and ``kv``
  (bits, group, clip), or None for the full-precision model;
* ``ptq``: ``"none"``, ``"rtn"`` (weights frozen after RTN / its clip search) or ``"gptq"``;
* ``qat``: :class:`~rcp_lib.qat.QATConfig` or None.

The named methods of the tables are Recipes (:mod:`rcp_lib.experiments.methods`); the CLI's run configs
(``configs/*.yaml``, :mod:`rcp_lib.run_config`), the memory accountant (:meth:`rcp_lib.memory.Scheme.of`) and the
``config`` column of every result row (``Recipe.to_dict()`` plus the method's name) use the same object. A profile
(:mod:`rcp_lib.profiles`) says only where and how much: model, corpus, budgets, and the model's weight group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import JsonConfig
from .qat import QATConfig
from .quant.apply import QuantConfig
from .rotation.fuse import RotationConfig

PTQ_ALGORITHMS = ("none", "rtn", "gptq")


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
        """The layout of :meth:`to_dict` (sections may be missing: their defaults; ``quant`` also in the flat
        layout of older rows, see :meth:`QuantConfig.from_dict`). Unknown sections raise ValueError."""
        unknown = set(d) - {"rotation", "quant", "ptq", "qat"}
        if unknown:
            raise ValueError(f"unknown recipe sections {sorted(unknown)}; known: ['ptq', 'qat', 'quant', 'rotation']")
        rot, quant, qat = d.get("rotation"), d.get("quant"), d.get("qat")
        return cls(rotation=None if rot is None else RotationConfig.from_dict(rot),
                   quant=None if quant is None else QuantConfig.from_dict(quant),
                   ptq=d.get("ptq", "none"), qat=None if qat is None else QATConfig.from_dict(qat))

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
                             "range_mode='static' (e.g. profile qat_weight={'range_mode': 'static'})")

    @property
    def label(self) -> str:
        """The setting's name: ``W2A4KV4`` ... or ``FP``."""
        return "FP" if self.quant is None else self.quant.label
