"""The work behind ``selfmask cascade``: build a cascade from a dispatcher run, evaluate it, record it.

:func:`run_cascade` reads the dispatcher's data (unless another is given), builds the cascade
folder, evaluates and times it as asked, and writes ``results.json`` into the folder; the
command line only parses the flags and prints the returned results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfmask.errors import SelfmaskError


def run_cascade(
    dispatcher: Path,
    out: Path,
    cfg: Any,
    *,
    data: str | None = None,
    cache_dir: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    evaluate: bool = True,
    knn_k: int = 200,
    knn_temperature: float = 0.1,
    linear_probe: bool = True,
    time_images: int = 0,
) -> tuple[Any, dict[str, Any]]:
    """Build the cascade of ``dispatcher`` into ``out`` with ``cfg`` (a ``CascadeConfig``); return it and its
    results (``build`` report, ``storage_bits``, ``evaluation`` and ``inference`` when asked), also written
    to ``out/results.json``."""
    from selfmask.backbones import backbone_info
    from selfmask.cascade import build_cascade, evaluate_cascade, time_inference
    from selfmask.data.sources import load_data
    from selfmask.io import atomic_write_json
    from selfmask.training.run_folder import read_run_config

    dcfg = read_run_config(dispatcher)
    spec = data or dcfg.data_spec
    if not spec:
        raise SelfmaskError(f"{dispatcher}/config.json records no data_spec; pass --data")
    info = backbone_info(dcfg.backbone, dcfg.embedding)
    train, test = load_data(spec, resolution=info.input_size, cache_dir=cache_dir)
    cascade, report = build_cascade(dispatcher, train, out, cfg, overwrite=overwrite, progress=progress)
    results: dict[str, Any] = {"build": report, "storage_bits": cascade.storage_bits(), "data": spec,
                               "embedding": cascade.info.embedding}
    if evaluate:
        results["evaluation"] = evaluate_cascade(cascade, train, test, knn_k=knn_k, knn_temperature=knn_temperature,
                                                 linear_probe=linear_probe, seed=cfg.seed)
    if time_images > 0:
        results["inference"] = time_inference(cascade, test.images[:time_images])
    atomic_write_json(Path(out) / "results.json", results)
    return cascade, results


__all__ = ["run_cascade"]
