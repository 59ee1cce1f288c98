"""What a settings dataclass says about its fields: type, help text, JSON value checks.

The run configuration (:class:`~selfmask.training.config.TrainConfig` and the objective
and crop configs it travels with) is read from ``config.json`` files and from the command
line. Both read each field from its dataclass declaration, here, so a new setting is one
field: its annotation gives the JSON type checked on reading and the command-line type,
``field(metadata={"help": ...})`` (else the ``Attributes:`` entry of the class docstring)
gives its help text.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import MISSING, Field, dataclass, fields
from functools import cache
from typing import Any, Literal, Union

from selfmask.errors import SelfmaskError

#: Largest integer setting accepted (counts and sizes; far beyond any real run, within 64-bit arithmetic).
MAX_INT = 2**31 - 1
#: (low, high) per integer field where it differs from [0, MAX_INT]: seeds feed 32-bit generators (numpy, scikit-learn).
INT_RANGES: dict[str, tuple[int, int]] = {"seed": (0, 2**32 - 1)}

_EXPECTED = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


@dataclass(frozen=True)
class FieldSpec:
    """One setting: ``kind`` is int/float/str/bool (or ``other``: a nested config, a dict, a list),
    ``length`` the length of a tuple field (-1: any length; ``None``: not a tuple)."""

    name: str
    kind: str
    optional: bool
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    length: int | None = None


def _scalar_kind(tp: Any) -> tuple[str, tuple[str, ...] | None]:
    if typing.get_origin(tp) is Literal:
        return "str", tuple(str(a) for a in typing.get_args(tp))
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(tp, "other"), None


def _kind(tp: Any) -> tuple[str, bool, tuple[str, ...] | None, int | None]:
    """(kind, optional, choices, tuple length) of an annotation."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            kind, _opt, choices, length = _kind(args[0])
            return kind, optional, choices, length
        if all(a in (str, list, tuple) or typing.get_origin(a) in (list, tuple) for a in args):
            return "other", optional, None, None  # MaskConfig.targets: a string or a list of names
        return "other", optional, None, None
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # any length: ``length`` -1
            return _scalar_kind(args[0])[0], False, None, -1
        if args and len({*args}) == 1:
            kind, _choices = _scalar_kind(args[0])
            return kind, False, None, len(args)
        return "other", False, None, None
    kind, choices = _scalar_kind(tp)
    return kind, False, choices, None


@cache
def docstring_help(cls: type) -> dict[str, str]:
    """``Attributes:`` entries of a class docstring (Google style), name -> one-line text."""
    doc = cls.__doc__ or ""
    out: dict[str, str] = {}
    current: list[str] = []
    for line in doc.split("Attributes:", 1)[-1].splitlines() if "Attributes:" in doc else []:
        m = re.match(r"^\s{8}([a-z_][a-z0-9_, ]*):\s*(.*)$", line)
        if m:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                out[n] = m.group(2).strip()
        elif line.strip() and current:
            for n in current:
                out[n] += " " + line.strip()
        elif not line.strip():
            current = []
    return out


def _default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@cache
def field_specs(cls: type) -> dict[str, FieldSpec]:
    """Every init field of dataclass ``cls`` described (see :class:`FieldSpec`)."""
    hints = typing.get_type_hints(cls)
    docs = docstring_help(cls)
    out: dict[str, FieldSpec] = {}
    for f in fields(cls):
        if not f.init:
            continue
        kind, optional, choices, length = _kind(hints[f.name])
        text = f.metadata.get("help") or docs.get(f.name, "")
        out[f.name] = FieldSpec(f.name, kind, optional, _default(f), text, choices, length)
    return out


def check_value(spec: FieldSpec, value: Any, label: str | None = None) -> Any:
    """``value`` checked against the field's JSON type (a list becomes a tuple for tuple fields);
    raises :class:`SelfmaskError` naming the field: a config file's ``"seed": "0"`` or
    ``"augment": "no"`` is refused instead of read as something else."""
    name = label or spec.name
    if value is None and spec.optional:
        return None
    if spec.kind == "other":
        return value
    if spec.length is not None:
        if not isinstance(value, (list, tuple)) or len(value) != spec.length and spec.length != -1:
            count = "values" if spec.length == -1 else f"{spec.length} values"
            raise SelfmaskError(f"{name} must be a list of {count}, got {value!r}")
        item = FieldSpec(spec.name, spec.kind, False, None, "")
        return tuple(check_value(item, v, name) for v in value)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[spec.kind]
    if not ok:
        raise SelfmaskError(f"{name} must be {_EXPECTED[spec.kind]}{' or null' if spec.optional else ''}, got {value!r}")
    if spec.kind == "int":
        low, high = INT_RANGES.get(spec.name, (0, MAX_INT))
        if not low <= value <= high:
            raise SelfmaskError(f"{name} must be an integer in [{low}, {high}], got {value}")
    if spec.kind == "float" and not math.isfinite(value):
        raise SelfmaskError(f"{name} must be a finite number, got {value}")
    return value


def check_types(obj: Any) -> None:
    """Every scalar field of dataclass instance ``obj`` has its declared type and range."""
    for name, spec in field_specs(type(obj)).items():
        check_value(spec, getattr(obj, name))


def from_mapping(cls: type, data: Any, where: str, *, ignore: tuple[str, ...] = ()) -> Any:
    """``cls(**data)`` from a JSON object: unknown keys refused by name, types checked, lists to tuples.

    ``ignore`` lists keys that are written for readers but not read back (derived values).
    Every problem is a :class:`SelfmaskError` starting with ``where``.
    """
    if not isinstance(data, dict):
        raise SelfmaskError(f"{where}: expected a JSON object, got {type(data).__name__}")
    specs = field_specs(cls)
    unknown = sorted(set(data) - set(specs) - set(ignore))
    if unknown:
        raise SelfmaskError(f"{where}: unknown key {unknown[0]!r}"
                            f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; known: {sorted(specs)}")
    try:
        kwargs = {k: check_value(specs[k], v) for k, v in data.items() if k in specs}
        return cls(**kwargs)
    except (SelfmaskError, ValueError, TypeError) as exc:
        raise SelfmaskError(f"{where}: {exc}") from None


def to_mapping(obj: Any) -> dict[str, Any]:
    """The init fields of dataclass ``obj`` as JSON values (tuples as lists)."""
    out = {}
    for f in fields(obj):
        if f.init:
            v = getattr(obj, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


__all__ = ["FieldSpec", "check_types", "check_value", "docstring_help", "field_specs", "from_mapping", "to_mapping"]
