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
from typing import Any


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


def _as_format_1(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` with the training settings in format 1's flat form (mask settings beside the others)."""
    from selfmask.training.config import legacy_train_view

    if "train" in settings and isinstance(settings["train"], Mapping):
        return {**settings, "train": legacy_train_view(dict(settings["train"]))}
    return legacy_train_view(dict(settings))


def first_difference(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """The first setting (see :data:`ORDER`) whose value differs, as a message; ``None`` when all agree.

    Checkpoints written before ``"run"`` was recorded are compared on their training settings only;
    checkpoints written before the mask settings were one object (format 1 of ``config.json``)
    on the settings they recorded.
    """
    train = recorded.get("train", recorded)
    if isinstance(train, Mapping) and "mask" not in train and "threshold" in train:
        now = _as_format_1(now)
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


__all__ = ["ORDER", "first_difference", "with_run_identity"]
