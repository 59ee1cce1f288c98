"""Arguments and steps shared by several commands."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from selfmask.errors import SelfmaskError
from selfmask.io import read_json_object


def add_data_args(p: argparse.ArgumentParser, default: str = "embedded") -> None:
    from selfmask.data.sources import SPEC_HELP

    p.add_argument("--data", default=default, help=f"dataset: {SPEC_HELP} (default: {default})")
    p.add_argument("--cache-dir", type=Path, default=None, help="dataset cache (default ~/.cache/selfmask)")


def add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="backbone name (see `selfmask backbones`; default resnet_tiny)")
    p.add_argument("--weights", default=None, help="local checkpoint of the backbone (.safetensors/.pt/.pth)")


def add_embedding_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedding", default=None, choices=("class_token", "projected"),
                   help="CLIP ViTs: the 768-d post-LayerNorm class token (default, the paper's features) or the "
                   "projected 512-d embedding of CLIP's encode_image")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--knn-k", type=int, default=200, help="neighbours of the weighted k-NN (default 200)")
    p.add_argument("--knn-temperature", type=float, default=0.1, help="k-NN temperature T (default 0.1)")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


def read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise SelfmaskError(f"config file {str(path)!r} does not exist")
    return read_json_object(path, f"config file {path}")


def check_setting_types(settings: dict[str, Any], where: str, optional: tuple[str, ...] = ("weights",)) -> None:
    """The path-like settings of a config file (data, backbone, weights) are strings (``optional`` ones may be null)."""
    for key in ("data", "backbone", "weights"):
        if key in settings and not isinstance(settings[key], str) and not (key in optional and settings[key] is None):
            null = " or null" if key in optional else ""
            raise SelfmaskError(f"{where}: {key!r} must be a string{null}, got {settings[key]!r}")


def check_eval_args(args: argparse.Namespace) -> None:
    if args.knn_k < 1:
        raise SelfmaskError(f"--knn-k must be >= 1, got {args.knn_k}")
    if not args.knn_temperature > 0:
        raise SelfmaskError(f"--knn-temperature must be > 0, got {args.knn_temperature}")
