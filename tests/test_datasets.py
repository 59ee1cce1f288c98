"""Datasets from local folders: CIFAR python batches, image folders, CoOp split files, the uint8 cache."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfmask.bench.data import decode_vs_cache_throughput
from selfmask.data.base import ImageTensorDataset
from selfmask.data.cache import (
    cache_key,
    cached_images,
    decode_image,
    load_tensor_dataset,
    resize_center_crop,
    save_tensor_dataset,
)
from selfmask.data.cifar import load_cifar, read_cifar_batch, resize_uint8
from selfmask.data.folders import list_image_folder, load_image_folder
from selfmask.data.splits import load_split
from selfmask.errors import SelfmaskError

# --- CIFAR ------------------------------------------------------------------------------------------


def _write_pickle(path: Path, obj: object, protocol: int) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def _cifar10(root: Path, per_batch: int = 6, bytes_keys: bool = True) -> tuple[np.ndarray, list[int]]:
    """The official layout; keys as bytes (as Python 2 strings read back) and protocol 2."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _write_pickle(folder / "batches.meta", {k("label_names"): [n.encode() for n in names], k("num_vis"): 3072}, 2)
    all_data, all_labels = [], []
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int((i * per_batch + j) % 10) for j in range(per_batch)]
        batch = {
            k("batch_label"): b"batch",
            k("labels"): labels,
            k("data"): data,
            k("filenames"): [b"x.png"] * per_batch,
        }
        _write_pickle(folder / fname, batch, 2)
        all_data.append(data)
        all_labels += labels
    return np.concatenate(all_data), all_labels


def test_cifar10_loads_with_counts_labels_and_pixels(tmp_path: Path) -> None:
    data, labels = _cifar10(tmp_path)
    train = load_cifar(tmp_path, "train")
    test = load_cifar(tmp_path / "cifar-10-batches-py", "test")
    assert isinstance(train, ImageTensorDataset)
    assert (len(train), len(test)) == (30, 6)
    assert train.classes[:3] == ["airplane", "automobile", "bird"] and train.num_classes == 10
    assert train.labels.tolist() == labels[:30] and test.labels.tolist() == labels[30:]
    # CIFAR rows are channel-major 32x32 planes
    assert torch.equal(train.images[7], torch.from_numpy(data[7].reshape(3, 32, 32)))
    assert train.name == "cifar10" and train.resolution == 32


