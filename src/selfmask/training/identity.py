"""What defines a run, recorded in every checkpoint and compared on ``--resume``.

A checkpoint records the training settings and, under ``"run"``, the data
specification, the weights file, the fingerprint of the base weights, the backbone
and (SwAV) the multi-crop settings. ``--resume`` rebuilds these from the run's
``config.json`` and the files on disk; :func:`first_difference` names the first
setting that differs (data and weights first: an edited ``config.json`` or a replaced
weights file must not continue silently on other data or weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selfmask.errors import SelfmaskError

#: Compared first, in this order; then every other recorded setting by name.
ORDER = ("data_spec", "weights", "base_fingerprint", "backbone", "method", "objective", "crops", "swav")
_RUN_META_KEYS = ("data_spec", "weights", "base_fingerprint")
_MISSING = "<not recorded>"


def with_run_identity(
    settings: dict[str, Any], backbone: str, run_meta: Mapping[str, Any] | None, crops: Any = None
) -> dict[str, Any]:
    """``settings`` plus ``"run"``: the backbone and the identity keys of ``run_meta`` (and the crops)."""
    run = {"backbone": backbone, **{k: (run_meta or {})[k] for k in _RUN_META_KEYS if k in (run_meta or {})}}
    if crops is not None:
        run["crops"] = crops
    return {**settings, "run": run}


def _flat(recorded: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in recorded.items():
        if key in ("train", "run") and isinstance(value, Mapping):
            out.update(value)
        else:
            out[key] = value
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def first_difference(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """The first setting (see :data:`ORDER`) whose value differs, as a message; ``None`` when all agree.

    Checkpoints written before ``"run"`` was recorded are compared on their training settings only.
    """
    saved, current = _flat(recorded), _flat(now)
    if "run" not in recorded:
        current = _flat({k: v for k, v in now.items() if k != "run"})
    keys = [k for k in ORDER if k in saved or k in current]
    keys += sorted((set(saved) | set(current)) - set(keys))
    for key in keys:
        a, b = saved.get(key, _MISSING), current.get(key, _MISSING)
        if a != b:
            return f"{key}: the checkpoint was written with {_short(a)}, the run now has {_short(b)}"
    return None


def check_saved_run(saved: Mapping[str, Any], where: str | Path) -> None:
    """The fields of a run's ``config.json`` that ``--resume`` uses, with the types ``selfmask adapt`` writes."""
    expected = {"backbone": (str,), "data_spec": (str,), "weights": (str, type(None)), "seed": (int,)}
    for key, types in expected.items():
        value = saved.get(key)
        if not isinstance(value, types) or isinstance(value, bool):
            kind = " or ".join("null" if t is type(None) else {"str": "a string", "int": "an integer"}[t.__name__]
                               for t in types)
            raise SelfmaskError(f"{where}: {key!r} must be {kind}, got {value!r}")


__all__ = ["ORDER", "check_saved_run", "first_difference", "with_run_identity"]
