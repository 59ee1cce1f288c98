"""A run folder: everything a training run leaves behind, written atomically.

Layout::

    RUN_DIR/
      config.json          resolved configuration (backbone, weights, mask, training, data)
      status.json          {"status": "running" | "trained" | "finished" | "interrupted" | "failed", ...}
      metrics.jsonl        one JSON object per epoch
      log.txt              the run's log
      scores.safetensors   mask scores by qualified parameter name (mask/topk runs)
      buffers.safetensors  the backbone's buffers after training (BatchNorm running statistics)
      head.safetensors     the trained head (weight, bias)
      weights.safetensors  fine-tuned backbone state dict (fft runs)
      results.json         final evaluation, with the settings that produced it
      checkpoint.pt        resumable training state (``selfmask adapt --resume RUN_DIR``)
      .selfmask-run        marks a run folder (see :mod:`selfmask.training.ownership`)

Every file is replaced atomically, so a killed run (or Ctrl-C) leaves a folder whose
files are each complete; ``status.json`` says how far it got.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from selfmask.errors import SelfmaskError
from selfmask.io import atomic_write_json, atomic_write_text, read_safetensors
from selfmask.training.config import run_embedding  # noqa: F401  (cascade manifests read it from here)
from selfmask.training.ownership import claim, folder_problem, release

RUN_FILES = (
    "config.json",
    "status.json",
    "metrics.jsonl",
    "log.txt",
    "scores.safetensors",
    "buffers.safetensors",
    "head.safetensors",
    "weights.safetensors",
    "results.json",
    "checkpoint.pt",
)


class RunFolder:
    """Create or reuse a run folder; refuses to clobber a finished run unless ``overwrite``."""

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._metrics: list[dict[str, Any]] = []
        self._handler: logging.Handler | None = None

    # ------------------------------------------------------------------ preflight
    def prepare(self) -> RunFolder:
        """Check the folder is usable before any training starts."""
        p = self.path
        problem = folder_problem(p)  # not a folder, or a folder of the user's: never touched
        if problem:
            raise SelfmaskError(problem)
        status = self.status()
        if status is not None and status.get("status") in ("finished", "trained") and not self.overwrite:
            raise SelfmaskError(
                f"run folder {str(p)!r} already holds a finished run ({status.get('status')}); "
                "pass --overwrite to replace it "
                "or choose another --out"
            )
        try:
            p.mkdir(parents=True, exist_ok=True)
            claim(p)  # the marker, and this process's lock: a second process is refused
            fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=p)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise SelfmaskError(f"run folder {str(p)!r} is not writable: {exc.strerror or exc}") from None
        if self.overwrite:
            for name in RUN_FILES:
                f = p / name
                if f.is_file():
                    f.unlink()
            for sub in ("plots",):
                if (p / sub).is_dir():
                    shutil.rmtree(p / sub)
        return self

    def status(self) -> dict[str, Any] | None:
        f = self.path / "status.json"
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except (OSError, ValueError):
            return {"status": "unreadable"}

    # ------------------------------------------------------------------ writing
    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path / name
        atomic_write_json(path, obj)
        return path

    def set_status(self, status: str, **extra: Any) -> None:
        self.write_json("status.json", {"status": status, **extra})
        if status in ("finished", "failed", "interrupted"):
            release(self.path)  # this process is done with the folder

    def append_metrics(self, row: dict[str, Any]) -> None:
        self._metrics.append(row)
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self._metrics))

    def restore_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Continue ``metrics.jsonl`` from a checkpoint's rows (resume)."""
        self._metrics = list(rows)

    def file(self, name: str) -> Path:
        return self.path / name

    def attach_log(self, logger: logging.Logger) -> None:
        handler = logging.FileHandler(self.path / "log.txt", mode="a")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        self._handler = handler

    def detach_log(self, logger: logging.Logger) -> None:
        if self._handler is not None:
            logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def write_run_config(
    run: RunFolder,
    info: Any,
    train_set: Any,
    labelled: int,
    cfg: Any,
    mcfg: Any,
    run_meta: dict[str, Any] | None,
    **extra: Any,
) -> None:
    """Write a run's ``config.json`` through :class:`~selfmask.training.config.RunConfig` (its one writer).

    ``extra`` holds the objective's settings under its name (``swav=``) and ``crops=``, as
    config objects or their JSON dicts; ``run_meta`` the weights and provenance keys
    (:data:`~selfmask.training.config.META_KEYS`). What is written is read back first, so a
    key no reader knows fails here, before training, not when the run is resumed.
    """
    from selfmask.training.config import RUN_FORMAT_VERSION, RunConfig
    from selfmask.training.fields import to_mapping

    meta = dict(run_meta or {})
    record = {
        "format_version": RUN_FORMAT_VERSION,
        "backbone": info.name,
        "embedding": info.embedding,
        "weights": meta.pop("weights", None),
        "seed": cfg.seed,
        "mask": mcfg.to_dict() if mcfg else None,
        "train": cfg.to_dict(),
        "data": {
            "name": train_set.name,
            "num_classes": train_set.num_classes,
            "train_images": len(train_set),
            "labelled_images": labelled,
            "resolution": train_set.resolution,
        },
        **{k: v if isinstance(v, dict) else to_mapping(v) for k, v in extra.items()},
        **meta,
    }
    typed = RunConfig.from_json(record, f"config.json of {run.path}")
    run.write_json("config.json", typed.to_json())
    run.set_status("running", epoch=0, total_epochs=cfg.epochs)


