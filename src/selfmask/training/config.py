"""Training configuration for every method of ``selfmask adapt`` (one loop for all)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from selfmask.errors import SelfmaskError
from selfmask.masking.config import MaskConfig

METHODS = ("mask", "topk", "fft", "linear")
HEADS = ("linear", "masked-random")
OBJECTIVES = ("supervised", "swav", "dino")
PRECISIONS = ("fp32", "bf16")

#: The paper's optimiser settings per method (METHOD.md sections 1 and 3): used when a
#: field is left ``None``.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "mask": {"lr": 50.0, "weight_decay": 0.0},
    "topk": {"lr": 50.0, "weight_decay": 0.0},
    "fft": {"lr": 0.001, "weight_decay": 5e-4},
    "linear": {"lr": 0.1, "weight_decay": 0.0},
}


#: field -> (kind, may be None): checked before anything else, so a config file with the
#: wrong JSON type is one clear error instead of a traceback (or a silent truthy string).
FIELD_TYPES: dict[str, tuple[str, bool]] = {
    **{f: ("str", False) for f in ("method", "objective", "head", "bn", "device", "precision")},
    **{f: ("str", True) for f in ("mask_targets", "init_from")},
    **{f: ("int", False) for f in ("epochs", "batch_size", "seed", "checkpoint_every")},
    "per_class": ("int", True),
    **{f: ("float", False) for f in ("head_lr", "momentum", "head_weight_decay", "warmup_epochs", "keep_ratio",
                                     "threshold", "init_score")},
    **{f: ("float", True) for f in ("lr", "weight_decay", "label_fraction")},
    **{f: ("bool", False) for f in ("augment", "flip", "channels_last", "compile", "fast_masks", "sync_bn")},
}
#: Largest integer setting accepted (counts and sizes; far beyond any real run, within 64-bit arithmetic).
MAX_INT = 2**31 - 1
#: (low, high) per integer field where it differs from [0, MAX_INT]: seeds feed 32-bit generators (numpy, scikit-learn).
INT_RANGES: dict[str, tuple[int, int]] = {"seed": (0, 2**32 - 1)}


@dataclass
class TrainConfig:
    """How to adapt a backbone.

    Attributes:
        method: ``mask`` (supervised masking: scores + a new head), ``topk`` (top-k
            mask baseline, edge-popup style), ``fft`` (full fine-tuning), ``linear``
            (a linear head on the frozen backbone, trained with SGD).
        objective: ``supervised`` (cross-entropy on labels), ``swav`` or ``dino`` (no labels).
        epochs: passes over the training set.
        batch_size: images per step (the paper: 64).
        lr: learning rate of the adapted parameters (scores for mask/topk, all
            backbone weights for fft, the head for linear); ``None`` = the paper's
            default for the method (mask 50, fft 0.001, linear 0.1).
        head_lr: learning rate of the new head in mask/topk/fft runs.
        momentum: SGD momentum.
        weight_decay: on the adapted parameters; ``None`` = method default (masks 0,
            fft 5e-4). Weight decay on scores breaks Theorems 1-2 (METHOD.md).
        head_weight_decay: on the head.
        warmup_epochs: linear warm-up before the cosine decay (supervised: the paper
            uses 40 of 150 epochs).
        head: ``linear`` (a normal, trained linear layer) or ``masked-random`` (the
            authors' head: random, frozen weights, masked like the backbone).
        keep_ratio: fraction kept per tensor in ``topk`` runs.
        threshold, init_score: mu and S0 of the masks.
        mask_targets: a MaskConfig target preset name / regex; ``None`` = the
            backbone's preset.
        bn: BatchNorm statistics policy of masked runs (``train`` or ``eval``).
        augment: random crop (padding 1/8 of the size), on device.
        flip: also flip horizontally (off for data where a mirror image is another
            class, such as glyphs: a mirrored b is a d).
        seed: seeds the model's new parameters, the data order and augmentation.
        device: ``cpu`` or ``cuda[:N]``.
        label_fraction / per_class: train on a seeded, stratified labelled subset.
        init_from: a run folder whose mask scores (and BatchNorm buffers) start this
            mask run, e.g. a self-supervised SMN continued with supervised masking on a
            few labels (the semi-supervised setting).
        checkpoint_every: write a resumable checkpoint every this many steps (0: only
            at the end of each epoch; checkpoints need a run folder).
        precision: ``fp32`` or ``bf16`` (forward passes under bfloat16 autocast; scores,
            weights and optimiser state stay float32).
        channels_last: store weights and inputs channels-last (faster convolutions on
            GPUs with tensor cores).
        compile: run the model through ``torch.compile``.
        fast_masks: compute the masks and alphas of all masked tensors in one pass per
            step from one flat score buffer (``enable_fast_masks``); the same masks and
            numbers as the per-layer path, fewer kernel launches.
        sync_bn: distributed GPU runs: SyncBatchNorm (statistics over the global batch)
            instead of per-process BatchNorm statistics.
    """

    method: Literal["mask", "topk", "fft", "linear"] = "mask"
    objective: Literal["supervised", "swav", "dino"] = "supervised"
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None
    head_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float | None = None
    head_weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    head: Literal["linear", "masked-random"] = "linear"
    keep_ratio: float = 0.9
    threshold: float = 0.0
    init_score: float = 1.0
    mask_targets: str | None = None
    bn: Literal["train", "eval"] = "train"
    augment: bool = True
    flip: bool = True
    seed: int = 0
    device: str = "cpu"
    label_fraction: float | None = None
    per_class: int | None = None
    init_from: str | None = None
    checkpoint_every: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    fast_masks: bool = True
    sync_bn: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        if self.method not in METHODS:
            raise SelfmaskError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.objective not in OBJECTIVES:
            raise SelfmaskError(f"unknown objective {self.objective!r}; expected one of {OBJECTIVES}")
        if self.head not in HEADS:
            raise SelfmaskError(f"unknown head {self.head!r}; expected one of {HEADS}")
        if self.epochs < 1:
            raise SelfmaskError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise SelfmaskError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (0.0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0):
            raise SelfmaskError(f"warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs})")
        for name in ("lr", "head_lr", "weight_decay", "head_weight_decay", "momentum"):
            v = getattr(self, name)
            if v is not None and (not math.isfinite(v) or v < 0):
                raise SelfmaskError(f"{name} must be a finite number >= 0, got {v}")
        if not (0.0 < self.keep_ratio <= 1.0):
            raise SelfmaskError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.label_fraction is not None and not (0.0 < self.label_fraction <= 1.0):
            raise SelfmaskError(f"label fraction must be in (0, 1], got {self.label_fraction}")
        if self.per_class is not None and self.per_class < 1:
            raise SelfmaskError(f"per_class must be >= 1, got {self.per_class}")
        if self.label_fraction is not None and self.per_class is not None:
            raise SelfmaskError("give either a label fraction or a per-class count, not both")
        if self.checkpoint_every < 0:
            raise SelfmaskError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.init_from is not None and self.method not in ("mask", "topk"):
            raise SelfmaskError(f"init_from continues mask scores; method {self.method!r} has none")
        if self.precision not in PRECISIONS:
            raise SelfmaskError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")
        for name in ("channels_last", "compile", "fast_masks", "sync_bn"):
            if not isinstance(getattr(self, name), bool):
                raise SelfmaskError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.sync_bn and not str(self.device).startswith("cuda"):
            raise SelfmaskError(
                f"sync_bn needs a CUDA device (PyTorch's SyncBatchNorm runs on GPUs only), got device {self.device!r}"
            )
        if self.objective != "supervised" and self.method not in ("mask", "topk", "fft"):
            raise SelfmaskError(f"objective {self.objective!r} trains masks or weights; method {self.method!r} has nothing to train")

    def _check_types(self) -> None:
        """Every field has its type (a config file's ``"seed": "0"`` or ``"augment": "no"`` is refused) and range."""
        for name, (kind, optional) in FIELD_TYPES.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            ok = {
                "int": isinstance(value, int) and not isinstance(value, bool),
                "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                "str": isinstance(value, str),
                "bool": isinstance(value, bool),
            }[kind]
            if not ok:
                expected = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}[kind]
                raise SelfmaskError(f"{name} must be {expected}{' or null' if optional else ''}, got {value!r}")
            low, high = INT_RANGES.get(name, (0, MAX_INT))
            if kind == "int" and not low <= value <= high:
                raise SelfmaskError(f"{name} must be an integer in [{low}, {high}], got {value}")
            if kind == "float" and not math.isfinite(value):
                raise SelfmaskError(f"{name} must be a finite number, got {value}")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else METHOD_DEFAULTS[self.method]["lr"]

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return METHOD_DEFAULTS[self.method]["weight_decay"]

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["resolved_lr"] = self.resolved_lr
        out["resolved_weight_decay"] = self.resolved_weight_decay
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k not in ("resolved_lr", "resolved_weight_decay")}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SelfmaskError(f"unknown training config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def mask_config(self, preset: str | list[str] | tuple[str, ...]) -> MaskConfig | None:
        """The backbone's :class:`MaskConfig` for this run (``None`` unless method is mask or topk).

        ``preset`` is the backbone's target preset, used when ``mask_targets`` is not set.
        """
        if self.method not in ("mask", "topk"):
            return None
        return MaskConfig(
            targets=self.mask_targets or preset,
            mode="topk" if self.method == "topk" else "threshold",
            keep_ratio=self.keep_ratio if self.method == "topk" else None,
            threshold=self.threshold,
            init_score=self.init_score,
            bn=self.bn,
            seed=self.seed,
        )

    def head_mask_config(self) -> MaskConfig:
        """The :class:`MaskConfig` of the ``masked-random`` head (the authors' head)."""
        return MaskConfig(targets=["weight"], threshold=self.threshold, init_score=self.init_score)
