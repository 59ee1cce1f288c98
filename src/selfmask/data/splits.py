"""CoOp-style split files (``split_zhou_<Dataset>.json``), as used for the paper's eight datasets.

A split file is JSON ``{"train": [...], "val": [...], "test": [...]}``; each entry is
``[relative_image_path, label, classname]`` with the path relative to the dataset's
image folder (CoOp's ``image_dir``: ``dtd/images``, ``eurosat/2750``,
``oxford_flowers/jpg``, ``oxford_pets/images``, ``sun397/SUN397``,
``ucf101/UCF-101-midframes``). Class names are taken from the file: label ``i`` is
named by its entries, over all splits, so the three splits share one class list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from selfmask.data.base import ImageTensorDataset
from selfmask.data.cache import cached_images
from selfmask.errors import SelfmaskError

SPLITS = ("train", "val", "test")
Entry = tuple[str, int, str]


def read_split_file(path: str | Path) -> dict[str, list[Entry]]:
    """The validated entries of a split file, per split.

    Raises:
        SelfmaskError: naming the file, for unreadable JSON, a missing split, or an
            entry that is not ``[path, label, classname]``.
    """
    path = Path(path)
    if not path.is_file():
        raise SelfmaskError(f"split file {str(path)!r} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SelfmaskError(f"split file {str(path)!r} is not readable JSON: {e}") from None
    if not isinstance(doc, Mapping):
        raise SelfmaskError(f"split file {str(path)!r}: expected an object with keys {SPLITS}")
    out: dict[str, list[Entry]] = {}
    for split in SPLITS:
        if split not in doc:
            raise SelfmaskError(f"split file {str(path)!r} has no {split!r} list (keys: {sorted(doc)})")
        rows = doc[split]
        if not isinstance(rows, list):
            raise SelfmaskError(f"split file {str(path)!r}: {split!r} must be a list")
        entries: list[Entry] = []
        for i, row in enumerate(rows):
            ok = (
                isinstance(row, (list, tuple))
                and len(row) == 3
                and isinstance(row[0], str)
                and isinstance(row[1], int)
                and not isinstance(row[1], bool)
                and row[1] >= 0
                and isinstance(row[2], str)
            )
            if not ok:
                raise SelfmaskError(
                    f"split file {str(path)!r}: {split}[{i}] = {row!r} is not [relative_path, label, classname]"
                )
            entries.append((row[0], row[1], row[2]))
        out[split] = entries
    return out


def split_classes(splits: Mapping[str, list[Entry]], source: str = "split file") -> list[str]:
    """Class names indexed by label, consistent over all splits."""
    names: dict[int, str] = {}
    for split, entries in splits.items():
        for rel, label, cls in entries:
            if names.setdefault(label, cls) != cls:
                raise SelfmaskError(
                    f"{source}: label {label} is named both {names[label]!r} and {cls!r} ({split}: {rel!r})"
                )
    if not names:
        return []
    # labels must be 0..n-1: look for gaps below n + 10 only (a label of 10**10 must not build a list that long)
    absent = [i for i in range(min(max(names) + 1, len(names) + 10)) if i not in names]
    if absent:
        raise SelfmaskError(f"{source}: labels {absent[:10]} have no entry, so their class names are unknown")
    return [names[i] for i in range(len(names))]


def load_split(
    split_file: str | Path,
    image_root: str | Path,
    split: str,
    resolution: int,
    cache_dir: str | Path | None = None,
    name: str | None = None,
    resample: str = "bicubic",
    workers: int | None = None,
) -> ImageTensorDataset:
    """One split (``"train"``, ``"val"`` or ``"test"``) of a CoOp split file as uint8 tensors.

    Raises:
        SelfmaskError: for a bad split file, an unknown split, images the split names
            that do not exist (the first few are listed) or cannot be decoded.
    """
    if split not in SPLITS:
        raise SelfmaskError(f"split must be one of {SPLITS}, got {split!r}")
    splits = read_split_file(split_file)
    classes = split_classes(splits, str(split_file))
    root = Path(image_root)
    if not root.is_dir():
        raise SelfmaskError(f"image folder {str(root)!r} (for split file {str(split_file)!r}) does not exist")
    entries = splits[split]
    for i, (rel, _label, _cls) in enumerate(entries):
        if Path(rel).is_absolute() or ".." in Path(rel).parts or not rel:
            raise SelfmaskError(
                f"split file {str(split_file)!r}: {split}[{i}] names {rel!r}, which is not a path inside the image "
                f"folder {str(root)!r} (absolute paths and '..' are refused)"
            )
    files = [root / rel for rel, _, _ in entries]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        shown = ", ".join(repr(m) for m in missing[:5])
        raise SelfmaskError(
            f"split file {str(split_file)!r} ({split}) names {len(missing)} image(s) that do not exist: {shown}"
            + (" ..." if len(missing) > 5 else "")
        )
    images, record = cached_images(files, resolution, cache_dir, resample, workers)
    labels = torch.tensor([label for _, label, _ in entries], dtype=torch.int64)
    meta = {"source": "split_file", "split_file": str(split_file), "split": split, "image_root": str(root), **record}
    return ImageTensorDataset(images, labels, classes, name or f"{Path(split_file).stem}:{split}", meta)
