"""The step/epoch loop under :mod:`selfmask.training.engine` (one loop for every objective).

It owns what every run needs and nothing objective-specific: the epoch order, the
optimiser step, the schedule, NaN/Inf checks, per-epoch metrics, progress (a tqdm bar
on a terminal, one plain line per epoch otherwise), checkpoints (atomic, every
``checkpoint_every`` steps and at each epoch end) and resuming from them, clean stops
on SIGINT/SIGTERM (at a step boundary, after writing a checkpoint), and the run
folder's ``status.json`` / ``metrics.jsonl`` (:class:`RunGuard`).

A checkpoint holds the state of every module, the optimiser and scheduler, the
random generators, the epoch/batch/step counters, the partial epoch sums and the
metrics so far; it is written with ``torch.save`` and read back with
``torch.load(weights_only=True)``. A run killed at any point and resumed ends with
the same masks, bit for bit, as an uninterrupted run on the CPU.
"""

from __future__ import annotations

import io
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfmask.errors import SelfmaskError
from selfmask.io import atomic_write_bytes
from selfmask.training.distributed import SINGLE, DistContext, all_gather_states, all_reduce_sum, local_slice
from selfmask.training.identity import first_difference

log = logging.getLogger("selfmask.train")

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1

#: ``step_fn(indices, epoch, step) -> (loss, sums)``: forward pass for one batch (in a
#: distributed run: this process's slice of the global batch); ``sums``
#: are per-epoch accumulators (e.g. ``{"loss": loss * n, "seen": n, "correct": k}``).
StepFn = Callable[[torch.Tensor, int, int], tuple[torch.Tensor, dict[str, float]]]


class TrainingDiverged(SelfmaskError):
    """The loss became NaN/Inf."""


