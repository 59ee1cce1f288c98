"""``selfmask bench --suite gpu``: every GPU figure in one prepared run, with time caps.

GPU time comes rarely and minutes at a time, so one command measures everything the
GPU targets need (BENCHMARKS.md), each figure side by side in one process:

* ``parity``: our ResNet-18/50 and ViT-B/32 against torchvision, timm and open_clip
  (whichever are installed; a missing library is a skipped row with the reason). The
  reference model's random weights go through our real loading chain into our model;
  the relative error of the features is ``||ours - ref|| / ||ref||`` in float32 (TF32 off).
* ``step``: masked / FFT step time of ResNet-50 (batch 64, 224 px) and ViT-B/32: FFT, our
  masked step (fast path) and the authors' approach (:mod:`selfmask.bench.authors`)
  interleaved, in fp32, bf16 and (ResNet) bf16 channels-last.
* ``memory``: peak memory of one training step of the same three variants (CUDA: the
  allocator's peak over building the variant and three steps; CPU: peak resident set
  growth, in a fresh process per variant).
* ``compile``: FFT and our masked step under ``torch.compile``, interleaved, with the
  compile time of each (masks on the per-layer path, as training uses under ``--compile``).
* ``swav``: SwAV images/s with 2x224 + 6x96 crops, self-masking against the plain step
  (every weight trained) on the same crops.
* ``bank``: a MaskBank task switch against one weight copy, and inference images/s of a
  one-task stream against batches alternating between two tasks.
* ``knn``: weighted k-NN over a 50,000 x 2,048 bank.

Every section has a time cap (:data:`FULL` sums to 450 s, so the suite ends within 8
minutes on one H100/H200), and a section never gets more than what is left of that sum:
timing loops stop early (at least three rounds) and units not started in time are
skipped rows saying so; one section's (or one parity row's) failure is recorded and the
others still run. :data:`SMOKE` runs the very same code at tiny sizes on the CPU
(the CI test). Results go to ``suite.json`` and ``suite.md`` after every section.
"""

from __future__ import annotations

import functools
import gc
import importlib
import json
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfmask.backbones import backbone_info, build_backbone
from selfmask.backbones.loading import LoadReport, adapt_state_dict, load_into, strip_prefixes
from selfmask.bench.authors import authors_mask_model, authors_scores
from selfmask.bench.knn import knn_time
from selfmask.bench.step import _make_variant, _step, _Variant
from selfmask.bench.storage import bank_switch_time
from selfmask.bench.timing import interleaved_medians, sync
from selfmask.io import atomic_write_json, atomic_write_text
from selfmask.masking import MaskConfig

#: In running order: compile (the longest, least predictable unit) last, so it cannot crowd out the rest.
SECTIONS = ("parity", "step", "memory", "swav", "bank", "knn", "compile")
VARIANTS = ("fft", "selfmask", "authors")


@dataclass(frozen=True)
class SuiteSizes:
    """Sizes and time caps of one run of the suite (:data:`FULL` or :data:`SMOKE`)."""

    resnet: str
    vit: str
    batch: int
    repeats: int
    calls_per_block: int
    parity_batch: int
    swav_backbone: str
    swav_batch: int
    swav_large: int
    swav_small: int
    bank_backbone: str
    bank_batch: int
    knn_bank: int
    knn_dim: int
    knn_queries: int
    compile_backend: str
    caps: dict[str, float] = field(default_factory=dict)

    @property
    def total_cap(self) -> float:
        return sum(self.caps.values())


FULL = SuiteSizes(
    resnet="resnet50", vit="vit_b_32_clip", batch=64, repeats=7, calls_per_block=3, parity_batch=8,
    swav_backbone="resnet50", swav_batch=64, swav_large=224, swav_small=96, bank_backbone="resnet50", bank_batch=64,
    knn_bank=50_000, knn_dim=2_048, knn_queries=10_000, compile_backend="inductor",
    caps={"parity": 30, "step": 120, "memory": 60, "swav": 50, "bank": 40, "knn": 30, "compile": 120},
)
SMOKE = SuiteSizes(
    resnet="resnet_tiny", vit="vit_tiny_clip", batch=4, repeats=3, calls_per_block=1, parity_batch=2,
    swav_backbone="resnet_tiny", swav_batch=4, swav_large=32, swav_small=16, bank_backbone="resnet_tiny", bank_batch=4,
    knn_bank=2_000, knn_dim=64, knn_queries=200, compile_backend="aot_eager",
    caps={"parity": 20, "step": 25, "memory": 20, "swav": 10, "bank": 8, "knn": 7, "compile": 15},
)

