"""A registry of backbone constructors (in the manner of timm's ``@register_model``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from selfmask.errors import SelfmaskError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


#: The embedding of a backbone that offers only one (the pooled output of a ResNet).
SINGLE_EMBEDDING = "pooled"
#: What runs and mask files written before a backbone offered a choice of embeddings used:
#: CLIP ViTs returned the projected embedding until issue 17 (a run folder without an
#: ``embedding`` key was such a run).
LEGACY_EMBEDDING = "projected"


@dataclass(frozen=True)
class BackboneInfo:
    """What a user needs to feed a backbone and use its output.

    ``embed_dim`` is the size of ``embedding``, the output this info describes. A backbone
    with a choice of embeddings lists them in ``embeddings`` as ``(name, size)`` pairs,
    the default first (its constructor then takes ``embedding=``); :func:`backbone_info`
    with ``embedding=`` gives the info of another one.
    """

    name: str
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mask_preset: str  # the MaskConfig preset matching METHOD.md section 1
    description: str = ""
    embeddings: tuple[tuple[str, int], ...] = ()
    checkpoint_layouts: tuple[str, ...] = ()  # what load_backbone_weights accepts, for `selfmask backbones`
    #: where the default (pretrained) weights are when no weights file is given: a function
    #: returning a local path (e.g. inside an installed package), or None for random weights
    default_weights: Callable[[], Path] | None = field(default=None, compare=False, repr=False)

    @property
    def embedding(self) -> str:
        """The name of the embedding ``embed_dim`` measures (the first of ``embeddings``)."""
        return self.embeddings[0][0] if self.embeddings else SINGLE_EMBEDDING

    def with_embedding(self, embedding: str | None) -> BackboneInfo:
        """This info for ``embedding`` (``None``: the default); an unknown name is a SelfmaskError."""
        if embedding is None:
            return self
        options = dict(self.embeddings) or {SINGLE_EMBEDDING: self.embed_dim}
        if embedding not in options:
            raise SelfmaskError(
                f"backbone {self.name!r} has no embedding {embedding!r}; it offers: {', '.join(options)}"
            )
        ordered = tuple(sorted(self.embeddings, key=lambda item: item[0] != embedding))  # the chosen one first
        return replace(self, embed_dim=options[embedding], embeddings=ordered)


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
