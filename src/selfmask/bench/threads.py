"""Training-step time with 1 and with more torch threads, side by side in one process.

On a machine shared with other jobs, PyTorch's OpenMP threads wait for each other at the
end of every parallel operation; a descheduled thread then stalls the others (docs/scale.md
has the measurements). This benchmark times the same FFT training step at each thread count,
interleaved in blocks (rotating order), and compares the medians, so the machine's load at
the time affects every count alike; the load average is recorded with the result.
"""

from __future__ import annotations

import functools
import os

import torch

from selfmask.backbones import backbone_info
from selfmask.bench.step import _make_variant, _step
from selfmask.bench.timing import interleaved_medians


def thread_step_times(
    backbone: str = "resnet_tiny", batch: int = 64, threads: tuple[int, ...] = (1, 2), repeats: int = 5,
    steps_per_block: int = 3, seed: int = 0,
) -> dict[str, object]:
    """Median seconds of one FFT step at each thread count and their ratios to the first count."""
    if not threads or min(threads) < 1:
        raise ValueError(f"thread_step_times: thread counts must be >= 1, got {threads}")
    dev = torch.device("cpu")
    info = backbone_info(backbone)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, info.input_size, info.input_size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    v = _make_variant(backbone, False, 10, dev, seed)
    previous = torch.get_num_threads()

    def step(n: int) -> None:
        torch.set_num_threads(n)
        _step(v, x, y)

    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    try:
        med, done = interleaved_medians(
            {str(n): functools.partial(step, n) for n in threads}, repeats, steps_per_block, dev
        )
    finally:
        torch.set_num_threads(previous)
    out: dict[str, object] = {
        "backbone": backbone, "batch": batch, "repeats": done,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load_1min_before": load_before,
        "load_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
    }
    for n in threads:
        out[f"step_s_{n}_threads"] = med[str(n)]
        out[f"{n}_over_{threads[0]}"] = med[str(n)] / med[str(threads[0])]
    return out


__all__ = ["thread_step_times"]
