"""Atomic file writes: a write either lands whole or leaves the old file untouched."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary file beside ``path`` with ``write(tmp)``, fsync it, then rename it over ``path``.

    The one atomic write of the package: ``path`` is either replaced whole or left untouched.
    On any error (``write`` raising, a full disk, a signal) the temporary file (a hidden
    ``.<name>.<random>.tmp``, mode 0600 as :func:`tempfile.mkstemp` makes it) is removed and
    the error propagates. ``write`` gets a file name, so writers that stream to a path
    (``safetensors.torch.save_file``, ``torch.save``) never hold a second copy in memory.

    Example::

        atomic_write_file(out, lambda tmp: tmp.write_text("done\n"))
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write_file`)."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_save_safetensors(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (moved to the CPU, contiguous) as a safetensors file, atomically, streamed to disk."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write_file(path, lambda tmp: save_file(data, str(tmp), metadata=dict(metadata) if metadata else None))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or corrupt file is one clear error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from selfmask.errors import SelfmaskError

    path = Path(path)
    if not path.is_file():
        raise SelfmaskError(f"{path}: file does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SelfmaskError(f"{path}: not a readable safetensors file ({exc})") from None


def read_json_object(path: str | Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; invalid JSON or another JSON type is one clear error naming ``what``."""
    from selfmask.errors import SelfmaskError

    try:
        data = json.loads(Path(path).read_text())
    except ValueError as exc:
        raise SelfmaskError(f"{what}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SelfmaskError(f"{what}: expected a JSON object, got {type(data).__name__}")
    return data
