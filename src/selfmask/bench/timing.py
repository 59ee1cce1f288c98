"""Side-by-side timing: variants run in interleaved blocks (rotating order) and compared by medians.

A noisy or shared machine slows every variant alike this way, so ratios of the medians
hold where absolute times do not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    calls_per_block: int,
    device: torch.device,
    deadline: float | None = None,
    min_repeats: int = 3,
    warmup: int = 2,
) -> tuple[dict[str, float], int]:
    """Median seconds per call of each function, and the number of blocks timed.

    Each function is called ``warmup`` times first; then ``repeats`` rounds, each
    timing one block of ``calls_per_block`` calls per function, the order rotating
    by one every round. With a ``deadline`` (``time.monotonic()`` seconds), rounds
    stop once it has passed and at least ``min_repeats`` rounds are done.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    done = 0
    for r in range(repeats):
        if deadline is not None and done >= min_repeats and time.monotonic() > deadline:
            break
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            for _ in range(calls_per_block):
                fns[name]()
            sync(device)
            times[name].append((time.perf_counter() - t0) / calls_per_block)
        done += 1
    return {k: statistics.median(v) for k, v in times.items()}, done


__all__ = ["interleaved_medians", "sync"]