def test_cifar100_fine_labels_and_str_keys_at_protocol_5(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = [f"class{i:03d}" for i in range(100)]
    _write_pickle(folder / "meta", {"fine_label_names": fine, "coarse_label_names": ["c"] * 20}, 5)
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("test", 4)):
        labels = rng.integers(0, 100, n).tolist()
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        _write_pickle(folder / split, {"data": data, "fine_labels": labels, "coarse_labels": [0] * n}, 5)
    train, test = load_cifar(tmp_path, "train"), load_cifar(tmp_path, "test")
    assert (len(train), len(test), train.num_classes, train.name) == (12, 4, 100, "cifar100")
    assert train.classes[42] == "class042"


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_cifar_batch_with_a_foreign_global_is_refused(tmp_path: Path) -> None:
    _cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    _write_pickle(bad, {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": Evil()}, 2)
    with pytest.raises(SelfmaskError, match=re.escape(str(bad)) + ".*refused.*system.*not allowed"):
        load_cifar(tmp_path)


def test_cifar_truncated_missing_and_malformed(tmp_path: Path) -> None:
    _cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    b2 = folder / "data_batch_2"
    b2.write_bytes(b2.read_bytes()[:500])
    with pytest.raises(SelfmaskError, match=re.escape(str(b2)) + ".*truncated"):
        load_cifar(tmp_path)
    (folder / "data_batch_2").unlink()
    with pytest.raises(SelfmaskError, match="data_batch_2.*does not exist"):
        load_cifar(tmp_path)
    _write_pickle(folder / "data_batch_2", {"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, 2)
    with pytest.raises(SelfmaskError, match=r"uint8 array \(N, 3072\)"):
        load_cifar(tmp_path)
    _write_pickle(folder / "data_batch_2", {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}, 2)
    with pytest.raises(SelfmaskError, match=r"labels outside \[0, 10\)"):
        load_cifar(tmp_path)
    with pytest.raises(SelfmaskError, match="holds no CIFAR python batches"):
        load_cifar(tmp_path / "elsewhere")
    assert read_cifar_batch(folder / "batches.meta")["num_vis"] == 3072


def test_cifar_resized_for_a_224_px_backbone(tmp_path: Path) -> None:
    _cifar10(tmp_path, per_batch=1)
    ds = load_cifar(tmp_path, "test", resolution=64)
    assert ds.images.shape == (1, 3, 64, 64) and ds.images.dtype == torch.uint8
    flat = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(resize_uint8(flat, 48), torch.full((1, 3, 48, 48), 77, dtype=torch.uint8))


# --- image folders and the cache --------------------------------------------------------------------


def _image(path: Path, size: tuple[int, int], color: tuple[int, int, int], mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)


def _folder(root: Path) -> dict[str, int]:
    counts = {"cat": 3, "dog": 2, "eel": 4}
    colors = {"cat": (255, 0, 0), "dog": (0, 255, 0), "eel": (0, 0, 255)}
    for cls, n in counts.items():
        for i in range(n):
            ext = ".png" if i % 2 else ".jpg"
            sub = "nested/" if i == 2 else ""
            _image(root / cls / f"{sub}{i}{ext}", (40 + 10 * i, 30), colors[cls])
    (root / "cat" / "notes.txt").write_text("not an image")
    _image(root / "dog" / "gray.png", (33, 33), (128, 128, 128), mode="L")
    return {**counts, "dog": counts["dog"] + 1}


def test_image_folder_loads_with_counts_labels_and_colors(tmp_path: Path) -> None:
    counts = _folder(tmp_path / "imgs")
    ds = load_image_folder(tmp_path / "imgs", resolution=16)
    assert ds.classes == ["cat", "dog", "eel"]
    assert len(ds) == sum(counts.values())
    assert torch.bincount(ds.labels).tolist() == [counts["cat"], counts["dog"], counts["eel"]]
    assert ds.images.shape == (len(ds), 3, 16, 16) and ds.images.dtype == torch.uint8
    # class colour survives decoding (JPEG is lossy: compare the mean)
    red = ds.images[ds.labels == 0].float().mean(dim=(0, 2, 3))
    assert red[0] > 240 and red[1] < 15 and red[2] < 15
    gray = ds.images[ds.labels == 1].float().mean(dim=(2, 3))
    assert any(torch.allclose(g, torch.full((3,), 128.0), atol=1) for g in gray)
    assert ds.name == "imgs" and ds.meta["source"] == "image_folder"


def test_resize_shorter_side_then_center_crop() -> None:
    arr = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half black, right half white
    arr[:, 20:] = 255
    out = resize_center_crop(Image.fromarray(arr), 10, "bilinear")
    assert out.shape == (3, 10, 10)  # 20x10 after resize, centre 10 columns = columns 5..14
    assert out[:, :, :4].max() < 10 and out[:, :, 6:].min() > 245


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    _folder(tmp_path / "imgs")
    bad = tmp_path / "imgs" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(SelfmaskError, match=re.escape(str(bad)) + ".*could not be decoded"):
        load_image_folder(tmp_path / "imgs", resolution=8)
    good = tmp_path / "imgs" / "eel" / "0.jpg"
    trunc = tmp_path / "imgs" / "eel" / "9.jpg"
    trunc.write_bytes(good.read_bytes()[:-40])
    bad.unlink()
    with pytest.raises(SelfmaskError, match=re.escape(str(trunc))):
        decode_image(trunc, 8)


def test_image_folder_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(SelfmaskError, match="does not exist"):
        list_image_folder(tmp_path / "none")
    (tmp_path / "flat").mkdir()
    _image(tmp_path / "flat" / "a.png", (4, 4), (0, 0, 0))
    with pytest.raises(SelfmaskError, match="no class sub-folders"):
        list_image_folder(tmp_path / "flat")
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(SelfmaskError, match="empty_class.*holds no image"):
        list_image_folder(tmp_path / "flat")


def test_cache_is_written_once_reused_and_invalidated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    first = load_image_folder(tmp_path / "imgs", resolution=12, cache_dir=cache)
    assert first.meta["cache_hit"] is False
    files = [f for f in cache.iterdir()]
    assert len(files) == 1 and files[0].suffix == ".safetensors" and "12px" in files[0].name
    second = load_image_folder(tmp_path / "imgs", resolution=12, cache_dir=cache)
    assert second.meta["cache_hit"] is True and torch.equal(first.images, second.images)
    assert torch.equal(second.labels, first.labels)
    # another resolution is another cache entry
    assert load_image_folder(tmp_path / "imgs", resolution=10, cache_dir=cache).meta["cache_hit"] is False
    # changing a file changes the key
    paths, _, _ = list_image_folder(tmp_path / "imgs")
    key = cache_key(paths, 12)
    _image(paths[0], (50, 50), (1, 2, 3))
    os.utime(paths[0], ns=(1, 1))
    assert cache_key(paths, 12) != key
    # a corrupted cache file is rebuilt, with a warning, never trusted
    _, rec = cached_images(paths, 12, cache)
    Path(str(rec["cache_file"])).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        images, rec2 = cached_images(paths, 12, cache)
    assert rec2["cache_hit"] is False and "unreadable" in caplog.text
    assert torch.equal(images, cached_images(paths, 12, None)[0])
    assert not [f for f in cache.iterdir() if f.name.endswith(".tmp")]


def test_decoding_is_independent_of_the_number_of_workers(tmp_path: Path) -> None:
    _folder(tmp_path / "imgs")
    paths, _, _ = list_image_folder(tmp_path / "imgs")
    one = cached_images(paths, 9, None, workers=1)[0]
    four = cached_images(paths, 9, None, workers=4)[0]
    assert torch.equal(one, four)
    with pytest.raises(SelfmaskError, match="resolution"):
        cached_images(paths, 0, None)
    with pytest.raises(SelfmaskError, match="resample"):
        cached_images(paths, 8, None, resample="nearest")


def test_tensor_dataset_file_round_trip(tmp_path: Path) -> None:
    ds = ImageTensorDataset(
        torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8),
        torch.tensor([0, 1, 1, 0, 1]),
        ["a", "b"],
        "toy",
        {"seed": 3},
    )
    path = save_tensor_dataset(ds, tmp_path / "toy.safetensors")
    back = load_tensor_dataset(path)
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert (back.classes, back.name, back.meta) == (["a", "b"], "toy", {"seed": 3})
    path.write_bytes(b"junk")
    with pytest.raises(SelfmaskError, match=re.escape(str(path))):
        load_tensor_dataset(path)


# --- CoOp split files -------------------------------------------------------------------------------


def _split_dataset(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "dtd" / "images"
    entries = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(["banded", "blotchy"]):
        for i in range(5):
            rel = f"{cls}/{cls}_{i:04d}.jpg"
            _image(images / rel, (24, 20), (label * 200, 50, 50))
            split = "train" if i < 3 else ("val" if i == 3 else "test")
            entries[split].append([rel, label, cls])
    split_file = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split_file.write_text(json.dumps(entries))
    return split_file, images


def test_split_file_loads_each_split(tmp_path: Path) -> None:
    split_file, images = _split_dataset(tmp_path)
    train = load_split(split_file, images, "train", resolution=8)
    val = load_split(split_file, images, "val", resolution=8)
    test = load_split(split_file, images, "test", resolution=8, cache_dir=tmp_path / "cache")
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    assert train.classes == val.classes == ["banded", "blotchy"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.meta["split"] == "train" and train.name == "split_zhou_DescribableTextures:train"
    assert test.meta["cache_hit"] is False


def test_split_naming_a_missing_image_is_named(tmp_path: Path) -> None:
    split_file, images = _split_dataset(tmp_path)
    (images / "blotchy" / "blotchy_0004.jpg").unlink()
    with pytest.raises(SelfmaskError, match=re.escape(str(split_file)) + r".*test.*1 image.*blotchy_0004\.jpg"):
        load_split(split_file, images, "test", resolution=8)
    assert len(load_split(split_file, images, "train", resolution=8)) == 6


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not readable JSON"),
        (json.dumps({"train": [], "val": []}), "no 'test' list"),
        (json.dumps({"train": [["a.jpg", "0", "x"]], "val": [], "test": []}), r"train\[0\].*relative_path, label"),
        (json.dumps({"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "val": [], "test": []}), "named both"),
        (json.dumps({"train": [["a.jpg", 1, "x"]], "val": [], "test": []}), r"labels \[0\] have no entry"),
    ],
)
def test_bad_split_files(tmp_path: Path, content: str, message: str) -> None:
    f = tmp_path / "split_zhou_X.json"
    f.write_text(content)
    with pytest.raises(SelfmaskError, match=message):
        load_split(f, tmp_path, "train", resolution=8)


def test_split_argument_errors(tmp_path: Path) -> None:
    split_file, images = _split_dataset(tmp_path)
    with pytest.raises(SelfmaskError, match="split must be one of"):
        load_split(split_file, images, "dev", resolution=8)
    with pytest.raises(SelfmaskError, match="image folder.*does not exist"):
        load_split(split_file, tmp_path / "nowhere", "train", resolution=8)
    with pytest.raises(SelfmaskError, match="split file.*does not exist"):
        load_split(tmp_path / "none.json", images, "train", resolution=8)


def test_data_benchmark_reports_both_paths() -> None:
    res = decode_vs_cache_throughput(num_images=4, source_size=(64, 48), resolution=32, repeats=1, batch=2)
    assert res["decode_images_per_s"] > 0 and res["cache_read_images_per_s"] > 0
    assert res["cache_speedup"] == pytest.approx(res["cache_read_images_per_s"] / res["decode_images_per_s"])
