"""Resolve a ``--data`` specification into train and test :class:`ImageTensorDataset` s.

Specifications:

- ``embedded`` (the downstream domain of the embedded benchmark) and ``embedded-pretrain``;
  ``embedded-tiny`` / ``embedded-tiny-pretrain`` for the small test build.
"""

from __future__ import annotations

from pathlib import Path

from selfmask.data.base import ImageTensorDataset
from selfmask.errors import SelfmaskError

SPEC_HELP = (
    "embedded | embedded-pretrain | embedded-tiny | embedded-tiny-pretrain"
)


def load_data(
    spec: str, *, resolution: int = 32, seed: int = 0, cache_dir: str | Path | None = None
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """``(train, test)`` for ``spec`` (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind.startswith("embedded"):
        from selfmask.data.embedded import load_embedded

        size = "tiny" if "tiny" in kind else "default"
        bench = load_embedded(seed=seed, cache_dir=cache_dir, size=size)
        if kind.endswith("pretrain"):
            return bench.pretrain_train, bench.pretrain_test
        return bench.downstream_train, bench.downstream_test
    raise SelfmaskError(f"unknown data specification {spec!r}; expected one of: {SPEC_HELP}")
