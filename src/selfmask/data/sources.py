"""Resolve a ``--data`` specification into train and test :class:`ImageTensorDataset` s.

Specifications (paths are local; nothing is downloaded):

- ``embedded`` / ``embedded-pretrain``: the embedded benchmark's downstream / pretraining
  domain (``embedded-tiny``, ``embedded-tiny-pretrain``: the small build used by tests).
- ``cifar10:ROOT`` / ``cifar100:ROOT``: the CIFAR python batches under ``ROOT``.
- ``folder:ROOT``: image folders ``ROOT/train/<class>/*`` and ``ROOT/test/<class>/*``.
- ``split:SPLIT_FILE:IMAGE_ROOT``: a CoOp-style ``split_zhou_*.json`` file (its ``train``
  and ``test`` lists) with images under ``IMAGE_ROOT``.

Folder and split datasets are decoded once at ``resolution`` and cached as uint8 tensors;
the embedded benchmark and CIFAR (32 px) are resized (bicubic) when another resolution is asked
for, e.g. by a backbone with a 64 px input.
"""

from __future__ import annotations

from pathlib import Path

from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError

SPEC_HELP = (
    "embedded | embedded-pretrain | embedded-tiny | embedded-tiny-pretrain | cifar10:ROOT | cifar100:ROOT | "
    "folder:ROOT (ROOT/train, ROOT/test) | split:SPLIT_FILE:IMAGE_ROOT"
)


def resized(data: ImageTensorDataset, resolution: int) -> ImageTensorDataset:
    """``data`` at ``resolution`` px (bicubic), as ``load_data`` gives a backbone another input size."""
    from selfmask.data.cifar import resize_uint8

    meta = {**data.meta, "resolution": resolution, "resized_from": data.resolution}
    return ImageTensorDataset(resize_uint8(data.images, resolution), data.labels, list(data.classes), data.name, meta)


def load_data(
    spec: str, *, resolution: int = 32, seed: int = 0, cache_dir: str | Path | None = None
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """``(train, test)`` for ``spec`` (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind.startswith("embedded"):
        if rest or kind not in ("embedded", "embedded-pretrain", "embedded-tiny", "embedded-tiny-pretrain"):
            raise SelfmaskError(f"unknown data specification {spec!r}; expected one of: {SPEC_HELP}")
        from selfmask.data.embedded import load_embedded

        bench = load_embedded(seed=seed, cache_dir=cache_dir, size="tiny" if "tiny" in kind else "default")
        if kind.endswith("pretrain"):
            pair = bench.pretrain_train, bench.pretrain_test
        else:
            pair = bench.downstream_train, bench.downstream_test
        if resolution == 32:
            return pair
        return resized(pair[0], resolution), resized(pair[1], resolution)
    if kind in ("cifar10", "cifar100"):
        from selfmask.data.cifar import load_cifar

        root = _need_path(spec, rest)
        res = None if resolution == 32 else resolution
        train, test = load_cifar(root, "train", res), load_cifar(root, "test", res)
        if (kind == "cifar10") != (train.num_classes == 10):
            raise SelfmaskError(f"{spec}: the files under {root} hold {train.num_classes} classes, not {kind}")
        return train, test
    if kind == "folder":
        from selfmask.data.folders import load_image_folder

        root = _need_path(spec, rest)
        for sub in ("train", "test"):
            if not (root / sub).is_dir():
                raise SelfmaskError(f"{spec}: expected a folder {root / sub} (one subfolder per class)")
        train = load_image_folder(root / "train", resolution, cache_dir=cache_dir)
        # one class index for both splits: the training split's (a test class without training images is refused)
        return train, load_image_folder(root / "test", resolution, cache_dir=cache_dir, classes=train.classes)
    if kind == "split":
        from selfmask.data.splits import load_split

        split_file, _, image_root = rest.partition(":")
        if not split_file or not image_root:
            raise SelfmaskError(f"{spec}: expected split:SPLIT_FILE:IMAGE_ROOT")
        return (
            load_split(_need_path(spec, split_file), _need_path(spec, image_root), "train", resolution, cache_dir=cache_dir),
            load_split(_need_path(spec, split_file), _need_path(spec, image_root), "test", resolution, cache_dir=cache_dir),
        )
    raise SelfmaskError(f"unknown data specification {spec!r}; expected one of: {SPEC_HELP}")


def _need_path(spec: str, value: str) -> Path:
    if not value:
        raise SelfmaskError(f"{spec!r}: a path is missing (e.g. cifar10:/data/cifar-10-batches-py)")
    path = Path(value).expanduser()
    if not path.exists():
        raise SelfmaskError(f"{spec!r}: {path} does not exist")
    return path
