"""Training-step cost of masked training relative to full fine-tuning (FFT).

Both variants train the same backbone on the same batch with SGD (momentum 0.9);
FFT updates every parameter, masked training updates only the scores. Step times
are measured side by side, interleaved in blocks, and compared by their medians,
so a noisy machine affects both alike. Peak memory is measured in a fresh
subprocess per variant (peak resident set size during training minus the resident
size just before the first step) on the CPU, and with
``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from dataclasses import dataclass

import torch
from torch import nn

from selfmask.backbones import backbone_info, build_backbone
from selfmask.bench.timing import interleaved_medians
from selfmask.masking import MaskConfig, mask_model
from selfmask.masking.model import enable_fast_masks


@dataclass
class _Variant:
    model: nn.Module
    head: nn.Module
    opt: torch.optim.Optimizer


def _make_variant(
    backbone: str, masked: bool, num_classes: int, device: torch.device, seed: int, fast_masks: bool = False,
    channels_last: bool = False,
) -> _Variant:
    torch.manual_seed(seed)
    model = build_backbone(backbone).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    info = backbone_info(backbone)
    head = nn.Linear(info.embed_dim, num_classes).to(device)
    if masked:
        mask_model(model, MaskConfig(targets=info.mask_preset))
        if fast_masks:
            enable_fast_masks(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            [{"params": params, "lr": 50.0}, {"params": head.parameters(), "lr": 0.1}], momentum=0.9
        )
    else:
        opt = torch.optim.SGD(list(model.parameters()) + list(head.parameters()), lr=0.01, momentum=0.9)
    model.train()
    return _Variant(model, head, opt)


def _step(v: _Variant, x: torch.Tensor, y: torch.Tensor, amp: str | None = None) -> None:
    v.opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
        loss = nn.functional.cross_entropy(v.head(v.model(x)), y)
    loss.backward()
    v.opt.step()


def step_time_ratio(
    backbone: str = "resnet_tiny",
    batch: int = 64,
    repeats: int = 7,
    steps_per_block: int = 3,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, float | int | str]:
    """Median step time of masked training / FFT, interleaved in one process."""
    dev = torch.device(device)
    info = backbone_info(backbone)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, info.input_size, info.input_size, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    variants = {"masked": _make_variant(backbone, True, 10, dev, seed), "fft": _make_variant(backbone, False, 10, dev, seed)}
    med = _interleaved_medians(variants, x, y, repeats, steps_per_block, None)
    return {
        "backbone": backbone,
        "batch": batch,
        "device": device,
        "threads": torch.get_num_threads(),
        "masked_step_s": med["masked"],
        "fft_step_s": med["fft"],
        "time_ratio": med["masked"] / med["fft"],
        "repeats": repeats,
    }


def _peak_memory_child(backbone: str, masked: bool, batch: int, steps: int, device: str) -> int:
    """Run in a subprocess: bytes of peak memory growth over ``steps`` training steps."""
    dev = torch.device(device)
    info = backbone_info(backbone)
    v = _make_variant(backbone, masked, 10, dev, 0)
    x = torch.randn(batch, 3, info.input_size, info.input_size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        for _ in range(steps):
            _step(v, x, y)
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    import resource

    base = _current_rss()
    for _ in range(steps):
        _step(v, x, y)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - base


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_memory_ratio(backbone: str = "resnet_tiny", batch: int = 64, steps: int = 3, device: str = "cpu") -> dict:
    """Peak memory growth of masked training / FFT, each in a fresh subprocess."""
    out: dict[str, float | int | str] = {"backbone": backbone, "batch": batch, "device": device}
    for masked in (True, False):
        code = (
            "import json,sys; from selfmask.bench.step import _peak_memory_child as f; "
            f"print(json.dumps(f({backbone!r}, {masked}, {batch}, {steps}, {device!r})))"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"peak-memory subprocess failed: {res.stderr.strip()[-2000:]}")
        out["masked_peak_bytes" if masked else "fft_peak_bytes"] = int(json.loads(res.stdout.strip().splitlines()[-1]))
    out["memory_ratio"] = out["masked_peak_bytes"] / out["fft_peak_bytes"]  # type: ignore[operator]
    return out


def _interleaved_medians(
    variants: dict[str, _Variant], x: torch.Tensor, y: torch.Tensor, repeats: int, steps_per_block: int,
    amp: str | None,
) -> dict[str, float]:
    """Median seconds per step of each variant, timed in interleaved blocks (rotating order)."""
    fns = {k: functools.partial(_step, v, x, y, amp) for k, v in variants.items()}
    return interleaved_medians(fns, repeats, steps_per_block, x.device)[0]


def fast_path_step_ratios(
    backbone: str = "resnet_tiny",
    batch: int = 64,
    repeats: int = 9,
    steps_per_block: int = 3,
    device: str = "cpu",
    amp: str | None = None,
    channels_last: bool = False,
    seed: int = 0,
) -> dict[str, float | int | str | None]:
    """Masked / FFT step-time ratios with and without the fast mask path, side by side.

    Three variants of the same backbone, batch and optimiser settings are timed in
    one process, interleaved in blocks with a rotating order: FFT, masked training
    on the plain path (masks and alphas per layer per forward pass) and masked
    training on the fast path (:func:`~selfmask.masking.model.enable_fast_masks`).
    ``amp="bf16"`` runs the forward passes under bfloat16 autocast and
    ``channels_last`` stores weights and inputs channels-last, for all three alike.
    """
    if amp not in (None, "bf16"):
        raise ValueError(f"fast_path_step_ratios: amp must be None or 'bf16', got {amp!r}")
    dev = torch.device(device)
    info = backbone_info(backbone)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, info.input_size, info.input_size, generator=g).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    variants = {
        "fft": _make_variant(backbone, False, 10, dev, seed, channels_last=channels_last),
        "masked_plain": _make_variant(backbone, True, 10, dev, seed, channels_last=channels_last),
        "masked_fast": _make_variant(backbone, True, 10, dev, seed, fast_masks=True, channels_last=channels_last),
    }
    med = _interleaved_medians(variants, x, y, repeats, steps_per_block, amp)
    return {
        "backbone": backbone,
        "batch": batch,
        "device": device,
        "amp": amp,
        "channels_last": channels_last,
        "threads": torch.get_num_threads(),
        "fft_step_s": med["fft"],
        "masked_plain_step_s": med["masked_plain"],
        "masked_fast_step_s": med["masked_fast"],
        "plain_time_ratio": med["masked_plain"] / med["fft"],
        "fast_time_ratio": med["masked_fast"] / med["fft"],
        "repeats": repeats,
    }
