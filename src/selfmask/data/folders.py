"""Image folders: one sub-folder per class (torchvision's ``ImageFolder`` layout).

``root/<class>/**/<image>``: classes are the sub-folder names in sorted order (label
``i`` is the ``i``-th name), files are taken recursively in sorted order and kept when
their extension is an image one. The images are decoded once (see :mod:`selfmask.data.cache`)
into an :class:`~selfmask.data.base.ImageTensorDataset`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfmask.data.base import ImageTensorDataset
from selfmask.data.cache import cached_images
from selfmask.errors import SelfmaskError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_image_folder(
    root: str | Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> tuple[list[Path], list[int], list[str]]:
    """``(files, labels, classes)`` of an image folder, in a deterministic order.

    Raises:
        SelfmaskError: the folder does not exist, has no class sub-folders, or a class
            folder holds no image file.
    """
    root = Path(root)
    if not root.is_dir():
        raise SelfmaskError(f"image folder {str(root)!r} does not exist or is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SelfmaskError(f"image folder {str(root)!r} has no class sub-folders (expected root/<class>/<image>)")
    files: list[Path] = []
    labels: list[int] = []
    exts = tuple(e.lower() for e in extensions)
    for label, cls in enumerate(classes):
        found = sorted(
            p
            for p in (root / cls).rglob("*")
            if p.suffix.lower() in exts and p.is_file() and not p.name.startswith(".")
        )
        if not found:
            raise SelfmaskError(f"class folder {str(root / cls)!r} holds no image file ({', '.join(exts)})")
        files += found
        labels += [label] * len(found)
    return files, labels, classes


def load_image_folder(
    root: str | Path,
    resolution: int,
    cache_dir: str | Path | None = None,
    name: str | None = None,
    resample: str = "bicubic",
    workers: int | None = None,
) -> ImageTensorDataset:
    """Decode an image folder into uint8 tensors at ``resolution`` (cached when ``cache_dir`` is given).

    Raises:
        SelfmaskError: as :func:`list_image_folder`, or naming an unreadable image.
    """
    files, labels, classes = list_image_folder(root)
    images, record = cached_images(files, resolution, cache_dir, resample, workers)
    meta = {"source": "image_folder", "root": str(root), **record}
    return ImageTensorDataset(images, torch.tensor(labels, dtype=torch.int64), classes, name or Path(root).name, meta)
