"""Command-line options generated from the settings dataclasses, so a new setting is one field.

One :class:`Option` per field of :class:`~selfmask.training.config.TrainConfig`, of its
:class:`~selfmask.masking.MaskConfig` (the fields the run does not set itself), of each
objective's config dataclass (:func:`~selfmask.training.config.objective_configs`) and of
:class:`~selfmask.data.multicrop.MultiCropConfig`. The option's name is the field's
(``--batch-size``; a ``bool`` field that defaults to true gives ``--no-<name>``), its help
the field's ``metadata["help"]`` or docstring entry, its ``--config`` file key the field's
name. :data:`FLAG_NAMES` keeps the names the command line had before the flags were
generated; an objective field whose name another group also uses is prefixed with the
objective's name (SwAV's ``head_lr``: ``--swav-head-lr``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cache
from typing import Any

from selfmask.errors import SelfmaskError
from selfmask.training.fields import FieldSpec, check_value, field_specs

#: (group, field) -> option name, where it is not the field's own name.
FLAG_NAMES: dict[tuple[str, str], str] = {
    ("mask", "targets"): "mask_targets",
    ("swav", "num_prototypes"): "prototypes",
    ("crops", "n_small"): "small_crops",
    ("crops", "small_size"): "small_crop_size",
    ("crops", "large_scale"): "large_crop_scale",
    ("crops", "small_scale"): "small_crop_scale",
}
#: Fields with no option of their own: the masks' mode, keep_ratio and seed follow the run's method,
#: keep_ratio and seed; crops are normalised with the backbone's mean and std.
NO_FLAG = {("train", "mask"), ("train", "extra"), ("mask", "mode"), ("mask", "keep_ratio"), ("mask", "seed"),
           ("crops", "mean"), ("crops", "std")}
GROUP_TITLES = {"mask": "masks (--method mask / topk)", "crops": "multi-crop views (self-supervised objectives)"}


@dataclass(frozen=True)
class Option:
    """One generated option: ``dest`` is its argparse destination and ``--config`` key."""

    group: str  # "train", "mask", "crops" or an objective's name
    spec: FieldSpec
    dest: str

    @property
    def inverted(self) -> bool:
        """A ``bool`` field that defaults to true: the option is ``--no-<name>``."""
        return self.spec.kind == "bool" and self.spec.default is True

    @property
    def flag(self) -> str:
        return ("--no-" if self.inverted else "--") + self.dest.replace("_", "-")


def _groups() -> list[tuple[str, type]]:
    from selfmask.data.multicrop import MultiCropConfig
    from selfmask.masking import MaskConfig
    from selfmask.training.config import TrainConfig, objective_configs

    objectives = [(name, cls) for name, cls in objective_configs().items() if cls is not None]
    return [("train", TrainConfig), ("mask", MaskConfig), *objectives, ("crops", MultiCropConfig)]


@cache
def options() -> tuple[Option, ...]:
    """Every generated option, in the order ``--help`` lists them."""
    from selfmask.training.config import objective_configs

    objectives = set(objective_configs())
    groups = [(g, {n: s for n, s in field_specs(cls).items() if (g, n) not in NO_FLAG}) for g, cls in _groups()]
    names: dict[str, list[str]] = {}
    for group, specs in groups:
        for name in specs:
            names.setdefault(FLAG_NAMES.get((group, name), name), []).append(group)
    out = []
    for group, specs in groups:
        for name, spec in specs.items():
            dest = FLAG_NAMES.get((group, name), name)
            if group in objectives and len(names[dest]) > 1:
                dest = f"{group}_{dest}"
            out.append(Option(group, spec, dest))
    dests = [o.dest for o in out]
    assert len(dests) == len(set(dests)), "two settings would share one option"
    return tuple(out)


def by_dest() -> dict[str, Option]:
    return {o.dest: o for o in options()}


def _help(option: Option) -> str:
    from selfmask.training.config import objective_configs

    spec = option.spec
    text = " ".join(spec.help.replace("``", "").split())
    choices = tuple(objective_configs()) if (option.group, spec.name) == ("train", "objective") else spec.choices
    if choices and "|" not in text:
        text = f"{' | '.join(choices)}: {text}"
    return text.replace("%", "%%")


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    """Add every generated option to ``p`` (defaults ``None``: a ``--config`` file or the field fills them)."""
    groups: dict[str, Any] = {"train": p}
    for option in options():
        if option.group not in groups:
            title = GROUP_TITLES.get(option.group, f"--objective {option.group}")
            groups[option.group] = p.add_argument_group(title)
        g, spec = groups[option.group], option.spec
        if spec.kind == "bool":
            g.add_argument(option.flag, dest=option.dest, action="store_const", const=not option.inverted,
                           default=None, help=_help(option))
            continue
        kind = {"int": int, "float": float}.get(spec.kind, str)
        metavar = {"int": "N", "float": "X"}.get(spec.kind, "TEXT")
        nargs = None if spec.length is None else ("+" if spec.length == -1 else spec.length)
        if spec.length == 2:
            metavar = ("LO", "HI")
        g.add_argument(option.flag, dest=option.dest, type=kind, nargs=nargs, default=None, metavar=metavar,
                       help=_help(option))


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``dest -> value`` of the generated options given on the command line."""
    out = {}
    for option in options():
        value = getattr(args, option.dest, None)
        if value is not None:
            out[option.dest] = tuple(value) if isinstance(value, list) else value
    return out


def check_settings(values: dict[str, Any], where: str) -> dict[str, Any]:
    """A ``--config`` file's settings (``dest -> JSON value``) checked against their fields' types."""
    known = by_dest()
    out = {}
    for key, value in values.items():
        option = known[key]
        try:
            out[key] = check_value(option.spec, value, key)
        except SelfmaskError as exc:
            raise SelfmaskError(f"{where}: {exc}") from None
    return out


def grouped(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``dest -> value`` as ``group -> {field: value}`` (train settings get their masks under ``"mask"``)."""
    known = by_dest()
    out: dict[str, dict[str, Any]] = {}
    for dest, value in values.items():
        option = known[dest]
        out.setdefault(option.group, {})[option.spec.name] = value
    return out


def flag_names(dests: list[str] | tuple[str, ...]) -> str:
    known = by_dest()
    return ", ".join(known[d].flag if d in known else "--" + d.replace("_", "-") for d in dests)


__all__ = ["FLAG_NAMES", "Option", "add_setting_flags", "by_dest", "check_settings", "flag_names", "given_settings",
           "grouped", "options"]
