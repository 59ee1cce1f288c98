"""Configuration of a learnable binary mask (METHOD.md section 1).

A :class:`MaskConfig` says *which* parameters of a model are masked and *how*
their masks are computed from real-valued scores. It is a plain dataclass: it is
validated once at construction and passed into the layers, which never read any
global configuration.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union

Targets = Union[str, list[str], tuple[str, ...]]

# Parameter-name presets. A string is a regular expression matched with
# ``re.fullmatch`` against qualified parameter names, as PEFT's ``target_modules``.

#: ResNets (torchvision layout): every convolution weight, the stem and
#: ``downsample.0`` included. BatchNorm affine parameters stay frozen (the paper).
RESNET_TARGETS = r"(.*\.)?conv\d+\.weight|(.*\.)?downsample\.0\.weight"

#: As :data:`RESNET_TARGETS`, plus the downsample BatchNorm's weight and bias,
#: which the authors' public code also masks.
RESNET_AUTHORS_TARGETS = RESNET_TARGETS + r"|(.*\.)?downsample\.1\.(weight|bias)"

#: Vision transformers: q, k, v, output projection and both MLP layers, weights and
#: biases. Covers OpenAI CLIP / ``nn.MultiheadAttention`` names (``in_proj_weight``,
#: ``out_proj``, ``mlp.c_fc``, ``mlp.c_proj``) and timm names (``attn.qkv``,
#: ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``). Patch embedding, position and class
#: embeddings and LayerNorms are not matched and stay frozen.
VIT_TARGETS = (
    r"(.*\.)?attn\.(in_proj_weight|in_proj_bias|"
    r"(qkv|q_proj|k_proj|v_proj|out_proj|proj)\.(weight|bias))"
    r"|(.*\.)?mlp\.(c_fc|c_proj|fc1|fc2)\.(weight|bias)"
)

#: EfficientNet / MobileNet-style nets with ``efficientnet-lite-pytorch`` names: the stem, every
#: block's pointwise expansion and projection and its depthwise convolution, and the 1x1 head
#: convolution. BatchNorms (and a classifier, never part of the backbone) stay frozen.
EFFICIENTNET_TARGETS = r"(.*\.)?_(conv_stem|expand_conv|depthwise_conv|project_conv|conv_head)\.weight"

#: Fused q/k/v tensors (``nn.MultiheadAttention``/OpenAI CLIP ``in_proj_*``, timm ``attn.qkv``):
#: q, k and v stacked along dim 0. With ``MaskConfig.split_fused`` each is masked as three parts,
#: each with its own alpha and top-k count, as the authors' layout with three separate tensors.
FUSED_QKV = r"(.*\.)?(attn\.in_proj_weight|attn\.in_proj_bias|attn\.qkv\.weight|attn\.qkv\.bias)"
FUSED_QKV_PARTS = 3

PRESETS: dict[str, str] = {
    "resnet": RESNET_TARGETS,
    "efficientnet": EFFICIENTNET_TARGETS,
    "resnet-authors": RESNET_AUTHORS_TARGETS,
    "vit": VIT_TARGETS,
}

#: MaskConfig fields whose default changed after configs were first recorded, with the values
#: older records meant (mask files of format version 1, run folders written before issue 17);
#: a recorded config without such a key is read with these.
LEGACY_DEFAULTS: dict[str, Any] = {"split_fused": False, "topk_count": "round"}

MODES = ("threshold", "topk")
#: How many of ``n`` entries a top-k mask keeps: ``"authors"``, ``n - int((1 - keep_ratio) * n)``
#: (the paper's code); ``"round"``, ``round(keep_ratio * n)`` (selfmask before issue 17). At least one.
TOPK_COUNTS = ("authors", "round")
BN_POLICIES = ("train", "eval")


@dataclass(frozen=True)
class MaskConfig:
    """How to mask a model.

    Attributes:
        targets: which parameters to mask. A list/tuple of exact qualified names or
            name suffixes (``"weight"`` matches every ``*.weight``;
            ``"layer1.0.conv1.weight"`` matches exactly that one), or a regular
            expression string matched with ``re.fullmatch`` against qualified
            parameter names. A preset name (``"resnet"``, ``"resnet-authors"``,
            ``"vit"``, ``"efficientnet"``) expands to the preset's expression.
        mode: ``"threshold"`` (``M = 1[S > mu]``, the paper's method) or ``"topk"``
            (keep the top ``keep_ratio`` of the scores of each tensor, the
            edge-popup baseline).
        threshold: ``mu``, the score threshold of threshold mode.
        init_score: ``S0``, the initial value of every score.
        keep_ratio: fraction of entries kept active per tensor (top-k mode only).
        rescale: divide the masked weight by ``alpha = sqrt(mean(M))`` so the
            output variance is preserved.
        init_noise: half-width of uniform noise added to ``S0`` (seeded by
            ``seed``). ``None`` means 0 in threshold mode (at step 0 the network is
            exactly the pretrained one) and 1e-2 in top-k mode (constant scores
            would make the top-k choice arbitrary).
        seed: seed of the score noise.
        bn: BatchNorm running statistics during mask training: ``"train"`` keeps
            updating them in training mode (the authors' code); ``"eval"`` keeps
            every BatchNorm in evaluation mode, so running statistics are frozen
            and used. BatchNorm affine parameters are frozen either way unless
            they are targeted.
        trainable_fraction: selective masking (the paper's appendix): only this
            fraction of each masked tensor's entries is trainable, chosen at random
            (seeded by ``seed`` and the tensor's name, see
            :func:`~selfmask.masking.layer.selective_trainable_mask`); the other
            entries keep ``M = 1`` and get no score gradient. A mask file then stores
            only the trainable entries. 1.0 (the default) trains every entry.
            Threshold mode only.
        split_fused: mask a fused q/k/v tensor (:data:`FUSED_QKV`) as its three parts, each
            with its own ``alpha`` and, in top-k mode, its own count, as if the layer were
            three layers (the authors' Hugging Face layout, METHOD.md section 1). ``False``
            treats it as one tensor (mask files of format version 1 did).
        topk_count: how many entries top-k keeps of ``n``: ``"authors"`` (the default,
            ``n - int((1 - keep_ratio) * n)``, the authors' code) or ``"round"``
            (``round(keep_ratio * n)``, mask files of format version 1).
    """

    targets: Targets = "resnet"
    mode: Literal["threshold", "topk"] = "threshold"
    threshold: float = 0.0
    init_score: float = 1.0
    keep_ratio: float | None = None
    rescale: bool = True
    init_noise: float | None = None
    seed: int = 0
    bn: Literal["train", "eval"] = "train"
    trainable_fraction: float = 1.0
    split_fused: bool = True
    topk_count: Literal["authors", "round"] = "authors"
    _pattern: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"MaskConfig.mode: unknown mode {self.mode!r}; expected one of {MODES}")
        if self.bn not in BN_POLICIES:
            raise ValueError(f"MaskConfig.bn: unknown policy {self.bn!r}; expected one of {BN_POLICIES}")
        for name in ("threshold", "init_score"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"MaskConfig.{name} must be a finite number, got {value!r}")
        if self.mode == "topk":
            if self.keep_ratio is None:
                raise ValueError("MaskConfig.keep_ratio is required in 'topk' mode (a fraction in (0, 1])")
            if not (0.0 < float(self.keep_ratio) <= 1.0):
                raise ValueError(f"MaskConfig.keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        elif self.keep_ratio is not None:
            raise ValueError(
                f"MaskConfig.keep_ratio={self.keep_ratio!r} only applies to mode='topk' "
                f"(mode is {self.mode!r}); leave it None"
            )
        if not isinstance(self.trainable_fraction, (int, float)) or not (0.0 < self.trainable_fraction <= 1.0):
            raise ValueError(f"MaskConfig.trainable_fraction must be in (0, 1], got {self.trainable_fraction!r}")
        if self.trainable_fraction < 1.0 and self.mode != "threshold":
            raise ValueError(
                f"MaskConfig.trainable_fraction={self.trainable_fraction} (selective masking) needs "
                f"mode='threshold', got mode={self.mode!r}"
            )
        if self.topk_count not in TOPK_COUNTS:
            raise ValueError(f"MaskConfig.topk_count: unknown rule {self.topk_count!r}; expected one of {TOPK_COUNTS}")
        if not isinstance(self.split_fused, bool):
            raise ValueError(f"MaskConfig.split_fused must be true or false, got {self.split_fused!r}")
        if self.init_noise is not None and (not math.isfinite(self.init_noise) or self.init_noise < 0):
            raise ValueError(f"MaskConfig.init_noise must be a finite number >= 0, got {self.init_noise!r}")
        if (
            self.mode == "threshold"
            and self.init_score <= self.threshold
            and not self.init_noise
        ):
            raise ValueError(
                f"MaskConfig: init_score={self.init_score} <= threshold={self.threshold} would start "
                "with every entry masked out (all-zero weights); choose init_score > threshold"
            )
        object.__setattr__(self, "_pattern", _compile_targets(self.targets))

    @property
    def noise(self) -> float:
        """The resolved score-noise half-width."""
        if self.init_noise is not None:
            return float(self.init_noise)
        return 1e-2 if self.mode == "topk" else 0.0

    def matches(self, name: str) -> bool:
        """Whether the qualified parameter ``name`` is targeted."""
        assert self._pattern is not None
        return re.fullmatch(self._pattern, name) is not None

    def parts(self, name: str, shape: tuple[int, ...]) -> int:
        """How many equal parts along dim 0 tensor ``name`` is masked as (1, or 3 for fused q/k/v)."""
        if not self.split_fused or re.fullmatch(FUSED_QKV, name) is None:
            return 1
        if not shape or shape[0] % FUSED_QKV_PARTS:
            raise ValueError(
                f"MaskConfig.split_fused: fused q/k/v tensor {name!r} has shape {list(shape)}; its first "
                f"dimension must be a multiple of {FUSED_QKV_PARTS}"
            )
        return FUSED_QKV_PARTS

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MaskConfig:
        """A config for one of :data:`PRESETS`, e.g. ``MaskConfig.preset("vit", bn="eval")``."""
        if name not in PRESETS:
            raise ValueError(f"unknown MaskConfig preset {name!r}; expected one of {sorted(PRESETS)}")
        return cls(targets=name, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (for run folders and mask files)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if isinstance(out["targets"], tuple):
            out["targets"] = list(out["targets"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskConfig:
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"MaskConfig: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**data)


def _compile_targets(targets: Targets) -> str:
    """Turn ``targets`` into one regular expression for ``re.fullmatch``."""
    if isinstance(targets, str):
        if not targets:
            raise ValueError("MaskConfig.targets is an empty string")
        pattern = PRESETS.get(targets, targets)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"MaskConfig.targets: invalid regular expression {targets!r}: {exc}") from None
        return pattern
    if isinstance(targets, (list, tuple)):
        if not targets:
            raise ValueError("MaskConfig.targets is an empty list")
        parts = []
        for item in targets:
            if not isinstance(item, str) or not item:
                raise ValueError(f"MaskConfig.targets: every entry must be a non-empty string, got {item!r}")
            parts.append(r"(.*\.)?" + re.escape(item))
        return "|".join(parts)
    raise ValueError(
        f"MaskConfig.targets must be a string (regex or preset) or a list of names/suffixes, "
        f"got {type(targets).__name__}"
    )


__all__ = [
    "EFFICIENTNET_TARGETS",
    "FUSED_QKV",
    "LEGACY_DEFAULTS",
    "PRESETS",
    "RESNET_AUTHORS_TARGETS",
    "RESNET_TARGETS",
    "VIT_TARGETS",
    "MaskConfig",
]
