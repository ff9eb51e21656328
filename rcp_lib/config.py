"""A mixin for the configuration dataclasses: JSON round trips that refuse unknown fields."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, fields
from typing import Any, TypeVar

T = TypeVar("T", bound="JsonConfig")

_SCALARS = (bool, int, float, str)


def _scalar_hint(hint: Any) -> tuple[type | None, bool]:
    """``(scalar type, None allowed)`` of a field annotation such as ``int``, ``float | None``, ``Optional[str]``;
    ``(None, ...)`` when the annotation is not a plain scalar (lists, dicts, nested configs: left unchecked)."""
    if hint in _SCALARS:
        return hint, False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and args[0] in _SCALARS:
            return args[0], len(args) < len(typing.get_args(hint))
    return None, False


def coerce_value(owner: str, name: str, value: Any, hint: Any) -> Any:
    """``value`` converted to the scalar type of field ``name`` of ``owner`` (a class name), or ValueError naming
    the field.

    YAML 1.1 reads ``2e-5`` (no dot) as a string: numeric strings become numbers (``"2e-5"`` -> ``2e-05`` for a
    float, ``"1e3"`` -> ``1000`` for an int); an integral float is accepted for an int field. Lists, dicts and nested
    configs are returned unchanged.
    """
    kind, optional = _scalar_hint(hint)
    if kind is None or (value is None and optional):
        return value
    where = f"{owner}.{name}"
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where} expects true or false, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where} expects a string, got {value!r}")
    if isinstance(value, bool):
        raise ValueError(f"{where} expects a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{where} expects a number, got {value!r}") from None
    if not isinstance(value, (int, float)):
        raise ValueError(f"{where} expects a number, got {value!r}")
    if kind is float:
        return float(value)
    if float(value).is_integer():
        return int(value)
    raise ValueError(f"{where} expects an integer, got {value!r}")


def coerce_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with each scalar field of the dataclass ``cls`` converted by :func:`coerce_value` (keys that are no
    field of ``cls`` are kept as they are: the caller reports them)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: nothing to check against
        return dict(d)
    return {k: coerce_value(cls.__name__, k, v, hints[k]) if k in hints else v for k, v in d.items()}


class JsonConfig:
    """``to_dict`` / ``to_json`` / ``from_dict`` / ``from_json`` for a dataclass; unknown keys raise ValueError."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**coerce_fields(cls, d))

    @classmethod
    def from_json(cls: type[T], s: str) -> T:
        return cls.from_dict(json.loads(s))
