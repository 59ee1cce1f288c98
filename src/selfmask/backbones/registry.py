"""A registry of backbone constructors (in the manner of timm's ``@register_model``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from selfmask.backbones.info import (  # noqa: F401  (re-exported: the registry's public names)
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    LEGACY_EMBEDDING,
    SINGLE_EMBEDDING,
    BackboneInfo,
)
from selfmask.errors import SelfmaskError

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], BackboneInfo]] = {}


def register_backbone(info: BackboneInfo) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a constructor under ``info.name``.

    The constructor takes no argument, or ``embedding=`` when ``info.embeddings`` lists choices.
    """

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if info.name in _REGISTRY:
            raise ValueError(f"backbone {info.name!r} is already registered")
        _REGISTRY[info.name] = (fn, info)
        return fn

    return deco


def list_backbones() -> list[str]:
    """Names accepted by :func:`create_backbone`."""
    return sorted(_REGISTRY)


def backbone_info(name: str, embedding: str | None = None) -> BackboneInfo:
    """Embedding size and preprocessing of backbone ``name`` (for ``embedding``; ``None``: its default).

    ``name`` is a registered name or a specification of another model (``timm:NAME``,
    ``torchvision:NAME``, ``open_clip:NAME``, ``module.path:factory``; see
    :mod:`selfmask.backbones.external`), whose info is found by building it once.
    """
    if name in _REGISTRY:
        return _REGISTRY[name][1].with_embedding(embedding)
    from selfmask.backbones import external

    if external.is_external(name):
        return external.external_info(name).with_embedding(embedding)
    raise SelfmaskError(
        f"unknown backbone {name!r}; available: {', '.join(list_backbones())}; or {external.SPEC_HELP}"
    )


def build_backbone(name: str, embedding: str | None = None) -> nn.Module:
    """A randomly initialised backbone (no weights loaded) returning ``embedding`` (``None``: the default).

    For a specification of another model (:mod:`selfmask.backbones.external`): that model, its head removed.
    """
    if name in _REGISTRY:
        info = backbone_info(name, embedding)
        fn = _REGISTRY[name][0]
        model = fn(embedding=info.embedding) if info.embeddings else fn()
    else:
        from selfmask.backbones import external

        if not external.is_external(name):
            backbone_info(name)  # the unknown-backbone error
        if embedding not in (None, SINGLE_EMBEDDING):
            raise SelfmaskError(f"backbone {name!r} has no embedding {embedding!r}; it offers: {SINGLE_EMBEDDING}")
        model = external.build_external(name)
    model.backbone_name = name  # type: ignore[assignment]
    return model


def describe_backbone(name: str) -> dict[str, object]:
    """What ``selfmask backbones`` lists for ``name``: sizes, embeddings, preset, parameters, checkpoint layouts.

    The parameter count is of the backbone built on the ``meta`` device (nothing is allocated);
    ``masked_weights`` is what the backbone's mask preset targets.
    """
    import torch

    from selfmask.masking.config import MaskConfig

    info = backbone_info(name)
    with torch.device("meta"):
        model = build_backbone(name)
    params = dict(model.named_parameters())
    preset = MaskConfig(targets=info.mask_preset)  # a preset name, or a generic preset's expression
    masked = {n: p for n, p in params.items() if preset.matches(n)}
    return {
        "name": name,
        "description": info.description,
        "input_size": info.input_size,
        "embed_dim": info.embed_dim,
        "embedding": info.embedding,
        "embeddings": dict(info.embeddings) or {info.embedding: info.embed_dim},
        "mask_preset": info.mask_preset,
        "parameters": sum(p.numel() for p in params.values()),
        "masked_tensors": sum(preset.parts(n, tuple(p.shape)) for n, p in masked.items()),
        "masked_weights": sum(p.numel() for p in masked.values()),
        "mean": list(info.mean),
        "std": list(info.std),
        "checkpoint_layouts": list(info.checkpoint_layouts),
    }
