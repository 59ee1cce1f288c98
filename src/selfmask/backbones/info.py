"""What a backbone is to the rest of the library: :class:`BackboneInfo` and input statistics.

Its own module, imported by the registry and by every backbone source (``external``), so
neither has to import the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

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
