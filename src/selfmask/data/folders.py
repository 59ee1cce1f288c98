"""Image folders: one sub-folder per class (torchvision's ``ImageFolder`` layout).

``root/<class>/**/<image>``: classes are the sub-folder names in sorted order (label
``i`` is the ``i``-th name; the test split of ``folder:ROOT`` is labelled by the training
split's class list, so a label means the same class in both), files are taken recursively in sorted order and kept when
their extension is an image one. The images are decoded once (see :mod:`selfmask.data.cache`)
into an :class:`~selfmask.data.base.ImageTensorDataset`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from selfmask.data.base import ImageTensorDataset
from selfmask.data.cache import cached_images
from selfmask.errors import SelfmaskError

log = logging.getLogger("selfmask.data")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_image_folder(
    root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS, classes: Sequence[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """``(files, labels, classes)`` of an image folder, in a deterministic order.

    ``classes``: the class index to label by (another split's, usually the training
    split's); every class folder here must be one of them. Entries with an image
    extension that are not readable files (dangling or looping symbolic links) are
    skipped, counted and reported in one warning.

    Raises:
        SelfmaskError: the folder does not exist, has no class sub-folders, a class
            folder holds no image file, or (with ``classes``) a class is not in ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise SelfmaskError(f"image folder {str(root)!r} does not exist or is not a folder")
    names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise SelfmaskError(f"image folder {str(root)!r} has no class sub-folders (expected root/<class>/<image>)")
    index = {c: i for i, c in enumerate(names if classes is None else classes)}
    unknown = [c for c in names if c not in index]
    if unknown:
        raise SelfmaskError(
            f"image folder {str(root)!r}: class folder(s) {unknown[:10]} have no training images (the training "
            f"split's classes are {list(index)[:10]}{' ...' if len(index) > 10 else ''}); every class needs "
            "training images, or its labels would mean another class"
        )
    files: list[Path] = []
    labels: list[int] = []
    skipped: list[Path] = []
    exts = tuple(e.lower() for e in extensions)
    for cls in names:
        found = []
        for p in (root / cls).rglob("*"):
            if p.suffix.lower() not in exts or p.name.startswith("."):
                continue
            (found if p.is_file() else skipped if p.is_symlink() else []).append(p)
        if not found:
            raise SelfmaskError(f"class folder {str(root / cls)!r} holds no image file ({', '.join(exts)})")
        files += sorted(found)
        labels += [index[cls]] * len(found)
    if skipped:
        shown = ", ".join(repr(str(p)) for p in sorted(skipped)[:3])
        log.warning("image folder %r: skipped %d image link(s) that lead to no readable file (dangling or looping "
                    "symbolic links): %s%s", str(root), len(skipped), shown, " ..." if len(skipped) > 3 else "")
    return files, labels, list(index)


def load_image_folder(
    root: str | Path,
    resolution: int,
    cache_dir: str | Path | None = None,
    name: str | None = None,
    resample: str = "bicubic",
    workers: int | None = None,
    classes: Sequence[str] | None = None,
) -> ImageTensorDataset:
    """Decode an image folder into uint8 tensors at ``resolution`` (cached when ``cache_dir`` is given).

    ``classes``: label by this class index (see :func:`list_image_folder`).

    Raises:
        SelfmaskError: as :func:`list_image_folder`, or naming an unreadable image.
    """
    files, labels, classes = list_image_folder(root, classes=classes)
    images, record = cached_images(files, resolution, cache_dir, resample, workers)
    meta = {"source": "image_folder", "root": str(root), **record}
    return ImageTensorDataset(images, torch.tensor(labels, dtype=torch.int64), classes, name or Path(root).name, meta)
