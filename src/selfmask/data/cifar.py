"""CIFAR-10 / CIFAR-100 from the official "python version" batches, without arbitrary unpickling.

The official files (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
``batches.meta``; ``cifar-100-python/train``, ``test``, ``meta``) are pickles of plain
dicts holding lists, strings, bytes, integers and one numpy uint8 array. They are read
with :class:`RestrictedUnpickler`, which resolves only numpy's array-reconstruction
functions and refuses every other global, so a tampered file cannot run code.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR100_DIR = "cifar-100-python"


def _numpy_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    """The only globals a CIFAR batch may reference: how numpy pickles an array and its dtype."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at pickle protocol 2
    }
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        if hasattr(numeric, "_frombuffer"):  # pickle protocol 5
            allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, tuples, strings, bytes, numbers and numpy arrays; refuses anything else."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        fn = self._allowed.get((module, name))
        if fn is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return fn


def read_cifar_batch(path: str | Path) -> dict[str, Any]:
    """One CIFAR pickle file as a dict with ``str`` keys.

    Raises:
        SelfmaskError: naming the file, if it is missing, truncated, not a dict, or
            references anything but numpy arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise SelfmaskError(f"CIFAR file {str(path)!r} does not exist")
    try:
        obj = RestrictedUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise SelfmaskError(f"CIFAR file {str(path)!r} was refused: {e}") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError, OSError) as e:
        raise SelfmaskError(f"CIFAR file {str(path)!r} is truncated or corrupted: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise SelfmaskError(f"CIFAR file {str(path)!r}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise SelfmaskError(f"CIFAR file {str(path)!r} has no {key!r} entry (keys: {sorted(batch)})")
    return batch[key]


def _names(values: Any, path: Path, key: str) -> list[str]:
    if not isinstance(values, list):
        raise SelfmaskError(f"CIFAR file {str(path)!r}: {key!r} must be a list of names")
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


def find_cifar_root(root: str | Path) -> tuple[Path, Literal["cifar10", "cifar100"]]:
    """The folder holding the batches (``root`` itself or its ``cifar-10-batches-py`` /
    ``cifar-100-python`` sub-folder) and which variant it holds."""
    root = Path(root)
    for folder in (root, root / CIFAR10_DIR, root / CIFAR100_DIR):
        if (folder / "batches.meta").is_file() or (folder / "data_batch_1").is_file():
            return folder, "cifar10"
        if (folder / "meta").is_file() and ((folder / "train").is_file() or (folder / "test").is_file()):
            return folder, "cifar100"
    raise SelfmaskError(
        f"{str(root)!r} holds no CIFAR python batches (expected {CIFAR10_DIR}/batches.meta and data_batch_1..5, "
        f"or {CIFAR100_DIR}/meta, train, test)"
    )


def load_cifar(
    root: str | Path, split: Literal["train", "test"] = "train", resolution: int | None = None, name: str | None = None
) -> ImageTensorDataset:
    """CIFAR-10 or CIFAR-100 (detected from the files) as a uint8 dataset.

    Args:
        root: the extracted archive's folder or its parent.
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
        resolution: resize the 32 px images to this side (bicubic, antialiased), e.g. 224
            for ViT-B/32; ``None`` keeps 32 px.
        name: dataset name; default ``"cifar10"`` / ``"cifar100"``.
    """
    if split not in ("train", "test"):
        raise SelfmaskError(f"CIFAR split must be 'train' or 'test', got {split!r}")
    folder, variant = find_cifar_root(root)
    if variant == "cifar10":
        files = [folder / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [folder / "test_batch"]
        meta_file, names_key, labels_key = folder / "batches.meta", "label_names", "labels"
    else:
        files = [folder / split]
        meta_file, names_key, labels_key = folder / "meta", "fine_label_names", "fine_labels"
    classes = _names(_field(read_cifar_batch(meta_file), names_key, meta_file), meta_file, names_key)
    chunks, labels = [], []
    for f in files:
        batch = read_cifar_batch(f)
        data, lab = _field(batch, "data", f), _field(batch, labels_key, f)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            raise SelfmaskError(f"CIFAR file {str(f)!r}: 'data' must be a uint8 array (N, 3072), got {got}")
        lab_arr = np.asarray(lab, dtype=np.int64)
        if lab_arr.shape != (data.shape[0],):
            raise SelfmaskError(f"CIFAR file {str(f)!r}: {len(lab_arr)} labels for {data.shape[0]} images")
        if lab_arr.size and (lab_arr.min() < 0 or lab_arr.max() >= len(classes)):
            raise SelfmaskError(f"CIFAR file {str(f)!r}: labels outside [0, {len(classes)})")
        chunks.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(lab_arr))
    images = torch.cat(chunks)
    if resolution is not None and resolution != 32:
        images = resize_uint8(images, resolution)
    meta = {"source": "cifar", "root": str(folder), "split": split, "resolution": int(images.shape[-1])}
    return ImageTensorDataset(images, torch.cat(labels), classes, name or variant, meta)


def resize_uint8(images: torch.Tensor, resolution: int, chunk: int = 1024) -> torch.Tensor:
    """Resize square uint8 images ``(N, 3, s, s)`` to ``resolution`` (bicubic, antialiased), in chunks."""
    if resolution < 1:
        raise SelfmaskError(f"resolution must be positive, got {resolution}")
    out = torch.empty((images.shape[0], 3, resolution, resolution), dtype=torch.uint8)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].float()
        y = torch.nn.functional.interpolate(
            x, size=(resolution, resolution), mode="bicubic", antialias=True, align_corners=False
        )
        out[i : i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out
