"""The typed run configuration: how to adapt a backbone (:class:`TrainConfig`) and what a
run folder's ``config.json`` records (:class:`RunConfig`), read and written here only.

``config.json`` carries :data:`RUN_FORMAT_VERSION` under ``"format_version"``. Files
without it were written before issue 13 (format 1: the mask settings flat in ``"train"``)
and are read as they were meant; a newer format is refused with one line naming both
versions. Unknown keys are refused by name, in ``config.json`` and in ``--config`` files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from selfmask.errors import SelfmaskError
from selfmask.masking.config import LEGACY_DEFAULTS, MaskConfig
from selfmask.training.fields import check_types, from_mapping, to_mapping

METHODS = ("mask", "topk", "fft", "linear")
HEADS = ("linear", "masked-random")
PRECISIONS = ("fp32", "bf16")

#: ``TrainConfig.mask.targets`` meaning "the backbone's own preset" (resolved by :meth:`TrainConfig.mask_config`).
PRESET_TARGETS = "preset"
#: MaskConfig fields a TrainConfig sets itself: the mode from ``method``, ``keep_ratio`` and ``seed`` from its own.
DERIVED_MASK_FIELDS = ("mode", "keep_ratio", "seed")
#: The mask settings format 1 kept flat in ``"train"`` (TrainConfig key -> MaskConfig field).
V1_MASK_KEYS = {"threshold": "threshold", "init_score": "init_score", "mask_targets": "targets", "bn": "bn"}
#: Written into ``"train"`` for readers of config.json, not read back.
DERIVED_TRAIN_KEYS = ("resolved_lr", "resolved_weight_decay")


def objective_configs() -> dict[str, type | None]:
    """Objective name -> its settings dataclass (``None``: no settings), for the reader and the flags.

    Names and settings classes are those of :mod:`selfmask.objectives.registry`
    (``register_objective(name, settings=...)``), so an objective with a settings dataclass (e.g.
    DINO's) gets its flag group and its ``config.json`` key (its name) with no other edit.
    """
    from selfmask.objectives import registry

    names = sorted(registry.objective_names(), key=lambda name: name != "supervised")
    return {name: registry.objective_settings(name) for name in names}


#: The paper's optimiser settings per method (METHOD.md sections 1 and 3): used when a
#: field is left ``None``.
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "mask": {"lr": 50.0, "weight_decay": 0.0},
    "topk": {"lr": 50.0, "weight_decay": 0.0},
    "fft": {"lr": 0.001, "weight_decay": 5e-4},
    "linear": {"lr": 0.1, "weight_decay": 0.0},
}


@dataclass
class TrainConfig:
    """How to adapt a backbone.

    Attributes:
        method: ``mask`` (supervised masking: scores + a new head), ``topk`` (top-k
            mask baseline, edge-popup style), ``fft`` (full fine-tuning), ``linear``
            (a linear head on the frozen backbone, trained with SGD).
        objective: ``supervised`` (cross-entropy on labels) or ``swav`` (no labels).
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
        mask: the masks of ``mask``/``topk`` runs, a :class:`MaskConfig` (or a dict of its
            fields): threshold mu, initial score S0, BatchNorm policy, selective masking
            (``trainable_fraction``), rescaling, score noise, ... Its ``targets`` default,
            :data:`PRESET_TARGETS`, means the backbone's preset; its ``mode``,
            ``keep_ratio`` and ``seed`` follow ``method``, ``keep_ratio`` and ``seed``.
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

    method: Literal["mask", "topk", "fft", "linear"] = field(default="mask", metadata={
        "help": "mask | topk | fft | linear (default mask)"})
    objective: str = field(default="supervised", metadata={
        "help": "training objective: supervised (labels) or a self-supervised one (default supervised)"})
    epochs: int = field(default=10, metadata={"help": "passes over the training set (default 10)"})
    batch_size: int = field(default=64, metadata={"help": "images per step (default 64)"})
    lr: float | None = field(default=None, metadata={
        "help": "learning rate of what is adapted (default: mask 50, fft 0.001, linear 0.1)"})
    head_lr: float = field(default=0.1, metadata={"help": "learning rate of the new head (default 0.1)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (default 0.9)"})
    weight_decay: float | None = field(default=None, metadata={
        "help": "weight decay of what is adapted (default: masks 0, fft 5e-4)"})
    head_weight_decay: float = field(default=0.0, metadata={"help": "weight decay of the head (default 0)"})
    warmup_epochs: float = field(default=0.0, metadata={
        "help": "linear warm-up epochs before the cosine decay (default 0)"})
    head: Literal["linear", "masked-random"] = field(default="linear", metadata={
        "help": "linear | masked-random (default linear)"})
    keep_ratio: float = field(default=0.9, metadata={
        "help": "fraction kept per tensor for --method topk (default 0.9)"})
    mask: MaskConfig = field(default_factory=lambda: MaskConfig(targets=PRESET_TARGETS), metadata={
        "help": "the masks of mask/topk runs (mode, keep_ratio and seed follow method, keep_ratio and seed)"})
    augment: bool = field(default=True, metadata={"help": "random crop / flip"})
    flip: bool = field(default=True, metadata={"help": "horizontal flips (glyphs: a mirrored b is a d)"})
    seed: int = field(default=0, metadata={"help": "seed (default 0)"})
    device: str = field(default="cpu", metadata={"help": "cpu | cuda[:N] (default cpu)"})
    label_fraction: float | None = field(default=None, metadata={
        "help": "train on this seeded fraction of the labels, in (0, 1]"})
    per_class: int | None = field(default=None, metadata={"help": "train on this many labelled images per class"})
    init_from: str | None = field(default=None, metadata={
        "help": "start the masks from this run folder's scores and BN statistics (an SMN: semi-supervised)"})
    checkpoint_every: int = field(default=0, metadata={
        "help": "write a resumable checkpoint every N steps (default 0: at the end of each epoch only)"})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={
        "help": "fp32 | bf16 (bfloat16 autocast of the forward passes; default fp32)"})
    channels_last: bool = field(default=False, metadata={"help": "channels-last weights and inputs (GPU convolutions)"})
    compile: bool = field(default=False, metadata={"help": "run the model through torch.compile"})
    fast_masks: bool = field(default=True, metadata={
        "help": "compute the masks of all layers in one pass per step (off: per layer per forward pass)"})
    sync_bn: bool = field(default=False, metadata={
        "help": "distributed GPU runs: SyncBatchNorm instead of per-process statistics"})
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.mask, dict):  # a config file's or config.json's "mask" object
            derived = sorted(set(self.mask) & set(DERIVED_MASK_FIELDS))
            if derived:
                raise SelfmaskError(f"mask: {derived[0]!r} is not a setting of its own: the masks' mode follows "
                                    "method (topk: top-k masks), keep_ratio and seed are the run's")
            self.mask = from_mapping(MaskConfig, {"targets": PRESET_TARGETS, **self.mask, **self._mask_derived()},
                                     "mask")
        if not isinstance(self.mask, MaskConfig):
            raise SelfmaskError(f"mask must be a MaskConfig or an object of its fields, got {self.mask!r}")
        check_types(self)
        if self.method not in METHODS:
            raise SelfmaskError(f"unknown method {self.method!r}; expected one of {METHODS}")
        objectives = tuple(objective_configs())
        if self.objective not in objectives:
            raise SelfmaskError(f"unknown objective {self.objective!r}; expected one of {objectives}")
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
        if self.sync_bn and not str(self.device).startswith("cuda"):
            raise SelfmaskError(
                f"sync_bn needs a CUDA device (PyTorch's SyncBatchNorm runs on GPUs only), got device {self.device!r}"
            )
        if self.objective != "supervised" and self.method not in ("mask", "topk", "fft"):
            raise SelfmaskError(f"objective {self.objective!r} trains masks or weights; "
                                f"method {self.method!r} has nothing to train")
        try:  # mode, keep_ratio and seed of the masks follow the run's
            self.mask = replace(self.mask, **self._mask_derived())
        except ValueError as exc:
            raise SelfmaskError(f"mask: {exc}") from None

    def _mask_derived(self) -> dict[str, Any]:
        topk = self.method == "topk"
        return {"mode": "topk" if topk else "threshold", "keep_ratio": self.keep_ratio if topk else None,
                "seed": self.seed}

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else METHOD_DEFAULTS[self.method]["lr"]

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return METHOD_DEFAULTS[self.method]["weight_decay"]

    def to_dict(self) -> dict[str, Any]:
        """JSON fields (``mask`` without the fields the run sets), plus the resolved lr and weight decay."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["mask"] = {k: v for k, v in self.mask.to_dict().items() if k not in DERIVED_MASK_FIELDS}
        out["resolved_lr"] = self.resolved_lr
        out["resolved_weight_decay"] = self.resolved_weight_decay
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "training config") -> TrainConfig:
        """The one reader of a TrainConfig's JSON form: :meth:`to_dict`'s, or format 1's (mask settings flat).

        Unknown keys are refused by name; ``resolved_lr``/``resolved_weight_decay`` are ignored.
        """
        return from_mapping(cls, upgrade_train_v1(data, where), where, ignore=DERIVED_TRAIN_KEYS)

    def mask_config(self, preset: str | list[str] | tuple[str, ...]) -> MaskConfig | None:
        """The backbone's :class:`MaskConfig` for this run (``None`` unless method is mask or topk).

        ``preset`` is the backbone's target preset, used when ``mask.targets`` is :data:`PRESET_TARGETS`.
        """
        if self.method not in ("mask", "topk"):
            return None
        return replace(self.mask, targets=preset) if self.mask.targets == PRESET_TARGETS else self.mask

    def head_mask_config(self) -> MaskConfig:
        """The :class:`MaskConfig` of the ``masked-random`` head (the authors' head)."""
        return head_mask_config(self.mask.threshold, self.mask.init_score)


def head_mask_config(threshold: float, init_score: float) -> MaskConfig:
    """The masked-random head's masks: every weight, with the run's threshold and initial score."""
    return MaskConfig(targets=["weight"], threshold=threshold, init_score=init_score)


def upgrade_train_v1(data: Any, where: str) -> Any:
    """A format-1 ``"train"`` object (``threshold``, ``init_score``, ``mask_targets``, ``bn`` flat) in today's form."""
    if not isinstance(data, dict) or "mask" in data or not any(k in data for k in V1_MASK_KEYS):
        return data
    data = dict(data)
    mask = {V1_MASK_KEYS[k]: data.pop(k) for k in list(data) if k in V1_MASK_KEYS}
    if mask.get("targets", PRESET_TARGETS) is None:
        mask["targets"] = PRESET_TARGETS
    data["mask"] = mask
    return data


def legacy_train_view(train: dict[str, Any]) -> dict[str, Any]:
    """A :meth:`TrainConfig.to_dict` in format 1's flat form (to compare with checkpoints written before issue 13)."""
    out = {k: v for k, v in train.items() if k != "mask"}
    mask = train.get("mask") or {}
    for key, name in V1_MASK_KEYS.items():
        out[key] = mask.get(name)
    if out.get("mask_targets") == PRESET_TARGETS:
        out["mask_targets"] = None
    return out


# ---------------------------------------------------------------------------------------------- config.json

#: Format of ``config.json``: 2 adds ``format_version`` and ``train.mask`` (issue 13); 1 (no key) is older.
RUN_FORMAT_VERSION = 2
#: Provenance keys callers record beside the settings (``run_meta``): what defines the base and the data.
META_KEYS = ("data_spec", "base_fingerprint", "label_subset", "cascade_group", "base_seed")


@dataclass
class RunConfig:
    """A run folder's ``config.json``, typed: :meth:`from_json` is its one reader, :meth:`to_json` its one writer.

    Attributes:
        backbone: the backbone's name or specification; ``weights`` its checkpoint (``None``:
            the random initialisation after ``torch.manual_seed(seed)``); ``embedding`` the
            embedding it returns.
        seed: the run's seed (also the seed of a random base).
        mask: the backbone's resolved masks (``None``: no masks were trained).
        train: the training settings (``None`` in a minimal folder: backbone, weights, seed, mask).
        data: what the run trained on (name, classes, image counts, resolution).
        objective_config: the objective's settings (e.g. a ``SwAVConfig``), stored under its name.
        crops: the multi-crop views of a self-supervised run (a ``MultiCropConfig``; a dict
            ``{"type": name}`` for crops of another kind).
        meta: provenance keys of :data:`META_KEYS` (``data_spec``, ``base_fingerprint``, ...).
        format_version: the format the file was written in.
    """

    backbone: str
    seed: int
    weights: str | None = None
    embedding: str | None = None
    mask: MaskConfig | None = None
    train: TrainConfig | None = None
    data: dict[str, Any] | None = None
    objective_config: Any = None
    crops: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    format_version: int = RUN_FORMAT_VERSION
    written_by: str | None = None

    @property
    def data_spec(self) -> str | None:
        return self.meta.get("data_spec")

    @property
    def objective(self) -> str | None:
        return self.train.objective if self.train is not None else None

    def multicrop(self, seed: int | None = None) -> Any:
        """The recorded multi-crop views as a ``MultiCrop`` seeded with ``seed`` (default: the run's); ``None``
        when none were recorded as a ``MultiCropConfig``."""
        from selfmask.data.multicrop import MultiCrop, MultiCropConfig

        if not isinstance(self.crops, MultiCropConfig):
            return None
        return MultiCrop(self.crops, seed=self.seed if seed is None else seed)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``config.json`` (keys in the order of format 1, the version first)."""
        from selfmask.version import __version__

        out: dict[str, Any] = {"format_version": RUN_FORMAT_VERSION, "written_by": f"selfmask {__version__}",
                               "backbone": self.backbone, "embedding": self.embedding, "weights": self.weights,
                               "seed": self.seed, "mask": self.mask.to_dict() if self.mask is not None else None}
        if self.train is not None:
            out["train"] = self.train.to_dict()
        if self.data is not None:
            out["data"] = self.data
        if self.objective_config is not None and self.train is not None:
            out[self.train.objective] = to_mapping(self.objective_config)
        if self.crops is not None:
            out["crops"] = self.crops if isinstance(self.crops, dict) else _crops_json(self.crops)
        return {**out, **self.meta}

    @classmethod
    def from_json(cls, data: Any, where: str | Path) -> RunConfig:
        """Read a ``config.json`` object (format 1 or :data:`RUN_FORMAT_VERSION`); every problem one
        :class:`SelfmaskError` naming ``where`` and the key."""
        from selfmask.data.multicrop import MultiCropConfig

        if not isinstance(data, dict):
            raise SelfmaskError(f"{where}: expected a JSON object")
        version = data.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise SelfmaskError(f"{where}: 'format_version' must be an integer >= 1, got {version!r}")
        if version > RUN_FORMAT_VERSION:
            who = f" by {data['written_by']}" if isinstance(data.get("written_by"), str) else ""
            raise SelfmaskError(f"{where}: written{who} in run config format {version}; this selfmask reads formats "
                                f"up to {RUN_FORMAT_VERSION} (upgrade selfmask to read it)")
        configs = objective_configs()
        known = {"format_version", "written_by", "backbone", "embedding", "weights", "seed", "mask", "train", "data",
                 "crops", *META_KEYS, *(name for name, c in configs.items() if c is not None)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SelfmaskError(f"{where}: unknown key {unknown[0]!r}; a run's config.json has {sorted(known)}")
        for key in ("backbone", "seed"):
            if key not in data:
                raise SelfmaskError(f"{where}: key {key!r} is missing")
        _check_json_types(data, where)
        top_mask = None
        if data.get("mask") is not None:  # format 1: keys added later have the meaning they had then
            recorded = data["mask"] if version > 1 else {**LEGACY_DEFAULTS, **(data["mask"] or {})}
            top_mask = from_mapping(MaskConfig, recorded, f"{where}: 'mask'")
        train = None
        if data.get("train") is not None:
            raw = data["train"]
            if version == 1 and isinstance(raw, dict) and top_mask is not None:  # what format 1 did not record
                raw = upgrade_train_v1(raw, where)
                kept = {k: v for k, v in top_mask.to_dict().items() if k not in (*DERIVED_MASK_FIELDS, "targets")}
                raw = {**raw, "mask": {**kept, **(raw.get("mask") or {})}}
            train = TrainConfig.from_dict(raw, f"{where}: 'train'")
        objective_config = None
        if train is not None and configs.get(train.objective) is not None and data.get(train.objective) is not None:
            objective_config = _read_objective(configs[train.objective], data[train.objective],
                                               f"{where}: {train.objective!r}")
        crops = data.get("crops")
        if isinstance(crops, dict) and "type" not in crops:
            crops = from_mapping(MultiCropConfig, crops, f"{where}: 'crops'")
        elif crops is not None and not isinstance(crops, dict):
            raise SelfmaskError(f"{where}: 'crops' must be an object, got {crops!r}")
        return cls(backbone=data["backbone"], seed=data["seed"], weights=data.get("weights"),
                   embedding=run_embedding(data), mask=top_mask, train=train, data=data.get("data"),
                   objective_config=objective_config, crops=crops,
                   meta={k: data[k] for k in META_KEYS if k in data}, format_version=version,
                   written_by=data.get("written_by"))


def run_embedding(cfg: dict[str, Any]) -> str | None:
    """The embedding a ``config.json`` (or cascade manifest) records; runs written before it was recorded used the
    legacy one."""
    from selfmask.backbones.registry import LEGACY_EMBEDDING, backbone_info

    if "embedding" in cfg:
        return None if cfg["embedding"] is None else str(cfg["embedding"])
    return LEGACY_EMBEDDING if backbone_info(cfg["backbone"]).embeddings else None


def _check_json_types(data: dict[str, Any], where: str | Path) -> None:
    """The identity keys have the types ``selfmask adapt`` writes (an edited file: one line, not a traceback)."""
    expected = {"backbone": (str,), "data_spec": (str,), "weights": (str, type(None)), "seed": (int,),
                "embedding": (str, type(None)), "train": (dict, type(None)), "mask": (dict, type(None))}
    names = {str: "a string", int: "an integer", dict: "an object", type(None): "null"}
    for key, kinds in expected.items():
        if key not in data:
            continue
        value = data[key]
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise SelfmaskError(f"{where}: {key!r} must be {' or '.join(names[t] for t in kinds)}, got {value!r}")
    if not 0 <= data["seed"] <= 2**32 - 1:
        raise SelfmaskError(f"{where}: 'seed' must be an integer in [0, {2**32 - 1}], got {data['seed']}")


def _read_objective(cls: type, value: Any, where: str) -> Any:
    reader = getattr(cls, "from_dict", None)
    if reader is None:
        return from_mapping(cls, value, where)
    if not isinstance(value, dict):
        raise SelfmaskError(f"{where}: expected a JSON object, got {type(value).__name__}")
    try:
        return reader(value)
    except (SelfmaskError, TypeError, ValueError) as exc:
        raise SelfmaskError(f"{where}: {exc}") from None


def _crops_json(crops: Any) -> dict[str, Any]:
    return {k: v for k, v in to_mapping(crops).items() if not (isinstance(v, float) and math.isnan(v))}


def read_config_json(path: str | Path) -> RunConfig:
    """``RUN_DIR/config.json`` read and checked (``path`` is the run folder)."""
    from selfmask.io import read_json_object

    f = Path(path) / "config.json"
    if not f.is_file():
        raise SelfmaskError(f"{str(path)!r} is not a run folder: {f.name} is missing")
    return RunConfig.from_json(read_json_object(f, str(f)), f)
