"""Images/s of decoding image files vs reading the cached uint8 tensor (the two data paths).

A folder of synthetic JPEG photos (smooth random colour fields plus grain, saved at
quality 90, sized like the paper's datasets' images) is made in a temporary folder.
Three paths are timed, interleaved over ``repeats`` rounds and compared by medians:

* ``decode``: :func:`selfmask.data.cache.decode_images`: open, decode, resize the
  shorter side and centre-crop every file (what a loader without a cache does each epoch);
* ``cache_read``: :func:`selfmask.data.cache.cached_images` on a warm cache: hash the
  file list (one ``stat`` per file) and read the safetensors file (which safetensors maps
  lazily, so the timing includes copying every byte into process memory once);
* ``memory_batches``: gather random batches from the in-memory uint8 tensor (what
  training does once the dataset is loaded).

File reads hit the operating system's page cache in every round for both paths, so
the comparison is of decoding work, not of disk speed.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from selfmask.data.cache import cached_images, decode_images


def make_jpeg_folder(
    root: str | Path, num_images: int, size: tuple[int, int] = (500, 375), classes: int = 2, seed: int = 0
) -> list[Path]:
    """Write ``num_images`` synthetic JPEGs as ``root/class_k/img_i.jpg``; returns their paths in order."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    paths = []
    w, h = size
    for i in range(num_images):
        d = root / f"class_{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (h // 25 + 2, w // 25 + 2, 3), dtype=np.uint8))
        arr = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
        arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        p = d / f"img_{i:05d}.jpg"
        Image.fromarray(arr).save(p, quality=90)
        paths.append(p)
    return paths


def decode_vs_cache_throughput(
    num_images: int = 256,
    source_size: tuple[int, int] = (500, 375),
    resolution: int = 224,
    repeats: int = 5,
    workers: int = 1,
    batch: int = 64,
    seed: int = 0,
) -> dict[str, float | int | str]:
    """Median images/s of the three data paths (see the module docstring) and their ratios."""
    with tempfile.TemporaryDirectory(prefix="selfmask-bench-data-") as tmp:
        paths = make_jpeg_folder(Path(tmp) / "images", num_images, source_size, seed=seed)
        cache_dir = Path(tmp) / "cache"
        images, record = cached_images(paths, resolution, cache_dir, workers=workers)  # build the cache
        cache_bytes = Path(str(record["cache_file"])).stat().st_size
        g = torch.Generator().manual_seed(seed)
        times: dict[str, list[float]] = {"decode": [], "cache_read": [], "memory_batches": []}
        for r in range(repeats):
            order = list(times) if r % 2 == 0 else list(reversed(times))
            for name in order:
                t0 = time.perf_counter()
                if name == "decode":
                    decode_images(paths, resolution, workers=workers)
                elif name == "cache_read":
                    out, rec = cached_images(paths, resolution, cache_dir, workers=workers)
                    out = out.clone()  # touch every byte: the file is memory-mapped lazily
                    assert rec["cache_hit"] and out.shape == images.shape
                else:
                    for _ in range(max(1, num_images // batch)):
                        images[torch.randint(0, num_images, (batch,), generator=g)].contiguous()
                times[name].append(time.perf_counter() - t0)
    n_mem = max(1, num_images // batch) * batch
    med = {k: statistics.median(v) for k, v in times.items()}
    decode_ips = num_images / med["decode"]
    cache_ips = num_images / med["cache_read"]
    mem_ips = n_mem / med["memory_batches"]
    return {
        "num_images": num_images,
        "source_size": f"{source_size[0]}x{source_size[1]} JPEG q90",
        "resolution": resolution,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "cache_file_mb": cache_bytes / 2**20,
        "decode_images_per_s": decode_ips,
        "cache_read_images_per_s": cache_ips,
        "memory_batch_images_per_s": mem_ips,
        "cache_speedup": cache_ips / decode_ips,
    }