#: Reference models per backbone of ours: (library, constructor of a randomly initialised model
#: whose state dict our loader reads, function giving the features to compare).
_Ref = tuple[str, Callable[[], nn.Module], Callable[[nn.Module, torch.Tensor], torch.Tensor]]


def _call(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _torchvision(name: str) -> nn.Module:
    model = getattr(importlib.import_module("torchvision.models"), name)()
    return model


def _torchvision_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fc, model.fc = model.fc, nn.Identity()
    try:
        return model(x)
    finally:
        model.fc = fc


def _timm(name: str, **kw: Any) -> nn.Module:
    model = importlib.import_module("timm").create_model(name, pretrained=False, **kw)
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and head.bias is not None:  # CLIP's projection has no bias: timm's is zero
        nn.init.zeros_(head.bias)
    return model


def _open_clip(name: str) -> nn.Module:
    return importlib.import_module("open_clip").create_model(name, pretrained=None).visual


REFERENCES: dict[str, list[_Ref]] = {
    "resnet18": [
        ("torchvision", functools.partial(_torchvision, "resnet18"), _torchvision_features),
        ("timm", functools.partial(_timm, "resnet18", num_classes=0), _call),
    ],
    "resnet50": [
        ("torchvision", functools.partial(_torchvision, "resnet50"), _torchvision_features),
        ("timm", functools.partial(_timm, "resnet50", num_classes=0), _call),
    ],
    "vit_b_32_clip": [("open_clip", functools.partial(_open_clip, "ViT-B-32-quickgelu"), _call)],
    "vit_b_32_clip_gelu": [
        ("open_clip", functools.partial(_open_clip, "ViT-B-32"), _call),
        ("timm", functools.partial(_timm, "vit_base_patch32_clip_224", num_classes=512), _call),
    ],
}


#: The embedding the references return, where our backbone offers several (open_clip's ``visual`` and
#: timm's CLIP ViT with ``num_classes=512`` return the projected one).
PARITY_EMBEDDING = {"vit_b_32_clip": "projected", "vit_b_32_clip_gelu": "projected"}


def _installed(library: str) -> bool:
    try:
        importlib.import_module(library)
    except Exception:  # noqa: BLE001 - a broken install is "not usable" as much as a missing one
        return False
    return True


class _Cap:
    """The deadline of one section (``time.monotonic()`` seconds)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.deadline

    def skip_row(self, **what: Any) -> dict[str, Any]:
        return {**what, "skipped": f"time cap ({self.seconds:.0f} s) reached before this started"}


@contextmanager
def _exact_float32() -> Iterator[None]:
    """TF32 off for convolutions and matrix products (restored after)."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``||ours - ref|| / ||ref||`` in float64."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-30))


def parity_row(
    ours_name: str, reference: nn.Module, features: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    x: torch.Tensor, library: str, embedding: str | None = None,
) -> dict[str, Any]:
    """Load ``reference``'s weights into our ``ours_name`` (returning ``embedding``) through our loader;
    compare features on ``x``."""
    device = x.device
    reference = reference.to(device).eval()
    ours = build_backbone(ours_name, embedding).to(device).eval()
    source = f"{library} state dict"
    report = LoadReport(path=source, backbone=ours_name)
    state = strip_prefixes(dict(reference.state_dict()), set(ours.state_dict()), report)
    state = adapt_state_dict(state, ours, source, report)
    load_into(ours, state, source)
    with torch.no_grad(), _exact_float32():
        got, want = ours(x), features(reference, x)
    return {
        "ours": ours_name, "embedding": embedding or "default", "library": library, "shape": list(got.shape), "relative_error": relative_error(got, want),
        "max_abs_error": float((got.double() - want.double()).abs().max()), "dropped": sorted(report.dropped),
    }


