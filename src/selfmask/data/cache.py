"""Decode image files once into a uint8 tensor at a chosen resolution, and cache it on disk.

Decoding JPEGs is a known bottleneck of self-supervised training (many augmented views
per image per epoch). Loaders therefore decode each file once: the shorter side is
resized to ``resolution`` and the centre ``resolution x resolution`` square is kept
(torchvision's ``Resize(r)`` + ``CenterCrop(r)``; bicubic like CLIP's preprocessing by
default), and the result is a ``(N, 3, r, r)`` uint8 tensor. With a ``cache_dir`` that
tensor is stored as a safetensors file keyed by a sha256 of the file list (path, size,
modification time, in order), the resolution and the resampling filter, and reused by
every later run: training reads tensors, not files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError
from selfmask.io import atomic_save_safetensors

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
RESAMPLE_FILTERS = ("bicubic", "bilinear")


def _pil():  # imported lazily: PIL is only needed when files are decoded
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency of matplotlib
        raise SelfmaskError("decoding image files needs Pillow (pip install pillow)") from e
    return Image


def resize_center_crop(image: object, resolution: int, resample: str = "bicubic") -> torch.Tensor:
    """A PIL image -> ``(3, resolution, resolution)`` uint8: shorter side to ``resolution``, centre crop."""
    image_mod = _pil()
    im = image.convert("RGB")  # type: ignore[attr-defined]
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        flt = image_mod.Resampling.BICUBIC if resample == "bicubic" else image_mod.Resampling.BILINEAR
        im = im.resize((nw, nh), flt)
    left, top = round((nw - resolution) / 2.0), round((nh - resolution) / 2.0)
    im = im.crop((left, top, left + resolution, top + resolution))
    # HWC -> CHW in numpy: a torch copy here would use the intra-op thread pool per image, which
    # is 4x slower than a plain copy on a busy machine
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)))


def decode_image(path: str | Path, resolution: int, resample: str = "bicubic") -> torch.Tensor:
    """Decode one image file to ``(3, resolution, resolution)`` uint8.

    Raises:
        SelfmaskError: naming the file, when it is missing, truncated or not an image.
    """
    image_mod = _pil()
    try:
        with image_mod.open(path) as im:
            im.load()
            return resize_center_crop(im, resolution, resample)
    except FileNotFoundError:
        raise SelfmaskError(f"image {str(path)!r} does not exist") from None
    except (OSError, ValueError, SyntaxError, image_mod.DecompressionBombError) as e:
        raise SelfmaskError(f"image {str(path)!r} could not be decoded: {e}") from None


def _check(resolution: int, resample: str) -> None:
    if not isinstance(resolution, int) or resolution < 1:
        raise SelfmaskError(f"resolution must be a positive integer number of pixels, got {resolution!r}")
    if resample not in RESAMPLE_FILTERS:
        raise SelfmaskError(f"resample must be one of {RESAMPLE_FILTERS}, got {resample!r}")


def decode_images(
    paths: Sequence[str | Path], resolution: int, resample: str = "bicubic", workers: int | None = None
) -> torch.Tensor:
    """Decode ``paths`` in order into ``(N, 3, resolution, resolution)`` uint8.

    ``workers`` threads decode in parallel (Pillow releases the GIL while decoding and
    resizing); the result does not depend on their number.
    """
    _check(resolution, resample)
    out = torch.empty((len(paths), 3, resolution, resolution), dtype=torch.uint8)
    rows = out.numpy()  # written through numpy: single-threaded copies, safe from several threads
    workers = workers or min(8, os.cpu_count() or 1)

    def one(i: int) -> None:
        rows[i] = decode_image(paths[i], resolution, resample).numpy()

    if workers <= 1 or len(paths) < 2:
        for i in range(len(paths)):
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(one, range(len(paths))):
                pass
    return out


def cache_key(paths: Sequence[str | Path], resolution: int, resample: str = "bicubic") -> str:
    """sha256 over the ordered file list (path, size, mtime), the resolution and the filter."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_FORMAT_VERSION, resolution, resample, len(paths)]).encode())
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            raise SelfmaskError(f"image {str(p)!r} does not exist") from None
        h.update(f"\n{os.path.abspath(p)}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_images(
    paths: Sequence[str | Path],
    resolution: int,
    cache_dir: str | Path | None = None,
    resample: str = "bicubic",
    workers: int | None = None,
) -> tuple[torch.Tensor, dict[str, object]]:
    """The decoded ``(N, 3, r, r)`` uint8 images of ``paths``, from the cache when it holds them.

    Returns the images and a record ``{"cache_key", "cache_file", "cache_hit", "resolution",
    "resample"}``. Images read from the cache are memory-mapped from the file (pages are
    read on first use and shared through the operating system's page cache). A cache file
    that cannot be read or does not match is rebuilt (with a warning); it is written
    atomically, so an interrupted run never leaves a broken one.
    """
    _check(resolution, resample)
    key = cache_key(paths, resolution, resample)
    record: dict[str, object] = {"cache_key": key, "resolution": resolution, "resample": resample}
    if cache_dir is None:
        record.update(cache_file=None, cache_hit=False)
        return decode_images(paths, resolution, resample, workers), record
    file = Path(cache_dir) / f"images-{resolution}px-{key[:20]}.safetensors"
    record["cache_file"] = str(file)
    if file.is_file():
        images = _read_cache(file, key, (len(paths), 3, resolution, resolution))
        if images is not None:
            record["cache_hit"] = True
            return images, record
    images = decode_images(paths, resolution, resample, workers)
    file.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(file, {"images": images}, {"cache_key": key, "count": str(len(paths))})
    record["cache_hit"] = False
    return images, record


def _read_cache(file: Path, key: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            images = f.get_tensor("images")
    except (SafetensorError, OSError) as e:
        logger.warning("image cache %s is unreadable (%s); rebuilding it", file, e)
        return None
    if meta.get("cache_key") != key or images.dtype != torch.uint8 or tuple(images.shape) != shape:
        logger.warning("image cache %s does not match its file list; rebuilding it", file)
        return None
    return images


def save_tensor_dataset(dataset: ImageTensorDataset, path: str | Path) -> Path:
    """Write a dataset (uint8 images, labels, class names, meta) to one safetensors file, atomically."""
    path = Path(path)
    meta = {"classes": json.dumps(dataset.classes), "name": dataset.name, "meta": json.dumps(dataset.meta, default=str)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(path, {"images": dataset.images, "labels": dataset.labels}, meta)
    return path


def load_tensor_dataset(path: str | Path) -> ImageTensorDataset:
    """Read a file written by :func:`save_tensor_dataset`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SelfmaskError(f"dataset file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            images, labels = f.get_tensor("images"), f.get_tensor("labels")
        classes = json.loads(meta["classes"])
        extra = json.loads(meta.get("meta", "{}"))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise SelfmaskError(f"dataset file {str(path)!r} is not a selfmask dataset file: {e}") from None
    return ImageTensorDataset(images, labels, classes, meta.get("name", path.stem), extra)