class StopRequested(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; the run stopped cleanly at a step boundary."""


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch: a function of (seed, epoch) alone, so a resumed run sees the same order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def steps_per_epoch(num_items: int, batch_size: int, drop_last: bool = True) -> int:
    """Optimiser steps per epoch (a batch larger than the data is the whole data)."""
    bs = min(batch_size, num_items)
    return max(1, num_items // bs) if drop_last else math.ceil(num_items / bs)


@dataclass
class LoopSpec:
    """What the engine needs to run ``epochs`` over ``num_items`` items."""

    num_items: int
    batch_size: int
    epochs: int
    seed: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    modules: dict[str, nn.Module]  # everything whose state a checkpoint must hold
    set_train_mode: Callable[[], None]
    epoch_row: Callable[[dict[str, float], int], dict[str, Any]]  # (sums of the epoch, 1-based epoch) -> metrics row
    after_step: Callable[[int], None] | None = None  # after every optimiser step, with its 0-based number
    extra_state: dict[str, torch.Tensor] = field(default_factory=dict)  # tensors restored in place
    checkpoint_every: int = 0
    desc: str = "train"
    progress: bool = True
    dist: DistContext = SINGLE  # distributed runs: each process steps on its slice of every global batch
    #: the data order of an epoch (default :func:`epoch_permutation`); a custom order drawn from
    #: ``generator`` is kept in mid-epoch checkpoints, so a resumed run continues the same order
    order: Callable[[int], torch.Tensor] | None = None
    drop_last: bool = True  # drop the last partial batch (BatchNorm); False: a short last batch

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_items, self.batch_size, self.drop_last)

    def permutation(self, epoch: int) -> torch.Tensor:
        return epoch_permutation(self.num_items, self.seed, epoch) if self.order is None else self.order(epoch)


class RunGuard:
    """Keeps ``status.json`` truthful when training stops early (Ctrl-C, divergence)."""

    def __init__(self, run: Any, total_epochs: int) -> None:
        self.run, self.total_epochs = run, total_epochs
        self.epoch = self.step = 0

    def __enter__(self) -> RunGuard:
        if self.run is not None:
            self.run.attach_log(log)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.run is None:
            return
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.run.set_status("interrupted", epoch=self.epoch, step=self.step, total_epochs=self.total_epochs)
        elif exc_type is not None and issubclass(exc_type, TrainingDiverged):
            self.run.set_status("failed", reason=str(exc), epoch=self.epoch, step=self.step)
        elif exc_type is not None:
            self.run.set_status("failed", reason=f"{exc_type.__name__}: {exc}", epoch=self.epoch, step=self.step)
        self.run.detach_log(log)

    def end_epoch(self, row: dict[str, Any]) -> None:
        self.epoch, self.step = row["epoch"], row["step"]
        if self.run is not None:
            self.run.append_metrics(row)
            self.run.set_status("running", epoch=self.epoch, total_epochs=self.total_epochs)


class _Signals:
    """SIGINT/SIGTERM set a flag while training (main thread only); restored on exit."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested is not None:  # a second Ctrl-C: stop at once
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():  # whatever was there before: SIG_IGN, SIG_DFL or a handler
            if old is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(sig, old)


def run_epochs(
    spec: LoopSpec,
    step_fn: StepFn,
    *,
    run: Any = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    config_fingerprint: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Train; returns ``(history, steps)``. ``run`` is a RunFolder (or None for no files).

    Distributed (``spec.dist``): every process runs this with the same spec; each steps
    on its slice of the global batch, the loss check and stop requests are decided
    over all processes (one small all-reduce per step), epoch sums are summed over
    processes, and only rank 0 writes files. Every process reads a checkpoint to resume.
    """
    ctx = spec.dist
    writer = run if ctx.is_main else None
    steps_per_epoch = spec.steps_per_epoch
    bs = min(spec.batch_size, spec.num_items)
    epoch, batch, step = 0, 0, 0
    sums: dict[str, float] = {}
    history: list[dict[str, Any]] = []
    perm: torch.Tensor | None = None  # a custom order of a checkpointed, unfinished epoch
    if resume:
        if run is None:
            raise SelfmaskError("resume needs a run folder")
        epoch, batch, step, sums, history, perm = load_checkpoint(run.file(CHECKPOINT), spec, config_fingerprint)
        if writer is not None:
            writer.restore_metrics(history)
        log.info("resumed %s at epoch %d, batch %d (step %d)", run.path, epoch + 1, batch + 1, step)
    with RunGuard(writer, spec.epochs) as guard, _Signals() as signals:
        guard.epoch, guard.step = epoch, step
        while epoch < spec.epochs:
            spec.set_train_mode()
            if perm is None or batch == 0:
                perm = spec.permutation(epoch)
            t0 = time.perf_counter()
            desc = f"{spec.desc} epoch {epoch + 1}/{spec.epochs}"
            bar = _progress(steps_per_epoch, desc, spec.progress, batch)
            while batch < steps_per_epoch:
                loss, batch_sums = step_fn(local_slice(perm[batch * bs : (batch + 1) * bs], ctx), epoch, step)
                stop = signals.requested
                shown_loss = loss
                if ctx.enabled:  # decide together: a divergence or a stop on one process stops all
                    shared = all_reduce_sum(torch.stack([loss.detach().float(), loss.new_tensor(float(bool(stop)))]), ctx)
                    shown_loss = shared[0] / ctx.world_size
                    if shared[1] > 0 and not stop:
                        stop = "a stop request on another process"
                if not torch.isfinite(shown_loss):
                    raise TrainingDiverged(
                        f"loss became {shown_loss.item()} at step {step} (epoch {epoch + 1}, batch {batch + 1}); "
                        "training stopped, the last checkpoint is kept. Lower the learning rate or check the data."
                    )
                spec.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                spec.optimizer.step()
                if spec.after_step is not None:
                    spec.after_step(step)
                spec.scheduler.step()
                step += 1
                batch += 1
                for k, v in batch_sums.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                if bar is not None:
                    bar.update(1)
                    if batch % 10 == 1 or batch == steps_per_epoch:
                        el = time.perf_counter() - t0
                        bar.set_postfix(
                            loss=f"{shown_loss.item():.3f}",
                            img_s=f"{sums.get('seen', 0) * ctx.world_size / max(el, 1e-9):.0f}",
                        )
                guard.step = step
                if not ctx.enabled:
                    stop = signals.requested  # one process: also a signal that arrived during this step
                if run is not None and batch < steps_per_epoch and (
                    stop or (spec.checkpoint_every and step % spec.checkpoint_every == 0)
                ):
                    save_checkpoint(run.file(CHECKPOINT), spec, epoch, batch, step, sums, history, config_fingerprint,
                                    perm)
                if stop:
                    if bar is not None:
                        bar.close()
                    raise StopRequested(f"stopped by {stop} at step {step}")
            if bar is not None:
                bar.close()
            seconds = time.perf_counter() - t0
            sums = _sum_over_processes(sums, ctx)
            row = {"epoch": epoch + 1, "step": step, **spec.epoch_row(sums, epoch + 1)}
            row["lr"] = spec.optimizer.param_groups[0]["lr"]
            row["seconds"] = seconds
            row["images_per_second"] = sums.get("seen", 0.0) / max(seconds, 1e-9)
            history.append(row)
            log.info("epoch %d/%d %s", epoch + 1, spec.epochs, {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
            if spec.progress and bar is None:
                _epoch_line(desc, row)
            guard.end_epoch(row)
            epoch, batch, sums, perm = epoch + 1, 0, {}, None
            if run is not None:
                save_checkpoint(run.file(CHECKPOINT), spec, epoch, batch, step, sums, history, config_fingerprint)
            if on_epoch is not None:
                on_epoch(row)
            end_stop = _stop_requested_anywhere(signals.requested, ctx)
            if end_stop:
                raise StopRequested(f"stopped by {end_stop} at step {step}")
    return history, step


def _stop_requested_anywhere(requested: str | None, ctx: DistContext) -> str | None:
    """This process's stop request, or, distributed, any process's (every process agrees)."""
    if not ctx.enabled:
        return requested
    anywhere = all_reduce_sum(torch.tensor([1.0 if requested else 0.0], device=ctx.device), ctx)
    return requested or ("a stop request on another process" if float(anywhere) > 0 else None)


def _sum_over_processes(sums: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Per-epoch sums of every process added up (the same keys on every process)."""
    if not ctx.enabled or not sums:
        return sums
    keys = sorted(sums)
    total = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=ctx.device), ctx)
    return {k: float(v) for k, v in zip(keys, total.tolist())}