def read_run_config(path: str | Path) -> Any:
    """``RUN_DIR/config.json`` as a :class:`~selfmask.training.config.RunConfig`, with one clear error when
    it is missing, has an unknown key or was written by a newer format."""
    from selfmask.training.config import read_config_json

    return read_config_json(path)


def create_run_base(cfg: Any) -> Any:
    """The base backbone of a run (:class:`~selfmask.training.config.RunConfig`), as training built it:
    ``create_backbone(backbone, weights, embedding)`` after ``torch.manual_seed(seed)`` (a random base
    depends on the seed)."""
    import torch

    from selfmask.backbones import create_backbone

    torch.manual_seed(cfg.seed)
    return create_backbone(cfg.backbone, cfg.weights, cfg.embedding)


def load_run(path: str | Path, device: str = "cpu"):
    """Rebuild ``(backbone, head, config)`` as a run left them: masks with their scores, or FFT weights.

    ``config`` is the run's :class:`~selfmask.training.config.RunConfig`. The backbone is
    :func:`create_run_base`'s; a ``masked-random`` head is masked with the run's own
    threshold and initial score (``train.mask``), so it has the masks it trained with.
    """
    import torch

    from selfmask.backbones import backbone_info
    from selfmask.masking import mask_model
    from selfmask.training.config import head_mask_config

    path = Path(path)
    cfg = read_run_config(path)
    backbone = create_run_base(cfg)
    info = backbone_info(cfg.backbone, cfg.embedding)
    if cfg.mask is not None:
        mask_model(backbone, cfg.mask)
        load_scores_and_buffers(backbone, path)
    elif (path / "weights.safetensors").is_file():
        backbone.load_state_dict(read_safetensors(path / "weights.safetensors"))
    head = None
    head_file = path / "head.safetensors"
    if head_file.is_file():
        state = read_safetensors(head_file)
        num_classes = int((cfg.data or {}).get("num_classes", 0)) or None
        weight_key = "weight" if "weight" in state else "parametrizations.weight.original"
        out_dim = state[weight_key].shape[0] if num_classes is None else num_classes
        head = torch.nn.Linear(info.embed_dim, out_dim)
        if "weight" not in state:  # the masked-random head: its masks come from its scores and the run's mu, S0
            mu_s0 = (cfg.train.mask.threshold, cfg.train.mask.init_score) if cfg.train is not None else (0.0, 1.0)
            mask_model(head, head_mask_config(*mu_s0))
        head.load_state_dict(state)
    return backbone.to(device), (head.to(device) if head is not None else None), cfg


def load_scores_and_buffers(backbone: Any, path: str | Path) -> None:
    """Copy ``scores.safetensors`` (and ``buffers.safetensors`` if present) of a run into a masked backbone."""
    import torch

    from selfmask.masking import mask_scores

    path = Path(path)
    scores_file = path / "scores.safetensors"
    if not scores_file.is_file():
        raise SelfmaskError(f"{scores_file} is missing: {str(path)!r} is not a finished mask run")
    stored = read_safetensors(scores_file)
    live = mask_scores(backbone)
    if set(stored) != set(live):
        raise SelfmaskError(
            f"{scores_file}: score names do not match the backbone: missing {sorted(set(live) - set(stored))[:5]}, "
            f"unexpected {sorted(set(stored) - set(live))[:5]}"
        )
    with torch.no_grad():
        for k, v in stored.items():
            if v.shape != live[k].shape:
                raise SelfmaskError(f"{scores_file}: {k!r} has shape {tuple(v.shape)}, expected {tuple(live[k].shape)}")
            live[k].copy_(v)
        buffers_file = path / "buffers.safetensors"
        if buffers_file.is_file():
            live_buffers = dict(backbone.named_buffers())
            stored_buffers = read_safetensors(buffers_file)
            if set(stored_buffers) != set(live_buffers):
                raise SelfmaskError(f"{buffers_file}: buffer names do not match the backbone")
            for k, v in stored_buffers.items():
                live_buffers[k].copy_(v)
