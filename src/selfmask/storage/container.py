"""The byte container of a mask file: the safetensors layout plus a whole-file checksum.

Layout (readable by the ``safetensors`` library as well; see docs/storage.md)::

    8 bytes     N, the header length, unsigned little-endian
    N bytes     UTF-8 JSON header: {"__metadata__": {"selfmask": "<JSON string>"},
                                    "<tensor name>": {"dtype", "shape", "data_offsets": [begin, end]}, ...}
    rest        the tensors' bytes, back to back, in the order of their offsets

The selfmask metadata (a JSON object inside the string) holds a ``"checksum"``: the
hex sha256 of the whole file with those 64 hex digits replaced by ``"0" * 64``, so a
flipped byte anywhere, header included, is detected.

:func:`read_container` trusts nothing: every size in the header is checked against
the real length of the data before anything is allocated, and every problem is a
:class:`~selfmask.errors.SelfmaskError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from selfmask import io
from selfmask.errors import SelfmaskError
from selfmask.storage.versions import FORMAT_NAME, READ_VERSIONS

#: Largest JSON header accepted (a ViT mask file has a few KiB).
MAX_HEADER_BYTES = 16 * 2**20
#: Largest number of tensors accepted in one file.
MAX_TENSORS = 100_000
#: Largest number of dimensions of one tensor.
MAX_NDIM = 8

CHECKSUM_PLACEHOLDER = "0" * 64

#: safetensors dtype names -> numpy dtypes (little-endian).
DTYPES: dict[str, str] = {
    "U8": "<u1",
    "I8": "<i1",
    "I16": "<i2",
    "I32": "<i4",
    "I64": "<i8",
    "F16": "<f2",
    "F32": "<f4",
    "F64": "<f8",
    "BF16": "<u2",  # raw bits; torch views them as bfloat16
    "BOOL": "|b1",
}


@dataclass(frozen=True)
class RawTensor:
    """One tensor of a container: its safetensors dtype, shape and bytes (a view into the file)."""

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def to_numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=DTYPES[self.dtype]).reshape(self.shape)


def write_container(meta: dict[str, Any], tensors: dict[str, tuple[str, tuple[int, ...], bytes]]) -> bytes:
    """Serialise ``meta`` (gets a ``"checksum"``) and ``tensors`` (name -> (dtype, shape, bytes))."""
    meta = dict(meta)
    meta["checksum"] = CHECKSUM_PLACEHOLDER
    header: dict[str, Any] = {"__metadata__": {"selfmask": json.dumps(meta, sort_keys=True, separators=(",", ":"))}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        if dtype not in DTYPES:
            raise SelfmaskError(f"tensor {name!r}: unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    digest = hashlib.sha256()
    digest.update(struct.pack("<Q", len(raw)))
    digest.update(raw)
    for _dtype, _shape, data in tensors.values():
        digest.update(data)
    placeholder = CHECKSUM_PLACEHOLDER.encode()
    if raw.count(placeholder) != 1:  # pragma: no cover - a name would have to contain 64 zeros
        raise SelfmaskError("mask file header: cannot place the checksum (a name contains 64 zeros)")
    raw = raw.replace(placeholder, digest.hexdigest().encode())
    return b"".join([struct.pack("<Q", len(raw)), raw, *(data for _d, _s, data in tensors.values())])


def read_container(data: bytes, where: str) -> tuple[dict[str, Any], dict[str, RawTensor]]:
    """Parse and verify a container; ``where`` (the file name) prefixes every error message.

    Returns the selfmask metadata (without its checksum) and the tensors by name.
    Checks, in order: the header length against the data length, the JSON, the
    format name and version, every tensor's dtype, shape and offsets (they must tile
    the data exactly, so a truncated or padded file is caught), then the checksum.
    """
    if len(data) < 8:
        raise SelfmaskError(f"{where}: truncated: {len(data)} bytes, not even a header length (8 bytes)")
    (n_header,) = struct.unpack("<Q", data[:8])
    if n_header > min(len(data) - 8, MAX_HEADER_BYTES):
        raise SelfmaskError(
            f"{where}: truncated or not a mask file: header length {n_header} bytes, but the file has "
            f"{len(data) - 8} bytes after the length (and headers are at most {MAX_HEADER_BYTES})"
        )
    raw = bytes(data[8 : 8 + n_header])
    header = parse_json(raw, dict, f"{where}: corrupt header")
    meta = _selfmask_metadata(header.pop("__metadata__", None), where)
    if len(header) > MAX_TENSORS:
        raise SelfmaskError(f"{where}: {len(header)} tensors in the header; at most {MAX_TENSORS} are accepted")
    body = memoryview(data)[8 + n_header :]
    tensors = _tensor_table(header, len(body), where)
    _verify_checksum(meta, data, raw, n_header, where)
    out = {name: RawTensor(dtype, shape, body[begin:end]) for name, (dtype, shape, begin, end) in tensors.items()}
    return meta, out


def parse_json(raw: bytes | str, kind: type, what: str) -> Any:
    """``json.loads`` of UTF-8 ``raw`` that must give a ``kind`` (dict or list); else SelfmaskError(what ...)."""
    try:
        value = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SelfmaskError(f"{what} (not UTF-8 JSON: {exc})") from None
    if not isinstance(value, kind):
        raise SelfmaskError(f"{what}: expected a JSON {kind.__name__}, got {type(value).__name__}")
    return value


def _selfmask_metadata(metadata: object, where: str) -> dict[str, Any]:
    if not isinstance(metadata, dict) or not isinstance(metadata.get("selfmask"), str):
        raise SelfmaskError(f"{where}: not a selfmask mask file (no '__metadata__.selfmask' entry in the header)")
    meta = parse_json(metadata["selfmask"], dict, f"{where}: corrupt selfmask metadata")
    if meta.get("format") != FORMAT_NAME:
        raise SelfmaskError(f"{where}: not a selfmask mask file (metadata 'format' is not {FORMAT_NAME!r})")
    version = meta.get("version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise SelfmaskError(
            f"{where}: unknown format version {version!r}; this selfmask reads versions "
            f"{', '.join(map(str, READ_VERSIONS))} (a newer selfmask may read it)"
        )
    return meta


def _tensor_table(header: dict[str, Any], body_len: int, where: str) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    table = {}
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise SelfmaskError(f"{where}: tensor {name!r}: corrupt header entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:  # a list or dict here is not hashable
            raise SelfmaskError(f"{where}: tensor {name!r}: unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        shape_t = check_shape(shape, f"{where}: tensor {name!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= body_len
        ):
            raise SelfmaskError(
                f"{where}: tensor {name!r}: data_offsets {offsets!r} outside the {body_len} data bytes (truncated file?)"
            )
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != math.prod(shape_t) * itemsize:  # Python ints: no overflow
            raise SelfmaskError(
                f"{where}: tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape {list(shape_t)} of {dtype}"
            )
        table[name] = (dtype, shape_t, offsets[0], offsets[1])
    position = 0
    for name, (_d, _s, begin, end) in sorted(table.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != position:
            raise SelfmaskError(f"{where}: tensor {name!r} starts at byte {begin}, expected {position} (overlap or gap)")
        position = end
    if position != body_len:
        raise SelfmaskError(
            f"{where}: the header describes {position} data bytes but the file has {body_len} (truncated or padded)"
        )
    return table


def check_shape(shape: object, where: str) -> tuple[int, ...]:
    """A shape from a header: a list of at most :data:`MAX_NDIM` non-negative ints below 2**40.

    An empty shape (a size 0) must also have its other sizes multiply below 2**62: numpy
    refuses to even reshape an empty array to ``[0, 2**39, 2**39]`` (non-empty shapes are
    bounded by the data size or the reader's ``max_entries``).
    """
    if not (
        isinstance(shape, list)
        and len(shape) <= MAX_NDIM
        and all(type(d) is int and 0 <= d < 2**40 for d in shape)
        and (0 not in shape or math.prod(max(d, 1) for d in shape) < 2**62)
    ):
        raise SelfmaskError(
            f"{where}: invalid shape {shape!r} (a list of at most {MAX_NDIM} non-negative ints below 2**40; "
            "with a 0, the other sizes multiplying below 2**62)"
        )
    return tuple(shape)


def _verify_checksum(meta: dict[str, Any], data: bytes, raw: bytes, n_header: int, where: str) -> None:
    stored = meta.pop("checksum", None)
    if not (isinstance(stored, str) and len(stored) == 64 and all(c in "0123456789abcdef" for c in stored)):
        raise SelfmaskError(f"{where}: missing or malformed checksum {stored!r} (64 hex digits expected)")
    if raw.count(stored.encode()) != 1:
        raise SelfmaskError(f"{where}: checksum mismatch: the file is corrupt (checksum not found once in the header)")
    digest = hashlib.sha256()
    digest.update(data[:8])
    digest.update(raw.replace(stored.encode(), CHECKSUM_PLACEHOLDER.encode()))
    digest.update(memoryview(data)[8 + n_header :])
    if digest.hexdigest() != stored:
        raise SelfmaskError(
            f"{where}: checksum mismatch: the file is corrupt (stored {stored[:12]}..., computed "
            f"{digest.hexdigest()[:12]}...)"
        )


def check_output_path(path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse an output path the user named that must not be written: checked before any work.

    Refused: a directory, an existing file without ``overwrite``, anything that is not a regular
    file (a FIFO, a device, a socket: with or without ``overwrite``), a path that is one of
    ``inputs`` (the command would replace what it reads), a missing folder.
    """
    path = Path(path)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise SelfmaskError(f"output path {str(path)!r} is also an input of this command; choose another output")
    if path.is_dir():
        raise SelfmaskError(f"output path {str(path)!r} is a directory")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise SelfmaskError(
                f"output path {str(path)!r} exists and is not a regular file (a device, pipe, socket or broken link); "
                "it is never replaced, with or without --overwrite"
            )
        if not overwrite:
            raise SelfmaskError(f"output path {str(path)!r} exists; pass overwrite=True (--overwrite) to replace it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise SelfmaskError(f"output folder {str(folder)!r} does not exist")
    return path


def _same_file(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def atomic_write_bytes(
    path: str | Path, data: bytes, *, overwrite: bool = False, inputs: Iterable[str | Path | None] = ()
) -> None:
    """:func:`selfmask.io.atomic_write_bytes` for an output the user named: checks first.

    Refuses what :func:`check_output_path` refuses; an existing file is never left
    half-written. A failed write (disk full, no permission, read-only file system)
    is one clear error naming the file; the temporary file is removed.
    """
    path = check_output_path(path, overwrite=overwrite, inputs=inputs)
    try:
        io.atomic_write_bytes(path, data)
    except OSError as exc:
        raise SelfmaskError(f"writing {str(path)!r} failed: {exc.strerror or exc}; nothing was written") from None


__all__ = [
    "MAX_HEADER_BYTES",
    "RawTensor",
    "atomic_write_bytes",
    "check_output_path",
    "check_shape",
    "parse_json",
    "read_container",
    "write_container",
]
