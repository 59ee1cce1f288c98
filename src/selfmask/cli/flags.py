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
GROUP_TITLES = {"mask": "masks (--method mask / topk)", "crops": "multi-crop views (self-supervised objectives)",
                "objective": "settings several self-supervised objectives share"}


@dataclass(frozen=True)
class Option:
    """One generated option: ``dest`` is its argparse destination and ``--config`` key.

    ``group`` is ``"train"``, ``"mask"``, ``"crops"``, an objective's name, or :data:`SHARED` for a
    field several objectives have under one name (``--freeze-backbone-iters``): it sets the field of
    the run's objective, one of ``objectives``.
    """

    group: str
    spec: FieldSpec
    dest: str
    objectives: tuple[str, ...] = ()

    @property
    def inverted(self) -> bool:
        """A ``bool`` field that defaults to true: the option is ``--no-<name>``."""
        return self.spec.kind == "bool" and self.spec.default is True

    @property
    def flag(self) -> str:
        return ("--no-" if self.inverted else "--") + self.dest.replace("_", "-")

    def applies_to(self, objective: str) -> bool:
        """Whether the option sets something in a run of ``objective``."""
        if self.group == SHARED:
            return objective in self.objectives
        return self.group in ("train", "mask", objective) or (self.group == "crops" and _self_supervised(objective))


#: ``Option.group`` of a field several objectives share.
SHARED = "objective"


def _self_supervised(objective: str) -> bool:
    from selfmask.training.config import objective_configs

    return objective_configs().get(objective) is not None


def _groups() -> list[tuple[str, type]]:
    from selfmask.data.multicrop import MultiCropConfig
    from selfmask.masking import MaskConfig
    from selfmask.training.config import TrainConfig, objective_configs

    objectives = [(name, cls) for name, cls in objective_configs().items() if cls is not None]
    return [("train", TrainConfig), ("mask", MaskConfig), *objectives, ("crops", MultiCropConfig)]


@cache
def options() -> tuple[Option, ...]:
    """Every generated option, in the order ``--help`` lists them.

    An objective's field is ``--<name>``; when ``train``, ``mask`` or ``crops`` has that name too,
    ``--<objective>-<name>``; when other objectives have a field of that name and type, one shared option.
    """
    from selfmask.training.config import objective_configs

    objectives = set(objective_configs())
    groups = [(g, {n: s for n, s in field_specs(cls).items() if (g, n) not in NO_FLAG}) for g, cls in _groups()]
    general = {FLAG_NAMES.get((g, n), n) for g, specs in groups if g not in objectives for n in specs}
    owners: dict[str, list[tuple[str, FieldSpec]]] = {}
    for group, specs in groups:
        for name, spec in specs.items():
            dest = FLAG_NAMES.get((group, name), name)
            if group in objectives and dest not in general:
                owners.setdefault(dest, []).append((group, spec))
    out = []
    for group, specs in groups:
        for name, spec in specs.items():
            dest = FLAG_NAMES.get((group, name), name)
            if group not in objectives:
                out.append(Option(group, spec, dest))
            elif dest in general:
                out.append(Option(group, spec, f"{group}_{dest}"))
            elif len(owners[dest]) == 1:
                out.append(Option(group, spec, dest))
            elif owners[dest][0][0] == group:  # the first of several: one option for all of them
                out.append(Option(SHARED, spec, dest, tuple(g for g, _s in owners[dest])))
            if group in objectives and dest in owners and len(owners[dest]) > 1:
                first = owners[dest][0][1]
                if (spec.name, spec.kind, spec.length) != (first.name, first.kind, first.length):
                    raise AssertionError(f"objectives share option --{dest} with different fields or types")
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


def grouped(values: dict[str, Any], objective: str) -> dict[str, dict[str, Any]]:
    """``dest -> value`` as ``group -> {field: value}`` (a shared objective option goes to ``objective``)."""
    known = by_dest()
    out: dict[str, dict[str, Any]] = {}
    for dest, value in values.items():
        option = known[dest]
        out.setdefault(objective if option.group == SHARED else option.group, {})[option.spec.name] = value
    return out


def flag_names(dests: list[str] | tuple[str, ...]) -> str:
    known = by_dest()
    return ", ".join(known[d].flag if d in known else "--" + d.replace("_", "-") for d in dests)


__all__ = ["FLAG_NAMES", "Option", "add_setting_flags", "by_dest", "check_settings", "flag_names", "given_settings",
           "grouped", "options"]
