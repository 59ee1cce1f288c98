"""selfmask.io: the one atomic write (a file is replaced whole or left as it was)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from selfmask.data.base import ImageTensorDataset
from selfmask.data.cache import load_tensor_dataset, save_tensor_dataset
from selfmask.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_file, read_safetensors


def test_a_failing_writer_leaves_the_old_file_and_no_temporary_file(tmp_path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_fail(tmp):  # noqa: ANN001, ANN202
        tmp.write_bytes(b"new, half")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write_file(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_a_failing_fsync_leaves_the_old_file(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    calls = []

    def full(fd: int) -> None:
        calls.append(fd)
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        atomic_write_bytes(target, b"new")
    assert calls and target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_writes_are_synced_before_the_rename_and_private(tmp_path, monkeypatch) -> None:
    target = tmp_path / "t.safetensors"
    seen = []
    real = os.fsync

    def fsync(fd: int) -> None:
        seen.append(target.exists())  # the rename has not happened yet
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    tensors = {"a": torch.arange(6, dtype=torch.uint8).reshape(2, 3), "b": torch.randn(3, 4).t()}  # not contiguous
    atomic_save_safetensors(target, tensors, {"k": "v"})
    assert seen == [False]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # as tempfile.mkstemp makes it, as before
    back = read_safetensors(target)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_dataset_files_round_trip_through_the_helper(tmp_path) -> None:
    ds = ImageTensorDataset(torch.randint(0, 255, (5, 3, 8, 8), dtype=torch.uint8), torch.arange(5) % 2,
                            ["a", "b"], name="five")
    path = save_tensor_dataset(ds, tmp_path / "sub" / "five.safetensors")
    back = load_tensor_dataset(path)
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels) and back.classes == ["a", "b"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["five.safetensors"]
