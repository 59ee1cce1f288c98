"""Storage benchmarks (issue 6): mask-file size against the entropy bound, coding time, task switches.

* :func:`mask_file_size`: random masks with the real tensor shapes of a backbone (ResNet-50
  with the authors' targets: 61 tensors, 23,462,592 weights) at a given active fraction;
  the mask file's size against the per-tensor entropy bound ``sum n * H(p)``, against
  fp32 weights and against lzma / bz2 / zstd-19 of the packed masks; encode and decode
  time on one CPU thread (medians).
* :func:`bank_switch_time`: a :class:`~selfmask.storage.MaskBank` task switch against one
  copy of the masked weights (``deactivate``, the memory-bandwidth floor), interleaved,
  medians.
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import statistics
import time
from collections.abc import Callable

import torch

from selfmask.backbones import backbone_info, build_backbone
from selfmask.bench.timing import interleaved_medians
from selfmask.fingerprint import model_fingerprint
from selfmask.masking.config import MaskConfig
from selfmask.storage.bank import MaskBank
from selfmask.storage.maskfile import decode_mask_file, encode_mask_file
from selfmask.storage.report import packed_mask_bytes

RESNET50_MASKED_WEIGHTS = 23_462_592


def _target_shapes(backbone: str, preset: str) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build_backbone(backbone)
    config = MaskConfig.preset(preset)
    return {n: p.shape for n, p in model.named_parameters() if config.matches(n)}


def _random_masks(
    shapes: dict[str, torch.Size], active_fraction: float, seed: int, per_channel: bool = False
) -> dict[str, torch.Tensor]:
    """Independent entries at ``active_fraction``; with ``per_channel``, each output channel
    draws its own density uniformly from ``[2p - 1, 1]`` (mean ``p``), as masks with
    channel structure."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, s in shapes.items():
        density: torch.Tensor | float = active_fraction
        if per_channel and len(s) >= 2:
            low = max(0.0, 2 * active_fraction - 1)
            density = low + (1 - low) * torch.rand((s[0],) + (1,) * (len(s) - 1), generator=g)
        out[n] = torch.rand(s, generator=g) < density
    return out


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def mask_file_size(
    backbone: str = "resnet50",
    preset: str = "resnet-authors",
    active_fraction: float = 0.923,
    seed: int = 0,
    repeats: int = 3,
    per_channel: bool = False,
) -> dict[str, float | int | str | bool]:
    """Size of a mask file of random masks against the entropy bound and other compressors.

    ``per_channel``: channel-structured masks (see ``_random_masks``), where the
    per-channel codec goes below the per-tensor bound.
    """
    shapes = _target_shapes(backbone, preset)
    masks = _random_masks(shapes, active_fraction, seed, per_channel)
    config = MaskConfig.preset(preset)
    fingerprint = hashlib.sha256(f"bench:{backbone}".encode()).hexdigest()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def encode() -> bytes:
            return encode_mask_file(masks, backbone=backbone, fingerprint=fingerprint, config=config)[0]

        data = encode()
        decoded = decode_mask_file(data)
        encode_s = _median_time(encode, repeats)
        decode_s = _median_time(lambda: decode_mask_file(data), repeats)
    finally:
        torch.set_num_threads(threads)
    if any(not torch.equal(decoded.masks[n], m) for n, m in masks.items()):  # pragma: no cover
        raise RuntimeError("mask_file_size: the round trip is not exact")
    n = decoded.numel
    bound_bytes = decoded.entropy_bits / 8
    packed = packed_mask_bytes(masks)
    sizes = {
        "lzma9_packed_bytes": len(lzma.compress(packed, preset=9)),
        "bz2_9_packed_bytes": len(bz2.compress(packed, 9)),
    }
    import zstandard

    sizes["zstd19_packed_bytes"] = len(zstandard.ZstdCompressor(level=19).compress(packed))
    header = len(data) - decoded.payload_bytes
    return {
        "backbone": backbone,
        "preset": preset,
        "masked_tensors": len(masks),
        "masked_weights": n,
        "active_fraction_target": active_fraction,
        "per_channel_densities": per_channel,
        "active_fraction": decoded.active / n,
        "seed": seed,
        "file_bytes": len(data),
        "payload_bytes": decoded.payload_bytes,
        "header_bytes": header,
        "entropy_bound_bytes": bound_bytes,
        "payload_over_bound": decoded.payload_bytes / bound_bytes,
        "file_over_bound_plus_4KiB": len(data) / (1.01 * bound_bytes + 4096),
        "bits_per_weight": 8 * len(data) / n,
        "x_smaller_than_fp32": 4 * n / len(data),
        "packed_bytes": len(packed),
        **sizes,
        "codecs": ",".join(sorted({t.codec for t in decoded.tensors})),
        "encode_s": encode_s,
        "decode_s": decode_s,
        "encode_plus_decode_s": encode_s + decode_s,
        "threads": 1,
        "repeats": repeats,
    }


