"""A model cascade: one root SMN, a router and expert SMNs on one backbone (METHOD.md section 4).

The root (dispatcher) and every expert are masks over the *same* frozen backbone, so the
cascade keeps one backbone in a :class:`~selfmask.storage.MaskBank` and switches the masked
weights in place: memory is one model plus one bit per weight and expert, instead of
``1 + k`` fp32 models. Switching costs one pass over the masked weights (measured in
docs/cascade.md); separate models would avoid it at ``1 + k`` times the memory.

A saved cascade is a folder::

    DIR/
      cascade.json          manifest: format, backbone, base fingerprint, files and their sha256
      root.mask             the dispatcher's masks (selfmask.mask format, BN buffers as buffer.* extras)
      expert-<g>.mask       one per expert, g = 0 .. k-1 (the router's group g)
      router.safetensors    whitening PCA and k-means centres or mixture components
      fusion.safetensors    conditional.* and unconditional.* PCA (mean, components)

No pickle anywhere; :meth:`Cascade.load` rebuilds it on a plain backbone.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfmask.backbones import backbone_info, create_backbone
from selfmask.backbones.registry import BackboneInfo
from selfmask.cascade.config import MODES
from selfmask.cascade.fusion import FusionPCA, concat_parts
from selfmask.cascade.router import Router
from selfmask.data.base import normalize_batch
from selfmask.errors import SelfmaskError
from selfmask.fingerprint import fingerprint_tensors
from selfmask.io import atomic_save_safetensors, atomic_write_json, read_safetensors
from selfmask.masking.model import base_state_dict
from selfmask.storage import MaskBank, MaskFile, check_fingerprint, encode_mask_file, load_mask
from selfmask.storage.container import atomic_write_bytes
from selfmask.training.run_folder import run_embedding

FORMAT_NAME = "selfmask.cascade"
FORMAT_VERSION = 1
MANIFEST = "cascade.json"
ROOT = "root"


def expert_name(g: int) -> str:
    return f"expert-{g}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class EmbedStats:
    """What one :meth:`Cascade.embed` call ran: forward passes and the images each one saw."""

    mode: str
    forward_passes: int = 0
    images_per_pass: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


class Cascade:
    """Root + router + experts + fusion on one backbone; see the module docstring.

    Build one with :func:`selfmask.cascade.build_cascade`, or load a saved folder with
    :meth:`load`. ``embed(images, mode)`` gives the fused embeddings.
    """

    def __init__(
        self,
        backbone: nn.Module,
        info: BackboneInfo,
        root: MaskFile,
        experts: list[MaskFile],
        router: Router,
        fusion: dict[str, FusionPCA] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if router.num_groups != len(experts):
            raise SelfmaskError(f"cascade: the router has {router.num_groups} groups but there are {len(experts)} experts")
        if router.input_dim != info.embed_dim:
            raise SelfmaskError(f"cascade: the router expects {router.input_dim}-d embeddings, {info.name} gives "
                                f"{info.embed_dim}")
        self.info = info
        self.masks = {ROOT: root, **{expert_name(g): m for g, m in enumerate(experts)}}
        base_state = base_state_dict(backbone)
        fingerprint = fingerprint_tensors(base_state)
        for name, mask in self.masks.items():
            check_fingerprint(fingerprint, mask, what=f"cascade {name}", base_state=base_state)  # MaskBank.add checks names and shapes
        self.bank = MaskBank(backbone)
        for name, mask in self.masks.items():
            self.bank.add(name, mask)
        self.router = router
        self.fusion = dict(fusion or {})
        self.meta = dict(meta or {})
        self.last_stats: EmbedStats | None = None

    @property
    def num_experts(self) -> int:
        return len(self.masks) - 1

    # ------------------------------------------------------------------ inference
    def _check_images(self, images: torch.Tensor) -> None:
        s = self.info.input_size
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise SelfmaskError(f"cascade.embed: expected uint8 images (N, 3, {s}, {s}), got "
                                f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")

    @torch.no_grad()
    def _run(self, name: str, images: torch.Tensor, stats: EmbedStats) -> torch.Tensor:
        model = self.bank.activate(name)
        model.eval()
        device = next(model.parameters()).device
        out = model(normalize_batch(images.to(device), self.info.mean, self.info.std))
        stats.forward_passes += 1
        stats.images_per_pass[name] = len(images)
        return out.flatten(1).float().cpu()

    @torch.no_grad()
    def embed_parts(
        self, images: torch.Tensor, mode: str = "conditional"
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], torch.Tensor]:
        """``(root embeddings, expert embeddings, routes)`` of a batch of uint8 images.

        Conditional: one pass of the root over all images, then one pass per expert that
        at least one image was routed to, over those images only (``experts[g]`` holds the
        rows routed to ``g``, or ``None``). Unconditional: every expert over every image.
        ``self.last_stats`` records the passes.
        """
        if mode not in MODES:
            raise SelfmaskError(f"cascade.embed: mode must be one of {MODES}, got {mode!r}")
        self._check_images(images)
        stats = EmbedStats(mode)
        start = time.perf_counter()
        try:
            root = self._run(ROOT, images, stats)
            routes = self.router.route(root)
            experts: list[torch.Tensor | None] = []
            for g in range(self.num_experts):
                if mode == "unconditional":
                    experts.append(self._run(expert_name(g), images, stats))
                else:
                    rows = routes == g
                    experts.append(self._run(expert_name(g), images[rows], stats) if bool(rows.any()) else None)
        finally:
            self.bank.deactivate()
        stats.seconds = time.perf_counter() - start
        self.last_stats = stats
        return root, experts, routes

    def fuse(self, root: torch.Tensor, experts: list[torch.Tensor | None], routes: torch.Tensor, mode: str) -> torch.Tensor:
        """Fused embeddings from the parts :meth:`embed_parts` returned for ``mode``."""
        if mode not in self.fusion:
            raise SelfmaskError(f"cascade: no {mode} fusion fitted (have {sorted(self.fusion)})")
        return self.fusion[mode](concat_parts(root, experts, None if mode == "unconditional" else routes))

    def embed(self, images: torch.Tensor, mode: str = "conditional", batch_size: int | None = None) -> torch.Tensor:
        """Fused embeddings ``(N, fusion_dim)`` of uint8 images ``(N, 3, H, W)``.

        ``batch_size`` splits a large set into batches (each batch runs at most
        ``1 + experts present`` forward passes in conditional mode); ``None``: one batch.
        """
        if batch_size is not None and batch_size < 1:
            raise SelfmaskError(f"cascade.embed: batch_size must be >= 1, got {batch_size}")
        self._check_images(images)
        step = batch_size or max(1, len(images))
        out = [self.fuse(*self.embed_parts(images[i : i + step], mode), mode) for i in range(0, len(images), step)]
        if not out:
            raise SelfmaskError("cascade.embed: no images given")
        return torch.cat(out)

    @torch.no_grad()
    def embed_single(self, images: torch.Tensor, name: str = ROOT) -> torch.Tensor:
        """Embeddings of one member (default: the root, i.e. the single SMN) without fusion."""
        self._check_images(images)
        stats = EmbedStats("single")
        try:
            out = self._run(name, images, stats)
        finally:
            self.bank.deactivate()
        self.last_stats = stats
        return out

    # ------------------------------------------------------------------ storage
    def storage_bits(self) -> dict[str, Any]:
        """What the cascade costs to store, in bits (METHOD.md sections 4-5).

        ``raw_mask_bits``: one bit per masked weight and mask; ``coded_mask_bits``: the
        mask files without their extras (entropy-coded masks + headers); ``buffer_bits``:
        adapted BatchNorm statistics stored with the masks; ``router_bits`` / ``fusion_bits``:
        the stored router and fusion tensors. ``fp32_weights_bits``: the masked weights of
        one fp32 model, the paper's unit ("6 masks = 6/32 of a model").
        """
        root = self.masks[ROOT]
        raw = sum(m.numel for m in self.masks.values())
        coded = 0
        buffers = 0
        for m in self.masks.values():
            extra_bytes = sum(t.numel() * t.element_size() for t in m.extra.values())
            coded += 8 * (m.file_bytes - extra_bytes) if m.file_bytes else 8 * m.payload_bytes
            buffers += 8 * extra_bytes
        router = sum(8 * t.numel() * t.element_size() for t in self.router.tensors.values())
        fusion = {k: 8 * (f.mean.numel() * f.mean.element_size() + f.components.numel() * f.components.element_size())
                  for k, f in self.fusion.items()}
        return {
            "masks": len(self.masks),
            "masked_weights_per_mask": root.numel,
            "raw_mask_bits": raw,
            "coded_mask_bits": coded,
            "entropy_bits": sum(m.entropy_bits for m in self.masks.values()),
            "buffer_bits": buffers,
            "router_bits": router,
            "fusion_bits": fusion,
            "fp32_weights_bits": 32 * root.numel,
            "raw_fraction_of_fp32": raw / (32 * root.numel) if root.numel else 0.0,
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the cascade folder (see the module docstring); every file is written atomically."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise SelfmaskError(f"cascade folder {str(path)!r} exists and is not a folder")
        if (path / MANIFEST).exists() and not overwrite:
            raise SelfmaskError(f"{path / MANIFEST} exists; pass overwrite=True (--overwrite) to replace the cascade")
        if set(self.fusion) != set(MODES):
            raise SelfmaskError(f"cascade.save: both fusions must be fitted first (have {sorted(self.fusion)})")
        path.mkdir(parents=True, exist_ok=True)
        files: dict[str, dict[str, Any]] = {}
        for name, m in self.masks.items():
            data, _infos = encode_mask_file(m.masks, backbone=m.backbone, fingerprint=m.fingerprint, config=m.config,
                                            extra=m.extra, source=m.source, base=self.bank.base_weights())
            atomic_write_bytes(path / f"{name}.mask", data, overwrite=True)
            files[name] = {"file": f"{name}.mask", "sha256": hashlib.sha256(data).hexdigest()}
        atomic_save_safetensors(path / "router.safetensors", self.router.tensors, {"method": self.router.method})
        fusion_tensors = {f"{mode}.{key}": getattr(self.fusion[mode], key) for mode in MODES
                          for key in ("mean", "components")}
        atomic_save_safetensors(path / "fusion.safetensors", fusion_tensors)
        root = self.masks[ROOT]
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "backbone": root.backbone,
            "fingerprint": root.fingerprint,
            "embed_dim": self.info.embed_dim,
            "embedding": self.info.embedding,
            "root": files[ROOT],
            "experts": [files[expert_name(g)] for g in range(self.num_experts)],
            "router": {"file": "router.safetensors", "sha256": _sha256(path / "router.safetensors"),
                       "method": self.router.method, "groups": self.router.num_groups, "notes": self.router.notes},
            "fusion": {"file": "fusion.safetensors", "sha256": _sha256(path / "fusion.safetensors"),
                       "dim": {mode: self.fusion[mode].dim for mode in MODES}},
            "meta": self.meta,
        }
        atomic_write_json(path / MANIFEST, manifest)
        return path

    @classmethod
    def load(
        cls, path: str | Path, backbone: nn.Module | str | None = None, *, weights: str | Path | None = None,
        device: str = "cpu",
    ) -> Cascade:
        """Rebuild a saved cascade on ``backbone``: a plain module, or a registered name (with ``weights``).

        ``backbone=None`` uses the manifest's backbone name and recorded weights path (no weights:
        the random initialisation after ``torch.manual_seed(base_seed)``, as run folders do). Every
        file is checked against the manifest's sha256 and the masks against the backbone's
        base fingerprint; any mismatch raises :class:`SelfmaskError` naming the file.
        """
        path = Path(path)
        manifest = read_manifest(path)
        if backbone is None or isinstance(backbone, str):
            name = backbone or manifest["backbone"]
            if name != manifest["backbone"]:
                raise SelfmaskError(f"{path / MANIFEST}: the cascade was built on {manifest['backbone']!r}, not {name!r}")
            meta = manifest.get("meta") or {}
            if weights is None:
                weights = meta.get("weights")
            with torch.random.fork_rng(devices=[]):  # weights null: the random base of the dispatcher's seed
                torch.manual_seed(int(meta.get("base_seed", 0)))
                model = create_backbone(name, weights, run_embedding(manifest))
        else:
            model = backbone
        info = backbone_info(manifest["backbone"], run_embedding(manifest))  # older manifests: the legacy one
        model.to(device)

        def checked(entry: dict[str, Any], what: str) -> Path:
            f = path / str(entry.get("file"))
            if not f.is_file():
                raise SelfmaskError(f"cascade {path}: {what} file {f.name!r} is missing")
            if _sha256(f) != entry.get("sha256"):
                raise SelfmaskError(f"cascade {path}: {what} file {f.name!r} does not match the manifest (sha256 "
                                    "differs): it was replaced or corrupted")
            return f

        def mask(entry: dict[str, Any], what: str) -> MaskFile:
            m = load_mask(checked(entry, what))
            if m.backbone != manifest["backbone"] or m.fingerprint != manifest["fingerprint"]:
                raise SelfmaskError(f"cascade {path}: {what} file {entry['file']!r} is for backbone {m.backbone!r} "
                                    f"({m.fingerprint[:12]}...), the manifest says {manifest['backbone']!r} "
                                    f"({str(manifest['fingerprint'])[:12]}...)")
            return m

        root = mask(manifest["root"], "root mask")
        experts = [mask(e, f"expert {g} mask") for g, e in enumerate(manifest["experts"])]
        r = manifest["router"]
        router = Router.from_tensors(r["method"], read_safetensors(checked(r, "router")), str(path / r["file"]))
        router.notes = list(r.get("notes", []))
        ft = read_safetensors(checked(manifest["fusion"], "fusion"))
        width = (1 + len(experts)) * info.embed_dim
        fusion = {}
        for mode in MODES:
            if f"{mode}.mean" not in ft or f"{mode}.components" not in ft:
                raise SelfmaskError(f"cascade {path}: fusion.safetensors lacks the {mode} PCA")
            fusion[mode] = FusionPCA(ft[f"{mode}.mean"], ft[f"{mode}.components"])
            fusion[mode].check(width, f"cascade {path}: fusion.safetensors ({mode})")
        return cls(model, info, root, experts, router, fusion, manifest.get("meta"))


def read_manifest(path: Path) -> dict[str, Any]:
    """``cascade.json`` of a cascade folder, checked for format, version and required keys."""
    f = path / MANIFEST
    if not path.is_dir():
        raise SelfmaskError(f"cascade folder {str(path)!r} does not exist")
    if not f.is_file():
        raise SelfmaskError(f"{str(path)!r} is not a cascade folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(f.read_text())
    except ValueError as exc:
        raise SelfmaskError(f"{f}: invalid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise SelfmaskError(f"{f}: not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise SelfmaskError(f"{f}: version {manifest.get('version')!r}; this selfmask reads version {FORMAT_VERSION}")
    for key in ("backbone", "fingerprint", "root", "experts", "router", "fusion"):
        if key not in manifest:
            raise SelfmaskError(f"{f}: key {key!r} is missing")
    if not isinstance(manifest["experts"], list) or not manifest["experts"]:
        raise SelfmaskError(f"{f}: 'experts' must be a non-empty list")
    return manifest
