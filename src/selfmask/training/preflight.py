"""Checks before a training run starts: fail in the first second, not after an hour.

:func:`preflight` looks at everything a run will need and returns one clear message
per problem (all of them together, so one attempt shows every fix to make):

* the configuration is valid (:class:`~selfmask.training.config.TrainConfig`, the device,
  the backbone name);
* the weights file exists, is readable, has a supported type and is not truncated
  (a safetensors header, or a torch zip archive's central directory);
* the data specification names readable files (the image folders, CIFAR batches or
  split file; nothing is decoded yet);
* the run folder can be written (without creating or deleting anything) and does not
  hold a finished run;
* the disk holding the run folder has room for the checkpoints: see
  :func:`checkpoint_bytes_estimate`.

:func:`run_preflight` raises :class:`PreflightError` (a
:class:`~selfmask.errors.SelfmaskError`, so the command line prints it and exits 2).
Nothing here writes outside a probe file that is removed at once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfmask.errors import SelfmaskError

#: Bytes per float32 entry of a state dict.
FLOAT_BYTES = 4
#: Room kept free beyond the estimate: logs, metrics, the JSON files, file-system slack.
MARGIN_BYTES = 64 * 2**20
#: Serialisation overhead per tensor of a checkpoint (its name, storage record and archive entry).
TENSOR_OVERHEAD_BYTES = 1024
#: Classes assumed for the head before the data is loaded (an upper bound for the datasets used here).
HEAD_CLASSES_BOUND = 1000


class PreflightError(SelfmaskError):
    """One or more problems found before training; the message lists each on its own line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        n = len(problems)
        super().__init__(
            f"{n} problem{'s' if n != 1 else ''} found before training (nothing was started):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes a run needs on disk: model and optimiser state of one checkpoint, and the total."""

    model_bytes: int
    optimizer_bytes: int
    output_bytes: int
    needed_bytes: int


def checkpoint_bytes_estimate(backbone: str, method: str, num_classes: int = HEAD_CLASSES_BOUND) -> DiskEstimate:
    """An upper bound on the disk space a run of ``method`` on ``backbone`` needs.

    A checkpoint holds the model state (base weights and buffers; for mask/topk also one
    float32 score per weight, counted for every parameter as a bound) and the optimiser
    state (one momentum buffer per trained entry), plus :data:`TENSOR_OVERHEAD_BYTES` per
    tensor for the serialisation. During the atomic replace the old and
    the new checkpoint exist together, hence twice; the final outputs (scores or weights,
    buffers, head) and :data:`MARGIN_BYTES` come on top. The backbone is built on the
    ``meta`` device, so nothing is allocated.
    """
    import torch

    from selfmask.backbones import backbone_info, build_backbone

    info = backbone_info(backbone)
    try:
        with torch.device("meta"):
            model = build_backbone(backbone)
    except SelfmaskError:  # a library's or user's constructor (timm:NAME, module:factory) that needs real tensors
        with torch.random.fork_rng(devices=[]):
            model = build_backbone(backbone)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())
    n_params, n_tensors = len(list(model.parameters())), len(model.state_dict())
    head = info.embed_dim * num_classes + num_classes
    masked = method in ("mask", "topk")
    model_entries = params * (2 if masked else 1) + buffers + head
    trained = {"mask": params, "topk": params, "fft": params}.get(method, 0) + head
    model_tensors = n_tensors + (n_params if masked else 0) + 2
    trained_tensors = (n_params if method in ("mask", "topk", "fft") else 0) + 2
    model_bytes = FLOAT_BYTES * model_entries + TENSOR_OVERHEAD_BYTES * model_tensors
    optimizer_bytes = FLOAT_BYTES * trained + TENSOR_OVERHEAD_BYTES * trained_tensors
    output_bytes = FLOAT_BYTES * (params + buffers + head)
    needed = 2 * (model_bytes + optimizer_bytes) + output_bytes + MARGIN_BYTES
    return DiskEstimate(model_bytes, optimizer_bytes, output_bytes, needed)