def bank_switch_time(
    backbone: str = "resnet50",
    preset: str = "resnet-authors",
    device: str = "cpu",
    active_fraction: float = 0.923,
    repeats: int = 11,
    seed: int = 0,
    batch: int | None = None,
    deadline: float | None = None,
) -> dict[str, float | int | str]:
    """Median MaskBank task switch / median copy of the masked weights, interleaved.

    With ``batch``, also inference images/s (``batch`` random images, no gradient) of a
    stream of one task against a stream whose batches alternate between two tasks (a
    switch before every batch), interleaved; ``deadline`` (``time.monotonic()``) cuts
    the repeats of that part short (at least three).
    """
    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build_backbone(backbone).to(dev)
    shapes = {n: p.shape for n, p in model.named_parameters() if MaskConfig.preset(preset).matches(n)}
    fingerprint = model_fingerprint(model)
    bank = MaskBank(model)
    for i, task in enumerate(("a", "b")):
        data, _ = encode_mask_file(
            _random_masks(shapes, active_fraction, seed + 1 + i),
            backbone=backbone,
            fingerprint=fingerprint,
            config=MaskConfig.preset(preset),
        )
        bank.add(task, decode_mask_file(data))

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn: Callable[[], object]) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up
        bank.activate("a")
        bank.deactivate()
    switch, copy = [], []
    for i in range(repeats):
        switch.append(timed(lambda i=i: bank.activate("ab"[i % 2])))
        copy.append(timed(bank.deactivate))
    switch_s, copy_s = statistics.median(switch), statistics.median(copy)
    throughput: dict[str, float | int] = {}
    if batch is not None:
        throughput = _bank_images_per_s(bank, backbone, batch, dev, repeats, seed, deadline)
    return {
        **throughput,
        "backbone": backbone,
        "device": device,
        "masked_weights": sum(s.numel() for s in shapes.values()),
        "switch_s": switch_s,
        "copy_s": copy_s,
        "switch_over_copy": switch_s / copy_s,
        "packed_bytes_per_task": bank.packed_bytes() // 2,
        "original_bytes": bank.original_bytes(),
        "threads": torch.get_num_threads(),
        "repeats": repeats,
    }


def _bank_images_per_s(
    bank: MaskBank, backbone: str, batch: int, device: torch.device, repeats: int, seed: int, deadline: float | None
) -> dict[str, float | int]:
    size = backbone_info(backbone).input_size
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    model = bank.activate("a").eval()
    turn = [0]

    def one_task() -> None:  # the weights of whichever task is active: a forward pass costs the same
        with torch.no_grad():
            model(x)

    def alternating() -> None:
        turn[0] += 1
        with torch.no_grad():
            bank.activate("ab"[turn[0] % 2]).eval()(x)

    med, done = interleaved_medians({"one": one_task, "alternating": alternating}, repeats, 2, device, deadline)
    return {
        "batch": batch,
        "one_task_images_per_s": batch / med["one"],
        "alternating_images_per_s": batch / med["alternating"],
        "alternating_over_one_task": med["one"] / med["alternating"],
        "throughput_repeats": done,
    }


__all__ = ["RESNET50_MASKED_WEIGHTS", "bank_switch_time", "mask_file_size"]
