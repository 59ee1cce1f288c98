"""Objectives by name: ``create_objective("swav", inputs)``.

A new objective is one module defining a class that satisfies
:class:`~selfmask.objectives.base.Objective` plus a factory, and one registration line
below (or ``@register_objective("name")`` on the factory). A factory takes
:class:`ObjectiveInputs` and returns the objective; it runs right after
``torch.manual_seed(cfg.seed)``, so the modules it creates start from the run's seed.

An objective with a recipe names its settings dataclass at registration
(``register_objective("swav", settings="selfmask.objectives.swav:SwAVConfig")``, a class or a
lazy ``"module:Class"``): :func:`objective_settings` gives it to the command line and the run
configuration, and :func:`create_objective` turns a config file's dict into it (``from_dict``)
before the factory sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from selfmask.errors import SelfmaskError
from selfmask.objectives.base import Objective


@dataclass(frozen=True)
class ObjectiveInputs:
    """What a factory may read to build its objective.

    Attributes:
        info: the backbone's :class:`~selfmask.backbones.registry.BackboneInfo`
            (``embed_dim``, ``mean``, ``std``, ``input_size``).
        train_set: the training :class:`~selfmask.data.base.ImageTensorDataset` (its size,
            resolution and number of classes; labels only for supervised objectives).
        cfg: the run's :class:`~selfmask.training.config.TrainConfig`.
        settings: the objective's own recipe (e.g. a ``SwAVConfig``); ``None``: its defaults.
        crops: multi-crop views for self-supervised objectives (``None``: the default views).
    """

    info: Any
    train_set: Any
    cfg: Any
    settings: Any = None
    crops: Any = None


ObjectiveFactory = Callable[[ObjectiveInputs], Objective]

_FACTORIES: dict[str, ObjectiveFactory] = {}
_SETTINGS: dict[str, type | str | None] = {}


def register_objective(name: str, settings: type | str | None = None) -> Callable[[ObjectiveFactory], ObjectiveFactory]:
    """Decorator: register ``factory`` under ``name`` (a second registration of a name is refused).

    ``settings``: the objective's settings dataclass, or ``"module:Class"`` imported when first
    asked for; ``None`` for an objective without a recipe.
    """

    def decorate(factory: ObjectiveFactory) -> ObjectiveFactory:
        if name in _FACTORIES:
            raise SelfmaskError(f"objective {name!r} is registered twice")
        _FACTORIES[name] = factory
        _SETTINGS[name] = settings
        return factory

    return decorate


def objective_settings(name: str) -> type | None:
    """The settings dataclass of objective ``name`` (``None``: it takes no settings)."""
    get_factory(name)  # an unknown name: the one clear error
    settings = _SETTINGS.get(name)
    if isinstance(settings, str):
        import importlib

        module, attr = settings.split(":")
        settings = getattr(importlib.import_module(module), attr)
        _SETTINGS[name] = settings
    return settings


def objective_names() -> tuple[str, ...]:
    """The registered objective names, sorted."""
    return tuple(sorted(_FACTORIES))


def get_factory(name: str) -> ObjectiveFactory:
    """The factory of ``name``; an unknown name is one clear error naming the known ones."""
    try:
        return _FACTORIES[name]
    except (KeyError, TypeError):
        raise SelfmaskError(f"unknown objective {name!r}; known objectives: {', '.join(objective_names())}") from None


def create_objective(name: str, inputs: ObjectiveInputs) -> Objective:
    """Build the objective registered as ``name`` from ``inputs`` (a dict of settings is read first)."""
    factory = get_factory(name)
    settings_class = objective_settings(name)
    if isinstance(inputs.settings, dict) and settings_class is not None:
        inputs = replace(inputs, settings=settings_class.from_dict(inputs.settings))
    return factory(inputs)


def _supervised(inputs: ObjectiveInputs) -> Objective:
    from selfmask.objectives.supervised import build_supervised

    return build_supervised(inputs)


def _swav(inputs: ObjectiveInputs) -> Objective:
    """SwAV over multi-crop views (default: the paper's 2 large + 6 small crops at the data's size)."""
    from selfmask.objectives.swav import MultiCropSwAV, SwAVConfig, validate_queue

    settings = inputs.settings or SwAVConfig()
    n = len(inputs.train_set)
    validate_queue(settings, n, min(inputs.cfg.batch_size, n))
    return MultiCropSwAV(inputs.info.embed_dim, settings, inputs.crops or default_crops(inputs))


def default_crops(inputs: ObjectiveInputs) -> Any:
    """The paper's multi-crop views (2 large + 6 small), sizes scaled to the training images."""
    from selfmask.data.multicrop import MultiCrop

    info = inputs.info
    return MultiCrop.for_input_size(inputs.train_set.resolution, seed=inputs.cfg.seed, mean=info.mean, std=info.std)


def _dino(inputs: ObjectiveInputs) -> Objective:
    from selfmask.objectives.dino import build_dino

    return build_dino(inputs, inputs.crops or default_crops(inputs))


register_objective("supervised")(_supervised)
register_objective("swav", settings="selfmask.objectives.swav:SwAVConfig")(_swav)
register_objective("dino", settings="selfmask.objectives.dino:DINOConfig")(_dino)


__all__ = [
    "ObjectiveFactory",
    "ObjectiveInputs",
    "create_objective",
    "default_crops",
    "get_factory",
    "objective_names",
    "objective_settings",
    "register_objective",
]