def existing_ancestor(path: Path) -> Path:
    """``path`` itself or its nearest existing parent (where a new folder would be created)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_disk(out: Path, estimate: DiskEstimate) -> list[str]:
    """A problem when the file system of ``out`` has less free space than ``estimate.needed_bytes``."""
    where = existing_ancestor(out)
    try:
        free = shutil.disk_usage(where).free
    except OSError as exc:
        return [f"run folder {str(out)!r}: cannot read the free disk space of {str(where)!r} ({exc.strerror or exc})"]
    if free < estimate.needed_bytes:
        return [
            f"not enough free disk space for checkpoints in {str(where)!r}: {free} bytes ({_mib(free)}) free, "
            f"{estimate.needed_bytes} bytes ({_mib(estimate.needed_bytes)}) needed (model state "
            f"{_mib(estimate.model_bytes)} + optimiser state {_mib(estimate.optimizer_bytes)}, twice while a "
            f"checkpoint is replaced, + outputs {_mib(estimate.output_bytes)} + margin {_mib(MARGIN_BYTES)}); "
            "free some space or choose another --out"
        ]
    return []


def check_run_folder(out: Path, *, overwrite: bool = False, resume: bool = False) -> list[str]:
    """The run folder is (or can be created as) a writable run folder that holds no finished run."""
    from selfmask.training.ownership import folder_problem

    problem = folder_problem(out)
    if problem:
        return [problem]
    status_file = out / "status.json"
    if status_file.is_file() and not overwrite:
        try:
            status = json.loads(status_file.read_text()).get("status")
        except (OSError, ValueError, AttributeError):
            status = "unreadable"
        if status in ("finished", "trained"):
            hint = "nothing to resume" if resume else "pass --overwrite to replace it or choose another --out"
            return [f"run folder {str(out)!r} already holds a finished run ({status}); {hint}"]
    where = existing_ancestor(out)
    if not where.is_dir():
        return [f"run folder {str(out)!r}: {str(where)!r} is not a folder, so the run folder cannot be created"]
    if not os.access(where, os.W_OK | os.X_OK):
        return [f"run folder {str(out)!r} is not writable (no write permission on {str(where)!r})"]
    try:
        fd, probe = tempfile.mkstemp(prefix=".preflight.", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return [f"run folder {str(out)!r} is not writable: {exc.strerror or exc} (in {str(where)!r})"]
    return []


def check_init_from(init_from: object, out: Path) -> list[str]:
    """``--init-from`` must not be the run folder itself (the run would replace what it starts from)."""
    if isinstance(init_from, (str, Path)) and os.path.realpath(init_from) == os.path.realpath(out):
        return [
            f"--init-from {str(init_from)!r} and --out {str(out)!r} are the same folder: the new run would replace "
            "the run it starts from; choose another --out"
        ]
    return []


def _readable_file(path: Path, what: str) -> str | None:
    if not path.exists():
        return f"{what} {str(path)!r} does not exist"
    if not path.is_file():
        return f"{what} {str(path)!r} is not a file"
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return f"{what} {str(path)!r} is not readable: {exc.strerror or exc}"
    return None


def check_weights(weights: str | Path | None) -> list[str]:
    """The weights file exists, is readable, has a supported type and a complete header/archive index."""
    if weights is None:
        return []
    from selfmask.backbones.loading import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES

    path = Path(weights)
    problem = _readable_file(path, "weights file")
    if problem:
        return [problem]
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            return [f"weights file {str(path)!r} is not a readable safetensors file (truncated or corrupted?): {exc}"]
        return []
    if not name.endswith(TORCH_SUFFIXES):
        return [
            f"weights file {str(path)!r}: unsupported file type; expected one of "
            f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
        ]
    if path.stat().st_size == 0:
        return [f"weights file {str(path)!r} is empty"]
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            return [f"weights file {str(path)!r} is a damaged torch archive (truncated?): {exc}"]
    return []


def check_data(spec: str) -> list[str]:
    """The files a ``--data`` specification names exist and are readable (nothing is decoded)."""
    kind, _, rest = spec.partition(":")
    if kind.startswith("embedded"):
        from selfmask.data.sources import SPEC_HELP

        if rest or kind not in ("embedded", "embedded-pretrain", "embedded-tiny", "embedded-tiny-pretrain"):
            return [f"unknown data specification {spec!r}; expected one of: {SPEC_HELP}"]
        return []
    if kind in ("cifar10", "cifar100", "folder", "split") and not rest:
        return [f"data {spec!r}: a path is missing after {kind + ':'!r}"]
    if kind in ("cifar10", "cifar100"):
        return _check_cifar(spec, Path(rest).expanduser())
    if kind == "folder":
        return _check_folders(spec, Path(rest).expanduser())
    if kind == "split":
        split_file, _, image_root = rest.partition(":")
        if not split_file or not image_root:
            return [f"data {spec!r}: expected split:SPLIT_FILE:IMAGE_ROOT"]
        problems = [p for p in [_readable_file(Path(split_file).expanduser(), f"data {spec!r}: split file")] if p]
        if not Path(image_root).expanduser().is_dir():
            problems.append(f"data {spec!r}: image folder {image_root!r} does not exist")
        return problems
    from selfmask.data.sources import SPEC_HELP

    return [f"unknown data specification {spec!r}; expected one of: {SPEC_HELP}"]


def _check_cifar(spec: str, root: Path) -> list[str]:
    from selfmask.data.cifar import find_cifar_root

    if not root.exists():
        return [f"data {spec!r}: {str(root)!r} does not exist"]
    try:
        folder, variant = find_cifar_root(root)
    except SelfmaskError as exc:
        return [f"data {spec!r}: {exc}"]
    names = (
        ["batches.meta", "test_batch", *(f"data_batch_{i}" for i in range(1, 6))]
        if variant == "cifar10"
        else ["meta", "train", "test"]
    )
    return [p for p in (_readable_file(folder / n, f"data {spec!r}: CIFAR file") for n in names) if p]


def _check_folders(spec: str, root: Path) -> list[str]:
    from selfmask.data.folders import list_image_folder

    if not root.is_dir():
        return [f"data {spec!r}: {str(root)!r} does not exist or is not a folder"]
    problems: list[str] = []
    classes = None  # the test split is labelled by the training split's classes
    for split in ("train", "test"):
        sub = root / split
        if not sub.is_dir():
            problems.append(f"data {spec!r}: expected a folder {str(sub)!r} (one subfolder per class)")
            continue
        try:
            files, _labels, found = list_image_folder(sub, classes=classes)
            classes = found if split == "train" else classes
        except (SelfmaskError, OSError) as exc:
            problems.append(f"data {spec!r}: {exc}")
            continue
        unreadable = [f for f in files if not os.access(f, os.R_OK)]
        if unreadable:
            shown = ", ".join(repr(str(f)) for f in unreadable[:3])
            more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
            problems.append(f"data {spec!r}: {len(unreadable)} image file(s) are not readable: {shown}{more}")
    return problems


def check_config(train_settings: Any, backbone: str) -> tuple[Any, list[str]]:
    """``(TrainConfig or None, problems)``: the settings (a TrainConfig, or a dict of its fields), the device
    and the backbone name."""
    from selfmask.backbones import backbone_info
    from selfmask.training.config import TrainConfig
    from selfmask.training.trainer import resolve_device

    problems: list[str] = []
    cfg = train_settings if isinstance(train_settings, TrainConfig) else None
    try:
        cfg = cfg or TrainConfig(**train_settings)
    except (SelfmaskError, TypeError) as exc:  # TypeError: a key TrainConfig does not have
        problems.append(f"config: {exc}")
    if cfg is not None:
        try:
            resolve_device(cfg.device)
        except SelfmaskError as exc:
            problems.append(f"config: {exc}")
        except RuntimeError:  # torch's own message for a malformed device string lists every device type
            problems.append(f"config: unsupported device {cfg.device!r}; expected cpu or cuda[:N]")
    try:
        backbone_info(backbone)
    except SelfmaskError as exc:
        problems.append(f"backbone: {exc}")
    return cfg, problems


def preflight(
    *,
    out: str | Path,
    backbone: str,
    weights: str | Path | None,
    data: str,
    train_settings: Any,
    overwrite: bool = False,
    resume: bool = False,
) -> list[str]:
    """Every problem found, one message each (empty: the run can start). ``train_settings``: a
    ``TrainConfig`` or a dict of its fields."""
    out = Path(out)
    cfg, problems = check_config(train_settings, backbone)
    init_from = cfg.init_from if cfg is not None else train_settings.get("init_from")
    problems += check_init_from(init_from, out)
    problems += check_weights(weights)
    problems += check_data(data)
    folder_problems = check_run_folder(out, overwrite=overwrite, resume=resume)
    problems += folder_problems
    if not folder_problems and cfg is not None and not any(p.startswith("backbone:") for p in problems):
        problems += check_disk(out, checkpoint_bytes_estimate(backbone, cfg.method))
    return problems


def run_preflight(**kwargs: Any) -> None:
    """:func:`preflight`, raising :class:`PreflightError` listing every problem found."""
    problems = preflight(**kwargs)
    if problems:
        raise PreflightError(problems)


__all__ = [
    "DiskEstimate",
    "PreflightError",
    "check_data",
    "check_disk",
    "check_init_from",
    "check_run_folder",
    "check_weights",
    "checkpoint_bytes_estimate",
    "preflight",
    "run_preflight",
]