def save_checkpoint(
    path: Path,
    spec: LoopSpec,
    epoch: int,
    batch: int,
    step: int,
    sums: dict[str, float],
    history: list[dict[str, Any]],
    config_fingerprint: dict[str, Any] | None,
    order: torch.Tensor | None = None,
) -> None:
    """Write a checkpoint (rank 0 writes; in a distributed run every process must call this).

    ``order``: the current epoch's data order, kept when ``spec.order`` is custom and the epoch
    is unfinished (the default order is a function of the seed and epoch alone).
    """
    ctx = spec.dist
    rng = {"generator": spec.generator.get_state(), "torch": torch.get_rng_state()}
    rng_ranks = None
    if ctx.enabled:  # each process draws its own augmentation: keep every process's generators
        gens = all_gather_states(rng["generator"], ctx)
        torches = all_gather_states(rng["torch"], ctx)
        rng_ranks = [{"generator": g, "torch": t} for g, t in zip(gens, torches)]
    if not ctx.is_main:
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "batch": batch,
        "step": step,
        "sums": dict(sums),
        "history": history,
        "config": config_fingerprint or {},
        "modules": {name: m.state_dict() for name, m in spec.modules.items()},
        "extra_state": {k: v.detach().clone() for k, v in spec.extra_state.items()},
        "optimizer": spec.optimizer.state_dict(),
        "scheduler": spec.scheduler.state_dict(),
        "rng": rng,
        "world_size": ctx.world_size,
    }
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    if spec.order is not None and batch > 0 and order is not None:
        state["order"] = order.detach().cpu().clone()
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(
    path: Path, spec: LoopSpec, config_fingerprint: dict[str, Any] | None
) -> tuple[int, int, int, dict[str, float], list[dict[str, Any]], torch.Tensor | None]:
    """Restore ``spec``'s modules, optimiser, schedule and generators from ``path``.

    Returns ``(epoch, batch, step, sums, history, order)``; ``order`` is the saved data order
    of an unfinished epoch under a custom ``spec.order`` (else ``None``).
    """
    if not path.is_file():
        raise SelfmaskError(f"cannot resume: {path} does not exist (the run wrote no checkpoint yet)")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unreadable checkpoint is one clear error)
        raise SelfmaskError(f"cannot resume: {path} is unreadable or not a selfmask checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SelfmaskError(f"cannot resume: {path} has an unknown checkpoint format")
    if config_fingerprint is not None:
        recorded = state.get("config")
        difference = first_difference(recorded if isinstance(recorded, dict) else {}, config_fingerprint)
        if difference:
            raise SelfmaskError(
                f"cannot resume: {path} was written with different settings than this run's config.json: {difference}"
            )
    for name, module in spec.modules.items():
        if name not in state["modules"]:
            raise SelfmaskError(f"cannot resume: {path} lacks the state of {name!r}")
        module.load_state_dict(state["modules"][name])
    for k, t in spec.extra_state.items():
        t.copy_(state["extra_state"][k])
    spec.optimizer.load_state_dict(state["optimizer"])
    spec.scheduler.load_state_dict(state["scheduler"])
    ctx = spec.dist
    written_by = int(state.get("world_size", 1))
    if written_by != ctx.world_size:
        raise SelfmaskError(
            f"cannot resume: {path} was written by a run of {written_by} process(es), this run has {ctx.world_size}; "
            "resume with the same number of processes"
        )
    rng = state["rng_ranks"][ctx.rank] if ctx.enabled else state["rng"]
    spec.generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    order = state.get("order") if spec.order is not None else None
    return state["epoch"], state["batch"], state["step"], dict(state["sums"]), list(state["history"]), order


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):  # noqa: ANN202
    """A tqdm bar when progress is wanted and stderr is a terminal; ``None`` otherwise.

    In a log file (``make demo > log``, a batch job) tqdm's redraws are noise: there the loop
    writes one plain line per epoch instead (:func:`_epoch_line`).
    """
    if not enabled or not _stderr_is_terminal():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def _stderr_is_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def _epoch_line(desc: str, row: dict[str, Any]) -> None:
    """One plain progress line per epoch on stderr, unless the per-epoch log line already goes there."""
    if _logged_to_console(log):
        return
    shown = [f"{k} {row[k]:.4f}" for k in ("loss", "train_accuracy", "fraction_active", "online_knn")
             if isinstance(row.get(k), float)]
    shown.append(f"{row['images_per_second']:.0f} img/s, {row['seconds']:.1f} s")
    print(f"{desc}: {', '.join(shown)}", file=sys.stderr, flush=True)


def _logged_to_console(logger: logging.Logger) -> bool:
    """Whether an INFO record of ``logger`` reaches a handler writing to stderr or stdout."""
    if not logger.isEnabledFor(logging.INFO):
        return False
    current: logging.Logger | None = logger
    while current is not None:
        for h in current.handlers:
            if (isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stderr, sys.stdout)
                    and h.level <= logging.INFO):
                return True
        current = current.parent if current.propagate else None
    return False