def section_parity(sizes: SuiteSizes, device: torch.device, cap: _Cap) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for ours_name, refs in REFERENCES.items():
        size = backbone_info(ours_name).input_size
        x = torch.randn(sizes.parity_batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
        for library, make, features in refs:
            if not _installed(library):
                rows.append({"ours": ours_name, "library": library, "skipped": f"{library} is not installed"})
                continue
            if cap.passed():
                rows.append(cap.skip_row(ours=ours_name, library=library))
                continue
            torch.manual_seed(0)
            try:
                rows.append(parity_row(ours_name, make(), features, x, library, PARITY_EMBEDDING.get(ours_name)))
            except Exception as exc:  # noqa: BLE001 - one library's failure must not hide the others' figures
                rows.append({"ours": ours_name, "library": library, "error": f"{type(exc).__name__}: {exc}"})
    return rows


def build_variant(
    kind: str, backbone: str, device: torch.device, channels_last: bool = False, seed: int = 0, fast_masks: bool = True
) -> _Variant:
    """``fft`` (every weight trained), ``selfmask`` (our masks; the fast path unless ``fast_masks=False``)
    or ``authors`` (the baseline)."""
    if kind not in VARIANTS:
        raise ValueError(f"unknown variant {kind!r}; expected one of {VARIANTS}")
    if kind != "authors":
        return _make_variant(backbone, kind == "selfmask", 10, device, seed, fast_masks=fast_masks,
                             channels_last=channels_last)
    torch.manual_seed(seed)
    info = backbone_info(backbone)
    model = build_backbone(backbone).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    authors_mask_model(model, MaskConfig.preset(info.mask_preset))
    head = nn.Linear(info.embed_dim, 10).to(device)
    opt = torch.optim.SGD([{"params": list(authors_scores(model).values()), "lr": 50.0}, {"params": head.parameters(), "lr": 0.1}],
                          momentum=0.9)
    model.train()
    return _Variant(model, head, opt)


def _batch(backbone: str, batch: int, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    size = backbone_info(backbone).input_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (batch,), generator=g).to(device)


def _step_configs(sizes: SuiteSizes) -> list[tuple[str, str | None, bool]]:
    """(backbone, amp, channels_last) of the step and memory sections."""
    return [(sizes.resnet, None, False), (sizes.resnet, "bf16", False), (sizes.resnet, "bf16", True),
            (sizes.vit, None, False), (sizes.vit, "bf16", False)]


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratio_figures(prefix: str, per_variant: dict[str, float]) -> dict[str, float]:
    out = {f"{prefix}_{k}": v for k, v in per_variant.items()}
    out["selfmask_over_fft"] = per_variant["selfmask"] / per_variant["fft"]
    out["authors_over_fft"] = per_variant["authors"] / per_variant["fft"]
    out["selfmask_over_authors"] = per_variant["selfmask"] / per_variant["authors"]
    return out


def section_step(sizes: SuiteSizes, device: torch.device, cap: _Cap) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for backbone, amp, channels_last in _step_configs(sizes):
        what = {"backbone": backbone, "batch": sizes.batch, "precision": amp or "fp32", "channels_last": channels_last}
        if cap.passed():
            rows.append(cap.skip_row(**what))
            continue
        x, y = _batch(backbone, sizes.batch, device, channels_last)
        variants = {k: build_variant(k, backbone, device, channels_last) for k in VARIANTS}
        fns = {k: functools.partial(_step, v, x, y, amp) for k, v in variants.items()}
        med, done = interleaved_medians(fns, sizes.repeats, sizes.calls_per_block, device, cap.deadline)
        row = {**what, **_ratio_figures("step_s", med), "repeats": done}
        row["selfmask_images_per_s"] = sizes.batch / med["selfmask"]
        rows.append(row)
        del variants, fns
        _free(device)
    return rows


def variant_peak_bytes(
    kind: str, backbone: str, batch: int, amp: str | None, channels_last: bool, steps: int, device: str
) -> int:
    """Peak memory of building variant ``kind`` and training it ``steps`` steps (call in a fresh process on a CPU).

    CUDA: ``max_memory_allocated`` above what was allocated before. CPU: peak resident set
    size above the resident size before the variant was built.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        _free(dev)
        sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        from selfmask.bench.step import _current_rss

        base = _current_rss()
    v = build_variant(kind, backbone, dev, channels_last)
    x, y = _batch(backbone, batch, dev, channels_last)
    for _ in range(steps):
        _step(v, x, y, amp)
    sync(dev)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated(dev) - base
        del v, x, y
        _free(dev)
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def _peak_bytes(kind: str, backbone: str, batch: int, amp: str | None, channels_last: bool, device: torch.device) -> int:
    args = (kind, backbone, batch, amp, channels_last, 3, str(device))
    if device.type == "cuda":  # the allocator's own peak: measured in this process
        return variant_peak_bytes(*args)
    code = f"import json; from selfmask.bench.suite import variant_peak_bytes as f; print(json.dumps(f(*{args!r})))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed: {res.stderr.strip()[-2000:]}")
    return int(json.loads(res.stdout.strip().splitlines()[-1]))


def section_memory(sizes: SuiteSizes, device: torch.device, cap: _Cap) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for backbone, amp, channels_last in _step_configs(sizes):
        if channels_last:
            continue
        what = {"backbone": backbone, "batch": sizes.batch, "precision": amp or "fp32"}
        peaks: dict[str, float] = {}
        for kind in VARIANTS:  # one variant at a time: on a CPU each is a fresh process
            if cap.passed():
                break
            peaks[kind] = float(_peak_bytes(kind, backbone, sizes.batch, amp, False, device))
        if len(peaks) == len(VARIANTS):
            rows.append({**what, **_ratio_figures("peak_bytes", peaks)})
        else:
            rows.append(cap.skip_row(**what, **{f"peak_bytes_{k}": v for k, v in peaks.items()}))
    return rows


def section_compile(sizes: SuiteSizes, device: torch.device, cap: _Cap) -> list[dict[str, Any]]:
    amp = "bf16" if device.type == "cuda" else None
    backbone = sizes.resnet
    what = {"backbone": backbone, "batch": sizes.batch, "precision": amp or "fp32", "backend": sizes.compile_backend,
            "mask_path": "per layer"}
    x, y = _batch(backbone, sizes.batch, device, False)
    variants: dict[str, _Variant] = {}
    row: dict[str, Any] = dict(what)
    torch._dynamo.reset()
    for kind in ("fft", "selfmask"):
        # compiling cannot be interrupted: start only if a compile as long as the last one still fits
        if cap.passed() or time.monotonic() + 1.2 * row.get("compile_s_fft", 0.0) > cap.deadline:
            return [cap.skip_row(**what, variant=kind)]
        v = build_variant(kind, backbone, device, fast_masks=False)  # as training does under --compile
        v.model = torch.compile(v.model, backend=sizes.compile_backend)  # type: ignore[assignment]
        t0 = time.perf_counter()
        _step(v, x, y, amp)
        _step(v, x, y, amp)
        sync(device)
        row[f"compile_s_{kind}"] = time.perf_counter() - t0
        variants[kind] = v
    fns = {k: functools.partial(_step, v, x, y, amp) for k, v in variants.items()}
    med, done = interleaved_medians(fns, sizes.repeats, sizes.calls_per_block, device, cap.deadline)
    row.update({f"step_s_{k}": s for k, s in med.items()})
    row["selfmask_over_fft"] = med["selfmask"] / med["fft"]
    row["repeats"] = done
    del variants, fns
    torch._dynamo.reset()
    _free(device)
    return [row]


def section_swav(sizes: SuiteSizes, device: torch.device, cap: _Cap) -> list[dict[str, Any]]:
    from selfmask.bench.augment import swav_step_fn
    from selfmask.data.multicrop import MultiCrop

    info = backbone_info(sizes.swav_backbone)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (sizes.swav_batch, 3, sizes.swav_large, sizes.swav_large), generator=g,
                           dtype=torch.uint8).to(device)
    multicrop = MultiCrop.for_input_size(sizes.swav_large, seed=0, small_size=sizes.swav_small, n_large=2, n_small=6,
                                         mean=info.mean, std=info.std)
    crops = multicrop(images)
    fns = {
        "plain": swav_step_fn(sizes.swav_backbone, crops, device, 0, masked=False),
        "selfmask": swav_step_fn(sizes.swav_backbone, crops, device, 0, masked=True, fast_masks=True),
    }
    med, done = interleaved_medians(fns, sizes.repeats, sizes.calls_per_block, device, cap.deadline)
    del fns, crops
    _free(device)
    return [{
        "backbone": sizes.swav_backbone, "batch": sizes.swav_batch,
        "crops": f"2x{sizes.swav_large} + 6x{sizes.swav_small}", "plain_images_per_s": sizes.swav_batch / med["plain"],
        "selfmask_images_per_s": sizes.swav_batch / med["selfmask"], "selfmask_over_plain": med["plain"] / med["selfmask"],
        "repeats": done,
    }]


def section_bank(sizes: SuiteSizes, device: torch.device, cap: _Cap) -> list[dict[str, Any]]:
    res = bank_switch_time(sizes.bank_backbone, device=str(device), repeats=sizes.repeats * 2,
                           batch=sizes.bank_batch, deadline=cap.deadline)
    _free(device)
    return [res]


def section_knn(sizes: SuiteSizes, device: torch.device, cap: _Cap) -> list[dict[str, Any]]:
    res = knn_time(bank=sizes.knn_bank, dim=sizes.knn_dim, queries=sizes.knn_queries, device=str(device))
    _free(device)
    return [res]


_SECTION_FNS: dict[str, Callable[[SuiteSizes, torch.device, _Cap], list[dict[str, Any]]]] = {
    "parity": section_parity, "step": section_step, "memory": section_memory, "compile": section_compile,
    "swav": section_swav, "bank": section_bank, "knn": section_knn,
}


def machine_record(device: torch.device) -> dict[str, Any]:
    import os

    record: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    return record


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    """The suite's results as Markdown: the machine, then one table per section."""
    m = result["machine"]
    lines = [f"# selfmask bench --suite gpu{' --smoke' if result['smoke'] else ''}", "",
             f"{m['date']}; {m['device']}; torch {m['torch']}; {m['threads']} CPU threads; {m['platform']}; "
             f"load average {m['load_average']}", ""]
    for name in result["sections"]:
        sec = result[name]
        lines += [f"## {name} ({sec['seconds']:.1f} s of a {sec['cap_s']:.0f} s cap)", ""]
        if "error" in sec:
            lines += [f"error: {sec['error']}", ""]
            continue
        rows = sec["rows"]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def row_line(name: str, row: dict[str, Any]) -> str:
    return f"[{name}] " + ", ".join(f"{k}={_cell(v)}" for k, v in row.items())


def run_suite(
    sizes: SuiteSizes, device: str, sections: list[str] | tuple[str, ...] = SECTIONS, out: Path | None = None,
    smoke: bool = False, echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``sections`` in order; print each row as it comes; write ``out/suite.{json,md}`` after each section.

    A section that raises is recorded (``error``) and the next one runs.
    """
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(map(repr, unknown))}; sections: {', '.join(SECTIONS)}")
    dev = torch.device(device)
    result: dict[str, Any] = {"machine": machine_record(dev), "smoke": smoke, "sizes": asdict(sizes),
                              "sections": []}
    suite_deadline = time.monotonic() + sizes.total_cap
    for name in sections:
        cap = _Cap(max(0.0, min(sizes.caps[name], suite_deadline - time.monotonic())))
        t0 = time.perf_counter()
        sec: dict[str, Any] = {"cap_s": cap.seconds}
        try:
            sec["rows"] = _SECTION_FNS[name](sizes, dev, cap)
            for row in sec["rows"]:
                echo(row_line(name, row))
        except Exception as exc:  # noqa: BLE001 - one failed section must not cost the rest of a GPU session
            sec["error"] = f"{type(exc).__name__}: {exc}"
            sec["traceback"] = traceback.format_exc()
            echo(f"[{name}] error: {sec['error']}")
            _free(dev)
        sec["seconds"] = time.perf_counter() - t0
        result[name] = sec
        result["sections"].append(name)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(out / "suite.json", result)
            atomic_write_text(out / "suite.md", markdown(result))
    return result


__all__ = ["FULL", "REFERENCES", "SECTIONS", "SMOKE", "SuiteSizes", "build_variant", "markdown", "parity_row",
           "relative_error", "run_suite", "variant_peak_bytes"]
