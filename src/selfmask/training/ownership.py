"""Which folders are run folders, and which process owns one.

A folder is a run folder when it holds the marker file :data:`MARKER`, which
:meth:`~selfmask.training.run_folder.RunFolder.prepare` writes into every folder it
creates or takes over (an empty one). A folder that holds anything else is never
written into, replaced or deleted, with or without ``--overwrite``: it may be the
user's. Folders written before the marker existed are recognised by their
``status.json`` and ``config.json`` (both as selfmask writes them) and get the marker.

While a process trains into a run folder it holds an exclusive lock
(``fcntl.flock``) on the marker, so a second process that wants the same folder is
refused instead of silently replacing the first run. The lock is per process: the same
process may prepare the folder again (resume, then evaluate); it is released with
:func:`release` or when the process ends.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from selfmask.errors import SelfmaskError

#: Marker file of a run folder.
MARKER = ".selfmask-run"
_STATUSES = ("running", "trained", "finished", "interrupted", "failed")
_held: dict[str, int] = {}  # resolved folder -> file descriptor of its locked marker


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_legacy_run(path: Path) -> bool:
    """A folder an older selfmask wrote: a ``status.json`` and a ``config.json`` as it writes them."""
    status, config = _json_object(path / "status.json"), _json_object(path / "config.json")
    return bool(status and config and status.get("status") in _STATUSES and "backbone" in config and "seed" in config)


def folder_problem(path: str | Path) -> str | None:
    """Why ``path`` must not be used as a run folder, or ``None`` (absent, empty, marked, or an older run)."""
    p = Path(path)
    if not p.exists():
        return None
    if not p.is_dir():
        return f"run folder {str(p)!r} exists and is not a folder"
    if (p / MARKER).is_file() or is_legacy_run(p):
        return None
    try:
        empty = next(p.iterdir(), None) is None
    except OSError as exc:
        return f"run folder {str(p)!r} cannot be listed: {exc.strerror or exc}"
    if empty:
        return None
    return (
        f"{str(p)!r} is not a selfmask run folder (it holds other files and no {MARKER} marker); nothing in it "
        "is written, replaced or deleted, with or without --overwrite: choose a new or empty folder for --out"
    )


def claim(path: str | Path) -> None:
    """Mark ``path`` (an existing folder that passed :func:`folder_problem`) and lock it for this process."""
    import fcntl

    p = Path(path)
    key = os.path.realpath(p)
    if key in _held:
        if (p / MARKER).is_file():
            return
        os.close(_held.pop(key))  # the folder was removed and made again since
    fd = os.open(p / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SelfmaskError(
            f"run folder {str(p)!r} is in use by another selfmask process; wait for it to end or choose another --out"
        ) from None
    if os.fstat(fd).st_size == 0:
        os.write(fd, b'{"selfmask": "run folder"}\n')
    _held[key] = fd


def release(path: str | Path) -> None:
    """Give up this process's lock on ``path`` (no-op when it holds none)."""
    fd = _held.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)


__all__ = ["MARKER", "claim", "folder_problem", "is_legacy_run", "release"]
