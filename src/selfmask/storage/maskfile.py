"""Mask files: the learned binary masks of a model at close to their information limit.

A mask file (format ``selfmask.mask``, version :data:`FORMAT_VERSION`; see docs/storage.md) holds

* the backbone name and the sha256 fingerprint of the exact base tensors the masks
  were trained on (:func:`selfmask.fingerprint.model_fingerprint`),
* the :class:`~selfmask.masking.MaskConfig` (so a plain backbone can be masked again),
* per masked tensor: name, shape, active count, codec and payload (``mask.<name>``),
  and (version 2) the number of parts it is masked as (3 for a fused q/k/v tensor);
  the writer picks the smallest codec per tensor (:mod:`selfmask.storage.codecs`),
* extra trained tensors, e.g. a linear head (``extra.<name>``),
* a checksum over the whole file.

Tensors coded with ``"ans-weight"`` (version 3) are coded given the base weights they mask:
reading a file checks and parses everything, but those masks are decoded only once the
base weights are given (:meth:`MaskFile.decode_with_base`, called by ``apply_mask``,
``MaskBank.add`` and ``load_mask(..., base=model)``), after their fingerprint is checked.

With selective masking (``MaskConfig.trainable_fraction < 1``) only the trainable
entries are stored; the others are 1 by construction and are regenerated from the
config's seed (:func:`~selfmask.masking.layer.selective_trainable_mask`).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from selfmask.errors import SelfmaskError
from selfmask.fingerprint import model_fingerprint
from selfmask.masking.config import MaskConfig
from selfmask.masking.layer import selective_trainable_mask
from selfmask.masking.model import base_state_dict, base_tensors, binary_entropy, current_masks, mask_config
from selfmask.storage import codecs
from selfmask.storage.bounds import tensor_bounds
from selfmask.storage.container import atomic_write_bytes, check_shape, parse_json, read_container, write_container
from selfmask.storage.versions import CODEC_SINCE, FORMAT_NAME, FORMAT_VERSION, LEGACY_CONFIG, READ_VERSIONS

#: Default cap on the total number of mask entries a reader decodes (about one byte each in memory).
#: A hostile file of a few hundred bytes can claim this many entries (a constant mask needs no
#: payload), so it bounds what reading an untrusted file may allocate: 2 GiB, 24 times the largest
#: backbone here (ViT-B/32, 88 M weights). Pass ``max_entries`` to read a larger file.
MAX_ENTRIES = 2**31

#: Container tensors: the zlib-compressed JSON index of the masked tensors, their payloads
#: back to back (in index order), and one tensor per extra (``extra.<name>``).
INDEX_KEY = "index"
MASKS_KEY = "masks"
EXTRA_PREFIX = "extra."
#: Largest inflated index accepted.
MAX_INDEX_BYTES = 64 * 2**20

_TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.bfloat16: "BF16",
    torch.bool: "BOOL",
}
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class MaskTensorInfo:
    """What a mask file records about one masked tensor.

    ``coded`` entries are stored (all of them, or the trainable ones under selective
    masking); ``coded_active`` of those are 1; ``payload_bytes`` is the codec's output.
    """

    name: str
    shape: tuple[int, ...]
    coded: int
    coded_active: int
    codec: str
    payload_bytes: int
    parts: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def active(self) -> int:
        """Active entries of the whole tensor (fixed entries of selective masking are 1)."""
        return self.coded_active + self.numel - self.coded

    @property
    def fraction_active(self) -> float:
        return self.active / self.numel if self.numel else 0.0

    @property
    def entropy_bits(self) -> float:
        """Information limit of the stored entries: ``coded * H(coded_active / coded)``."""
        return self.coded * binary_entropy(self.coded_active / self.coded) if self.coded else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "numel": self.numel,
            "coded": self.coded,
            "active": self.active,
            "fraction_active": self.fraction_active,
            "codec": self.codec,
            "parts": self.parts,
            "payload_bytes": self.payload_bytes,
            "bits_per_weight": 8 * self.payload_bytes / self.numel if self.numel else 0.0,
            "entropy_bits": self.entropy_bits,
        }


@dataclass
class MaskFile:
    """A mask file in memory: bool masks by qualified parameter name, extras and metadata.

    ``decoded`` holds the masks decoded so far; ``pending`` the payloads of tensors coded
    given the base weights (codec ``"ans-weight"``), decoded by :meth:`decode_with_base`.
    :attr:`masks` is every mask, and refuses with one clear line while any is pending.
    """

    backbone: str
    fingerprint: str
    config: MaskConfig
    decoded: dict[str, torch.Tensor]
    tensors: list[MaskTensorInfo]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    file_bytes: int = 0
    version: int = FORMAT_VERSION
    pending: dict[str, bytes] = field(default_factory=dict)
    where: str = "<mask bytes>"

    @property
    def needs_base(self) -> bool:
        """Whether some masks still need the base weights to be decoded."""
        return bool(self.pending)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Every mask (bool, by qualified name, in file order); refused while some need the base weights."""
        if self.pending:
            names = list(self.pending)
            raise SelfmaskError(
                f"{self.where}: {len(names)} mask(s) (first {names[0]!r}) are coded given the base weights "
                f"(codec {codecs.conditional.CODEC!r}) and need them to be decoded: use apply_mask, MaskBank.add, "
                "`selfmask apply` or load_mask(..., base=model) with the base model (fingerprint "
                f"{self.fingerprint[:16]}...)"
            )
        return self.decoded

    def decode_with_base(self, weights: Mapping[str, torch.Tensor], fingerprint: str) -> MaskFile:
        """Decode the masks coded given the base weights; returns ``self``.

        ``weights``: the base tensors by qualified name (a model's ``base_state_dict``);
        ``fingerprint``: their fingerprint (:func:`~selfmask.fingerprint.model_fingerprint`),
        which must equal the file's, before anything is decoded: other weights would give
        another mask, not an error (``force`` does not apply here).
        """
        if not self.pending:
            return self
        if fingerprint != self.fingerprint:
            raise SelfmaskError(
                f"{self.where}: the masks are coded given the base weights of fingerprint {self.fingerprint[:16]}..., "
                f"but the weights given have fingerprint {fingerprint[:16]}... (different weights or backbone); "
                "they decode only on the exact base they were trained on"
            )
        infos = {i.name: i for i in self.tensors}
        for name, payload in list(self.pending.items()):
            info = infos[name]
            w = weights.get(name)
            if w is None or tuple(w.shape) != info.shape:
                got = "missing" if w is None else f"shape {list(w.shape)}"
                raise SelfmaskError(f"{self.where}: tensor {name!r}: base weight of shape {list(info.shape)} needed, {got}")
            self.decoded[name] = _decode_tensor(payload, info, self.config, self.where, w)
            del self.pending[name]
        self.decoded = {i.name: self.decoded[i.name] for i in self.tensors}  # file order
        return self

    @property
    def numel(self) -> int:
        """Masked weights in all."""
        return sum(t.numel for t in self.tensors)

    @property
    def active(self) -> int:
        return sum(t.active for t in self.tensors)

    @property
    def payload_bytes(self) -> int:
        return sum(t.payload_bytes for t in self.tensors)

    @property
    def entropy_bits(self) -> float:
        """Per-tensor information limit: sum over tensors of ``n * H(p)`` (stored entries)."""
        return sum(t.entropy_bits for t in self.tensors)

    def bounds(self, base: Mapping[str, torch.Tensor] | None = None) -> list[dict[str, float | None]]:
        """Per tensor (file order) the bounds in bits of :func:`~selfmask.storage.bounds.tensor_bounds`.

        Over the stored entries. ``per_channel`` needs the decoded mask (and all entries
        stored); ``weight`` needs it and the base weights ``base`` (by name).
        """
        out = []
        for info in self.tensors:
            stored = _stored_entries(self.config, info.name, info.shape)
            mask = self.decoded.get(info.name)
            if mask is None:  # pending: only the per-tensor bound is known without the base
                out.append({"per_tensor": info.entropy_bits, "per_channel": None, "weight": None})
                continue
            flat = mask.reshape(-1)
            if stored is not None:
                flat = flat[stored.reshape(-1)]
            weight = None if base is None else base.get(info.name)
            side = None if weight is None else _side_weights(self.config, info.name, info.shape, weight)
            rows = _rows(info.shape, stored is None) or (1 if stored is None else None)  # 1-D: one channel
            out.append(tensor_bounds(flat.numpy(), rows, side))
        return out

    def summary(self, base: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Sizes, ratios and bounds for ``selfmask inspect`` (JSON-serialisable).

        ``mask_bytes`` is the file without its extra tensors (header + payloads); bits
        per weight and the ratios to fp32/fp16 weights are taken over it. ``bounds_bytes``:
        the per-tensor, per-channel and weight-conditioned bounds in all (``None`` where a
        tensor's is unknown: masks still coded given the base, or no ``base`` given);
        ``tensors[i]["bounds_bits"]``: each tensor's.
        """
        bounds = self.bounds(base)
        tensors = [{**t.to_dict(), "bounds_bits": b} for t, b in zip(self.tensors, bounds)]
        totals = {
            kind: (None if any(b[kind] is None for b in bounds) else sum(b[kind] for b in bounds) / 8)
            for kind in ("per_tensor", "per_channel", "weight")
        }
        n = self.numel
        extra_bytes = sum(t.numel() * t.element_size() for t in self.extra.values())
        mask_bytes = self.file_bytes - extra_bytes  # header + payloads: what the masks cost
        mask_bits = 8 * mask_bytes
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "backbone": self.backbone,
            "fingerprint": self.fingerprint,
            "mask_config": self.config.to_dict(),
            "source": self.source,
            "masked_tensors": len(self.tensors),
            "masked_weights": n,
            "active_weights": self.active,
            "fraction_active": self.active / n if n else 0.0,
            "file_bytes": self.file_bytes,
            "mask_bytes": mask_bytes,
            "payload_bytes": self.payload_bytes,
            "extra_bytes": extra_bytes,
            "header_bytes": mask_bytes - self.payload_bytes,
            "entropy_bound_bytes": self.entropy_bits / 8,
            "bits_per_weight": mask_bits / n if n else 0.0,
            "payload_bits_per_weight": 8 * self.payload_bytes / n if n else 0.0,
            "entropy_bits_per_weight": self.entropy_bits / n if n else 0.0,
            "ratio_to_fp32": 32 * n / mask_bits if mask_bits else 0.0,
            "ratio_to_fp16": 16 * n / mask_bits if mask_bits else 0.0,
            "bounds_bytes": totals,
            "needs_base": self.needs_base,
            "extra": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in self.extra.items()},
            "tensors": tensors,
        }


def _stored_entries(config: MaskConfig, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """Selective masking: which entries a file stores (``None``: all of them)."""
    if config.trainable_fraction >= 1.0:
        return None
    return selective_trainable_mask(shape, config.trainable_fraction, config.seed, name)


def _rows(shape: tuple[int, ...], all_stored: bool) -> int | None:
    """Output channels for the per-channel codec: ``shape[0]`` of a tensor stored whole, of rank >= 2."""
    return shape[0] if all_stored and len(shape) >= 2 and shape[0] > 0 else None


def _side_weights(config: MaskConfig, name: str, shape: tuple[int, ...], weight: torch.Tensor) -> np.ndarray:
    """The base weights of the stored entries of a tensor, flat, as float32 or float64 (exactly)."""
    flat = weight.detach().to("cpu").reshape(-1)
    stored = _stored_entries(config, name, shape)
    if stored is not None:
        flat = flat[stored.reshape(-1)]
    exact32 = flat.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return flat.to(torch.float32 if exact32 else torch.float64).numpy()


def _decode_tensor(
    payload: bytes, info: MaskTensorInfo, config: MaskConfig, where: str, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """One tensor's mask from its payload (``weight``: its base weight, for codecs that need it)."""
    stored = _stored_entries(config, info.name, info.shape)
    bits = codecs.decode(
        payload,
        info.codec,
        info.coded,
        info.coded_active,
        rows=_rows(info.shape, stored is None),
        weights=None if weight is None else _side_weights(config, info.name, info.shape, weight),
        where=f"{where}: tensor {info.name!r}",
    )
    flat = torch.from_numpy(bits if bits.flags.writeable else bits.copy())  # no second copy of a big mask
    if stored is not None:
        full = torch.ones(info.numel, dtype=torch.bool)
        full[stored.reshape(-1)] = flat
        flat = full
    return flat.view(info.shape)


def _parts(config: MaskConfig, name: str, shape: tuple[int, ...]) -> int:
    """The parts tensor ``name`` is masked as (``MaskConfig.parts``), as a SelfmaskError when impossible."""
    try:
        return config.parts(name, shape)
    except ValueError as exc:
        raise SelfmaskError(str(exc)) from None


def _selected_count(config: MaskConfig, numel: int) -> int:
    if config.trainable_fraction >= 1.0 or numel == 0:
        return numel
    return max(1, min(numel, round(config.trainable_fraction * numel)))


def encode_mask_file(
    masks: Mapping[str, torch.Tensor],
    *,
    backbone: str,
    fingerprint: str,
    config: MaskConfig,
    extra: Mapping[str, torch.Tensor] | None = None,
    source: Mapping[str, Any] | None = None,
    base: Mapping[str, torch.Tensor] | None = None,
) -> tuple[bytes, list[MaskTensorInfo]]:
    """Encode bool ``masks`` (by qualified name) into the bytes of a mask file.

    Returns the bytes and what was recorded per tensor. ``source`` is free-form JSON
    (e.g. the run folder and the seed of a random base). ``base``: the base weights
    (by name; those of ``fingerprint``): each tensor may then be coded given them
    (``"ans-weight"``) when that is smaller, and such a file decodes only with them.
    """
    if not isinstance(backbone, str) or not backbone:
        raise SelfmaskError(f"mask file: backbone must be a non-empty name, got {backbone!r}")
    if not _HEX64.fullmatch(fingerprint or ""):
        raise SelfmaskError(f"mask file: fingerprint must be 64 lowercase hex digits, got {fingerprint!r}")
    infos: list[MaskTensorInfo] = []
    blobs: list[bytes] = []
    for name, mask in masks.items():
        if mask.dtype != torch.bool:
            raise SelfmaskError(f"mask {name!r}: expected a bool tensor, got {mask.dtype}")
        shape = tuple(mask.shape)
        flat = mask.detach().to("cpu").reshape(-1)
        stored = _stored_entries(config, name, shape)
        if stored is not None:
            stored = stored.reshape(-1)
            fixed_off = int((~flat[~stored]).sum())
            if fixed_off:
                raise SelfmaskError(
                    f"mask {name!r}: {fixed_off} entries outside the trainable set (trainable_fraction="
                    f"{config.trainable_fraction}, seed={config.seed}) are 0; selective masks keep them at 1"
                )
            flat = flat[stored]
        bits = flat.numpy()
        side = None
        if base is not None:
            weight = base.get(name)
            if weight is None or tuple(weight.shape) != shape:
                got = "missing" if weight is None else f"shape {list(weight.shape)}"
                raise SelfmaskError(f"mask {name!r}: base weight of shape {list(shape)} needed, {got}")
            side = _side_weights(config, name, shape, weight)
        codec, payload = codecs.encode_best(bits, rows=_rows(shape, stored is None), weights=side)
        parts = _parts(config, name, shape)
        infos.append(
            MaskTensorInfo(name, shape, int(bits.size), int(np.count_nonzero(bits)), codec, len(payload), parts)
        )
        blobs.append(payload)
    index = [
        {"name": i.name, "shape": list(i.shape), "active": i.coded_active, "codec": i.codec, "bytes": i.payload_bytes,
         **({"parts": i.parts} if i.parts > 1 else {})}
        for i in infos
    ]
    index_bytes = zlib.compress(json.dumps(index, separators=(",", ":")).encode(), 9)
    blob = b"".join(blobs)
    tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {
        INDEX_KEY: ("U8", (len(index_bytes),), index_bytes),
        MASKS_KEY: ("U8", (len(blob),), blob),
    }
    for name, tensor in (extra or {}).items():
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _TORCH_TO_ST:
            raise SelfmaskError(f"extra tensor {name!r}: unsupported dtype {t.dtype}")
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        tensors[EXTRA_PREFIX + name] = (_TORCH_TO_ST[t.dtype], tuple(t.shape), raw.numpy().tobytes())
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "backbone": backbone,
        "fingerprint": fingerprint,
        "mask_config": config.to_dict(),
        "source": dict(source or {}),
        "tensors": len(infos),
    }
    return write_container(meta, tensors), infos


def decode_mask_file(data: bytes, where: str = "<mask bytes>", *, max_entries: int = MAX_ENTRIES) -> MaskFile:
    """Parse, verify and decode the bytes of a mask file (``where`` names it in errors)."""
    meta, raw = read_container(data, where)
    backbone, fingerprint = meta.get("backbone"), meta.get("fingerprint")
    if not isinstance(backbone, str) or not backbone:
        raise SelfmaskError(f"{where}: metadata 'backbone' must be a non-empty string, got {backbone!r}")
    if not isinstance(fingerprint, str) or not _HEX64.fullmatch(fingerprint):
        raise SelfmaskError(f"{where}: metadata 'fingerprint' must be 64 hex digits, got {fingerprint!r}")
    config_dict = meta.get("mask_config")
    if not isinstance(config_dict, dict):
        raise SelfmaskError(f"{where}: metadata 'mask_config' must be an object, got {config_dict!r}")
    if type(config_dict.get("seed", 0)) is not int:  # it seeds the selective-masking layout
        raise SelfmaskError(f"{where}: mask_config 'seed' must be an integer, got {config_dict.get('seed')!r}")
    version = int(meta["version"])  # one of READ_VERSIONS (checked with the container)
    try:
        config = MaskConfig.from_dict({**LEGACY_CONFIG.get(version, {}), **config_dict})
    except (TypeError, ValueError, re.error) as exc:
        raise SelfmaskError(f"{where}: invalid mask_config: {exc}") from None
    source = meta.get("source", {})
    if not isinstance(source, dict):
        raise SelfmaskError(f"{where}: metadata 'source' must be an object")
    for key in (INDEX_KEY, MASKS_KEY):
        if key not in raw or raw[key].dtype != "U8" or len(raw[key].shape) != 1:
            raise SelfmaskError(f"{where}: no 1-D U8 tensor {key!r}")
    records = _read_index(bytes(raw[INDEX_KEY].data), where)
    if meta.get("tensors") != len(records):
        raise SelfmaskError(f"{where}: metadata says {meta.get('tensors')!r} tensors, the index lists {len(records)}")
    version = int(meta["version"])  # one of READ_VERSIONS (checked by read_container)
    infos = _check_records(records, raw[MASKS_KEY].shape[0], config, where, max_entries, version)

    masks: dict[str, torch.Tensor] = {}
    pending: dict[str, bytes] = {}
    blob = raw[MASKS_KEY].data
    offset = 0
    for info in infos:
        payload = bytes(blob[offset : offset + info.payload_bytes])
        offset += info.payload_bytes
        if info.codec in codecs.NEEDS_BASE:
            pending[info.name] = payload  # decoded given the base weights (MaskFile.decode_with_base)
        else:
            masks[info.name] = _decode_tensor(payload, info, config, where)

    extra: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        if key.startswith(EXTRA_PREFIX):
            t = torch.from_numpy(tensor.to_numpy().copy())
            extra[key[len(EXTRA_PREFIX) :]] = t.view(torch.bfloat16) if tensor.dtype == "BF16" else t
        elif key not in (INDEX_KEY, MASKS_KEY):
            raise SelfmaskError(f"{where}: unexpected tensor {key!r} (expected {INDEX_KEY!r}, {MASKS_KEY!r}, 'extra.*')")
    return MaskFile(backbone, fingerprint, config, masks, infos, extra, source, len(data), version, pending, where)


def _read_index(compressed: bytes, where: str) -> list[Any]:
    """Inflate the per-tensor index, refusing anything that inflates beyond :data:`MAX_INDEX_BYTES`."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(compressed, MAX_INDEX_BYTES)
    except zlib.error as exc:
        raise SelfmaskError(f"{where}: corrupt tensor index ({exc})") from None
    if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise SelfmaskError(f"{where}: corrupt tensor index (incomplete, trailing data or over {MAX_INDEX_BYTES} bytes)")
    return parse_json(text, list, f"{where}: corrupt tensor index")


def _check_records(
    records: list[Any], blob_bytes: int, config: MaskConfig, where: str, max_entries: int, version: int
) -> list[MaskTensorInfo]:
    infos: list[MaskTensorInfo] = []
    seen: set[str] = set()
    total = 0
    payload_total = 0
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or not rec["name"]:
            raise SelfmaskError(f"{where}: index entry {i} is not a record with a non-empty 'name'")
        name = rec["name"]
        if name in seen:
            raise SelfmaskError(f"{where}: tensor {name!r} is listed twice")
        seen.add(name)
        shape = check_shape(rec.get("shape"), f"{where}: tensor {name!r}")
        numel = math.prod(shape)
        total += numel
        if total > max_entries:
            raise SelfmaskError(
                f"{where}: more than {max_entries} mask entries in all (at tensor {name!r}); "
                "pass max_entries=... to read a larger file"
            )
        coded = _selected_count(config, numel)
        active, codec, nbytes = rec.get("active"), rec.get("codec"), rec.get("bytes")
        if type(active) is not int or not 0 <= active <= coded:
            raise SelfmaskError(f"{where}: tensor {name!r}: active count {active!r} outside [0, {coded}]")
        if codec not in codecs.CODECS:
            raise SelfmaskError(f"{where}: tensor {name!r}: unknown codec {codec!r}; expected one of {codecs.CODECS}")
        if CODEC_SINCE.get(codec, 1) > version:
            raise SelfmaskError(f"{where}: tensor {name!r}: codec {codec!r} is not part of format version {version}")
        if type(nbytes) is not int or nbytes < 0:
            raise SelfmaskError(f"{where}: tensor {name!r}: invalid payload size {nbytes!r}")
        try:
            parts = _parts(config, name, shape)
        except SelfmaskError as exc:
            raise SelfmaskError(f"{where}: {exc}") from None
        if rec.get("parts", 1) != parts:
            raise SelfmaskError(
                f"{where}: tensor {name!r}: the index says {rec.get('parts')!r} parts, its mask_config {parts}"
            )
        payload_total += nbytes
        if payload_total > blob_bytes:
            raise SelfmaskError(
                f"{where}: tensor {name!r}: payloads exceed the {blob_bytes} bytes of {MASKS_KEY!r} (truncated?)"
            )
        infos.append(MaskTensorInfo(name, shape, coded, active, codec, nbytes, parts))
    if payload_total != blob_bytes:
        raise SelfmaskError(f"{where}: the index accounts for {payload_total} of the {blob_bytes} payload bytes")
    return infos


def _backbone_name(model: nn.Module, backbone: str | None) -> str:
    name = backbone or getattr(model, "backbone_name", None)
    if not name:
        raise SelfmaskError(
            "save_mask: the model has no backbone name (models from selfmask.backbones carry one); pass backbone=..."
        )
    return str(name)


def save_mask(
    model: nn.Module,
    path: str | Path,
    *,
    backbone: str | None = None,
    extra: Mapping[str, torch.Tensor] | None = None,
    overwrite: bool = False,
    source: Mapping[str, Any] | None = None,
    portable: bool = False,
    base_fingerprint: str | None = None,
    inputs: Iterable[str | Path | None] = (),
) -> list[MaskTensorInfo]:
    """Write the current masks of a masked ``model`` to ``path`` (atomically).

    Each tensor is coded with the smallest codec, including the one conditioned on the
    model's base weights (the file then decodes only with them); ``portable=True`` leaves
    that one out, so that ``load_mask`` alone decodes every mask.

    Args:
        model: a model masked with :func:`~selfmask.masking.mask_model`.
        path: the output file; an existing file is refused unless ``overwrite``.
        backbone: the backbone name (default: ``model.backbone_name``).
        extra: extra trained tensors to store, e.g. ``{"weight": head.weight, "bias": head.bias}``.
        source: free-form JSON recorded with the file (e.g. the run folder).
        portable: do not code masks given the base weights (a file that decodes without them).
        base_fingerprint: the fingerprint of the base weights the masks were trained on
            (default: ``model_fingerprint(model)``). Pass it when the model's buffers were
            trained (BatchNorm statistics with ``bn="train"``): the file must name the base
            weights a user has, not the adapted buffers it stores as ``buffer.*`` extras.
        inputs: files the caller read; ``path`` must not be one of them.

    Returns:
        What was recorded per tensor (codec, sizes).
    """
    try:
        config = mask_config(model)
    except ValueError as exc:
        raise SelfmaskError(f"save_mask: {exc}") from None
    data, infos = encode_mask_file(
        current_masks(model),
        backbone=_backbone_name(model, backbone),
        fingerprint=base_fingerprint or model_fingerprint(model),
        config=config,
        extra=extra,
        source=source,
        base=None if portable else base_tensors(model),
    )
    atomic_write_bytes(path, data, overwrite=overwrite, inputs=inputs)
    return infos


def load_mask(path: str | Path, *, max_entries: int = MAX_ENTRIES, base: nn.Module | None = None) -> MaskFile:
    """Read and verify a mask file (checksum, sizes, codecs); masks come back as bool tensors.

    Masks coded given the base weights are decoded only with ``base`` (a plain or masked
    model whose base fingerprint must be the file's); without it the file's header,
    fingerprint, config and per-tensor sizes are read and ``.masks`` says what is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise SelfmaskError(f"mask file {str(path)!r} does not exist")
    mf = decode_mask_file(path.read_bytes(), str(path), max_entries=max_entries)
    if base is not None and mf.needs_base:
        mf.decode_with_base(base_state_dict(base), model_fingerprint(base))
    return mf


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "READ_VERSIONS",
    "MaskFile",
    "MaskTensorInfo",
    "decode_mask_file",
    "encode_mask_file",
    "load_mask",
    "save_mask",
]
