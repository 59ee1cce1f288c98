"""A registry of backbone constructors (in the manner of timm's ``@register_model``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from selfmask.errors import SelfmaskError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneInfo:
    """What a user needs to feed a backbone and use its output."""

    name: str
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mask_preset: str  # the MaskConfig preset matching METHOD.md section 1
    description: str = ""
    #: where the default (pretrained) weights are when no weights file is given: a function
    #: returning a local path (e.g. inside an installed package), or None for random weights
    default_weights: Callable[[], Path] | None = field(default=None, compare=False, repr=False)


_REGISTRY: dict[str, tuple[Callable[[], nn.Module], BackboneInfo]] = {}


def register_backbone(info: BackboneInfo) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator registering a zero-argument constructor under ``info.name``."""

    def deco(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if info.name in _REGISTRY:
            raise ValueError(f"backbone {info.name!r} is already registered")
        _REGISTRY[info.name] = (fn, info)
        return fn

    return deco


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return sorted(_REGISTRY)


def backbone_info(name: str) -> BackboneInfo:
    """Embedding size and preprocessing of backbone ``name``.

    ``name`` is a registered name or a specification of another model (``timm:NAME``,
    ``torchvision:NAME``, ``open_clip:NAME``, ``module.path:factory``; see
    :mod:`selfmask.backbones.external`), whose info is found by building it once.
    """
    if name in _REGISTRY:
        return _REGISTRY[name][1]
    from selfmask.backbones import external

    if external.is_external(name):
        return external.external_info(name)
    raise SelfmaskError(
        f"unknown backbone {name!r}; available: {', '.join(list_backbones())}; or {external.SPEC_HELP}"
    )


def build_backbone(name: str) -> nn.Module:
    """A randomly initialised backbone (no weights loaded); for a specification, its head removed."""
    if name in _REGISTRY:
        model = _REGISTRY[name][0]()
    else:
        from selfmask.backbones import external

        if not external.is_external(name):
            backbone_info(name)  # the unknown-backbone error
        model = external.build_external(name)
    model.backbone_name = name  # type: ignore[assignment]
    return model
