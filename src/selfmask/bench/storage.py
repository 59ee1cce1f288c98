"""Storage benchmarks (issue 6): mask-file size against the entropy bound, coding time, task switches.

* :func:`mask_file_size`: random masks with the real tensor shapes of a backbone (ResNet-50
  with the authors' targets: 61 tensors, 23,462,592 weights) at a given active fraction;
  the mask file's size against the per-tensor entropy bound ``sum n * H(p)``, against
  fp32 weights and against lzma / bz2 / zstd-19 of the packed masks; encode and decode
  time on one CPU thread (medians).
* :func:`bank_switch_time`: a :class:`~selfmask.storage.MaskBank` task switch against one
  copy of the masked weights (``deactivate``, the memory-bandwidth floor), interleaved,
  medians.
* :func:`bank_mixed_throughput`: batches mixing 2 / 8 / 32 tasks through ``MaskBank.run``
  against one resident merged model per task; images/s and memory.
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
from selfmask.storage.maskfile import MaskFile, decode_mask_file, encode_mask_file
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


def _bank_of_random_tasks(
    model: torch.nn.Module, backbone: str, preset: str, tasks: list[str], active_fraction: float, seed: int
) -> tuple[MaskBank, list[MaskFile], dict[str, torch.Size]]:
    """A MaskBank over ``model`` holding one random mask file per task (seeds ``seed + 1 + i``)."""
    config = MaskConfig(targets=preset)
    shapes = {n: p.shape for n, p in model.named_parameters() if config.matches(n)}
    fingerprint = model_fingerprint(model)
    bank, files = MaskBank(model), []
    for i, task in enumerate(tasks):
        data, _ = encode_mask_file(
            _random_masks(shapes, active_fraction, seed + 1 + i), backbone=backbone, fingerprint=fingerprint, config=config
        )
        files.append(decode_mask_file(data))
        bank.add(task, files[-1])
    return bank, files, shapes


def _state_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def bank_mixed_throughput(
    backbone: str = "resnet_tiny",
    device: str = "cpu",
    batch: int = 64,
    task_counts: tuple[int, ...] = (2, 8, 32),
    active_fraction: float = 0.923,
    repeats: int = 5,
    seed: int = 0,
) -> dict[str, object]:
    """Mixed-task batches through one MaskBank against one merged model per task (issue 15).

    For each number of tasks ``n``, a batch of ``batch`` images whose samples are spread over
    ``n`` tasks (seeded shuffle) runs (a) through :meth:`MaskBank.run` (one switch per task) and
    (b) through ``n`` resident merged models, each on its own samples (no switch). Interleaved,
    medians; images/s of each and their ratio, the largest output difference, and the memory of
    one backbone + the bank (originals of the masked weights and 1 bit per weight per task)
    against ``n`` copies of the model.
    """
    from selfmask.storage.apply import merge_mask

    dev = torch.device(device)
    info = backbone_info(backbone)
    torch.manual_seed(seed)
    model = build_backbone(backbone).to(dev).eval()
    tasks = [f"t{i}" for i in range(max(task_counts))]
    bank, files, shapes = _bank_of_random_tasks(model, backbone, info.mask_preset, tasks, active_fraction, seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    merged = []
    for f in files:
        copy = build_backbone(backbone).to(dev).eval()
        copy.load_state_dict(base)
        merged.append(merge_mask(copy, f).eval())
    x = torch.randn(batch, 3, info.input_size, info.input_size, generator=torch.Generator().manual_seed(seed)).to(dev)
    model_bytes, rows = _state_bytes(model), []

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for n in task_counts:
        ids = (torch.arange(batch) % n)[torch.randperm(batch, generator=torch.Generator().manual_seed(seed + n))]
        groups = [(t, torch.nonzero(ids == t).flatten().to(dev)) for t in range(n) if bool((ids == t).any())]

        def mixed(ids=ids) -> torch.Tensor:
            return bank.run(x, ids)

        def per_task(groups=groups) -> torch.Tensor:
            out = None
            for t, index in groups:
                y = merged[t](x.index_select(0, index))
                out = y.new_empty((batch, *y.shape[1:])) if out is None else out
                out.index_copy_(0, index, y)
            return out

        with torch.no_grad():
            diff = (mixed() - per_task()).abs().max().item()  # also the warm-up
            times: dict[str, list[float]] = {"mixed": [], "per_task": []}
            for r in range(repeats):
                for name, fn in (("mixed", mixed), ("per_task", per_task))[:: 1 if r % 2 == 0 else -1]:
                    sync()
                    t0 = time.perf_counter()
                    fn()
                    sync()
                    times[name].append(time.perf_counter() - t0)
        mixed_s, per_task_s = statistics.median(times["mixed"]), statistics.median(times["per_task"])
        bank_bytes = model_bytes + bank.original_bytes() + n * bank.packed_bytes() // len(tasks)
        rows.append({
            "tasks": n,
            "mixed_images_per_s": batch / mixed_s,
            "merged_images_per_s": batch / per_task_s,
            "mixed_over_merged_time": mixed_s / per_task_s,
            "max_abs_diff": diff,
            "bank_bytes": bank_bytes,
            "merged_copies_bytes": n * model_bytes,
            "memory_ratio": bank_bytes / (n * model_bytes),
        })
    return {
        "backbone": backbone,
        "device": device,
        "batch": batch,
        "masked_weights": sum(s.numel() for s in shapes.values()),
        "active_fraction": active_fraction,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "rows": rows,
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
    bank, _, shapes = _bank_of_random_tasks(model, backbone, preset, ["a", "b"], active_fraction, seed)

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


__all__ = ["RESNET50_MASKED_WEIGHTS", "bank_mixed_throughput", "bank_switch_time", "mask_file_size"]
