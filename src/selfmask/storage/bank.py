"""Many tasks on one backbone: switch a model's weights between stored masks in place.

A :class:`MaskBank` owns a plain backbone. It keeps one copy of the original
weights of every tensor any of its masks touches, and each task's masks packed at
one bit per weight (``numpy.packbits`` layout) on the model's device. Activating a
task writes ``theta * M / alpha`` straight into the model's parameters, with the
same numbers as the masked forward (``(theta * M) * (1 / sqrt(mean(M)))``, bit for
bit), so the outputs equal those of the masked model; deactivating copies the originals back,
bit for bit. Memory: the model, one copy of the masked originals, and ``n / 8``
bytes per task.

Example::

    bank = MaskBank(create_backbone("resnet50", "swav.safetensors"))
    bank.add("cifar10", "cifar10.mask")
    bank.add("dtd", "dtd.mask")
    bank.activate("cifar10"); logits = head_c10(bank.model(x))
    bank.activate("dtd");     ...
    bank.deactivate()         # the pretrained backbone again

Mixed-task batches: :meth:`MaskBank.run` takes one task per sample, runs each task's samples
with that task active (one switch per task in the batch) and returns the outputs in the
batch's order, equal to running each task's merged model on its own samples::

    bank.model.eval()
    features = bank.run(x, ["cifar10", "dtd", "cifar10", ...])   # or integer ids into bank.tasks
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from selfmask.errors import SelfmaskError
from selfmask.fingerprint import model_fingerprint
from selfmask.masking.layer import _inv_alpha
from selfmask.masking.model import is_masked
from selfmask.storage.apply import check_buffers, check_fingerprint, check_names_and_shapes
from selfmask.storage.codecs import pack_bits
from selfmask.storage.maskfile import MaskFile, load_mask


def unpack_bits_torch(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`~selfmask.storage.codecs.pack_bits` on any device: flat bool of ``numel``."""
    if packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.numpy(), count=numel, bitorder="little").view(np.bool_))
    return unpack_bits_shifts(packed, numel)


def unpack_bits_shifts(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """:func:`unpack_bits_torch` with tensor shifts only (the path used on GPUs)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1)
    return bits.view(-1)[:numel].view(torch.bool)


@dataclass
class _Task:
    packed: dict[str, torch.Tensor]  # name -> uint8 packed bits on the model's device
    # name -> 1/sqrt(mean(M)) (or 1 without rescaling): 0-dim, or one per row of a tensor masked in parts
    inv_alpha: dict[str, torch.Tensor]
    extra: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]  # adapted buffers (BatchNorm statistics) by name


def _part_inv_alpha(mask: torch.Tensor, dtype: torch.dtype, parts: int) -> torch.Tensor:
    """``1/alpha`` of ``mask``: 0-dim, or (masked in parts) one per row, broadcastable to the mask."""
    inv_alpha = _inv_alpha(mask, dtype, parts)
    if parts == 1:
        return inv_alpha
    rows = inv_alpha.repeat_interleave(mask.shape[0] // parts)
    return rows.view(mask.shape[0], *([1] * (mask.dim() - 1)))


class MaskBank:
    """Several tasks' masks for one backbone, switched in place (see the module docstring).

    Args:
        model: a plain (unmasked) backbone; the bank changes its parameters in place.
        force: accept masks whose base fingerprint differs from the model's (with a warning).
    """

    def __init__(self, model: nn.Module, *, force: bool = False) -> None:
        if is_masked(model):
            raise SelfmaskError("MaskBank: expects a plain backbone; merge or rebuild the masked model first")
        self.model = model
        self.force = force
        self.fingerprint = model_fingerprint(model)
        self._params = dict(model.named_parameters())
        self._buffers = dict(model.named_buffers())
        self._originals: dict[str, torch.Tensor] = {}
        self._buffer_originals: dict[str, torch.Tensor] = {}
        self._tasks: dict[str, _Task] = {}
        self.active: str | None = None

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    def add(self, name: str, mask: MaskFile | str | Path) -> None:
        """Add a task from a mask file (checked against the backbone's fingerprint, names and shapes)."""
        if name in self._tasks:
            raise SelfmaskError(f"MaskBank: task {name!r} exists; remove it first")
        if not isinstance(mask, MaskFile):
            mask = load_mask(mask)
        # the fingerprint taken at construction: the model may hold a task's weights now
        check_fingerprint(self.fingerprint, mask, force=self.force, what=f"MaskBank.add({name!r})")
        targets = {n: p.shape for n, p in self._params.items() if mask.config.matches(n)}
        check_names_and_shapes(targets, mask, f"MaskBank.add({name!r})")
        mask.decode_with_base(self.base_weights(), self.fingerprint)  # masks coded given the base (none: no-op)
        buffers = check_buffers(self.model, mask, f"MaskBank.add({name!r})")
        for bname in buffers:
            if bname not in self._buffer_originals:
                self._buffer_originals[bname] = self._buffers[bname].detach().clone()
        packed, inv_alpha = {}, {}
        parts = {info.name: info.parts for info in mask.tensors}
        for tname, m in mask.masks.items():
            param = self._params[tname]
            if tname not in self._originals:
                # a tensor no task touched yet still holds its base value, whatever task is active
                self._originals[tname] = param.detach().clone()
            flat = m.reshape(-1)
            packed[tname] = torch.from_numpy(np.frombuffer(pack_bits(flat.numpy()), dtype=np.uint8).copy()).to(
                param.device
            )
            dtype = param.dtype
            ones = torch.ones((), dtype=dtype, device=param.device)
            rescale = mask.config.rescale
            inv_alpha[tname] = _part_inv_alpha(m.to(param.device), dtype, parts[tname]) if rescale else ones
        self._tasks[name] = _Task(packed, inv_alpha, dict(mask.extra), buffers)

    def base_weights(self) -> dict[str, torch.Tensor]:
        """The backbone's base parameters by name, whatever task is active (what masks are coded against)."""
        return {n: self._originals.get(n, p) for n, p in self._params.items()}

    def remove(self, name: str) -> None:
        self._require(name)
        if self.active == name:
            self.deactivate()
        del self._tasks[name]

    def extra(self, name: str) -> dict[str, torch.Tensor]:
        """The task's extra tensors (e.g. its head)."""
        return self._require(name).extra

    def activate(self, name: str) -> nn.Module:
        """Write task ``name``'s masked weights into the model, in place; returns the model."""
        task = self._require(name)
        with torch.no_grad():
            for tname, original in self._originals.items():
                param = self._params[tname]
                packed = task.packed.get(tname)
                if packed is None:
                    param.copy_(original)
                    continue
                mask = unpack_bits_torch(packed, original.numel()).view(original.shape)
                # theta * (M * inv_alpha) in one same-dtype multiply: bit for bit (theta * M) * inv_alpha,
                # since theta * 1 = theta and theta * 0 = (theta * 0) * inv_alpha = +-0 (sign of theta)
                inv_alpha = task.inv_alpha[tname]
                scale = torch.where(mask, inv_alpha, inv_alpha.new_zeros(()))
                torch.mul(original, scale, out=param)
            for bname, original in self._buffer_originals.items():
                self._buffers[bname].copy_(task.buffers.get(bname, original))
        self.active = name
        return self.model

    def deactivate(self) -> nn.Module:
        """Restore the original weights bit for bit; returns the model."""
        with torch.no_grad():
            for tname, original in self._originals.items():
                self._params[tname].copy_(original)
            for bname, original in self._buffer_originals.items():
                self._buffers[bname].copy_(original)
        self.active = None
        return self.model

    def run(self, x: torch.Tensor, tasks: Sequence[str] | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The model's outputs for a batch whose samples belong to different tasks, in the batch's order.

        Args:
            x: the batch (its first dimension indexes the samples).
            tasks: one task per sample: names, or integer ids (positions in :attr:`tasks`).

        Samples are grouped by task; each task is activated once (the active task, if it is
        in the batch, goes last, so nothing needs switching back) and its samples run
        together; outputs are scattered back. Afterwards the task that was active before is
        active again (or none). Put the model in evaluation mode: in training mode BatchNorm
        would normalise each task's group with that group's statistics.

        Raises:
            SelfmaskError: ``tasks`` does not have one entry per sample, or names a task (or id)
                not in the bank.
        """
        names = self._task_names(tasks, x.shape[0] if x.dim() else 0)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            groups.setdefault(name, []).append(i)
        previous = self.active
        order = sorted(groups, key=lambda n: n == previous)  # the active task last: no switch back
        out: torch.Tensor | None = None
        try:
            for name in order:
                if self.active != name:
                    self.activate(name)
                index = torch.tensor(groups[name], device=x.device)
                y = self.model(x.index_select(0, index))
                if out is None:
                    out = y.new_empty((len(names), *y.shape[1:]))
                out.index_copy_(0, index, y)
        finally:
            if self.active != previous and previous is not None:
                self.activate(previous)
            elif self.active != previous:
                self.deactivate()
        assert out is not None
        return out

    def _task_names(self, tasks: Sequence[str] | Sequence[int] | torch.Tensor, batch: int) -> list[str]:
        ids = tasks.tolist() if isinstance(tasks, torch.Tensor) else list(tasks)
        if len(ids) != batch or batch == 0:
            raise SelfmaskError(f"MaskBank.run: {len(ids)} task id(s) for a batch of {batch} sample(s); expected one per sample")
        known = self.tasks
        names = []
        for i, t in enumerate(ids):
            if isinstance(t, str) and t in self._tasks:
                names.append(t)
            elif isinstance(t, int) and not isinstance(t, bool) and 0 <= t < len(known):
                names.append(known[t])
            else:
                ids_hint = f"; or integer ids 0-{len(known) - 1}" if known else ""
                raise SelfmaskError(f"MaskBank.run: sample {i} has task {t!r}, which is not in the bank (tasks: {known}{ids_hint})")
        return names

    def packed_bytes(self) -> int:
        """Bytes held for all tasks' masks."""
        return sum(t.numel() for task in self._tasks.values() for t in task.packed.values())

    def original_bytes(self) -> int:
        """Bytes of the one copy of original weights."""
        return sum(t.numel() * t.element_size() for t in self._originals.values())

    def _require(self, name: str) -> _Task:
        if name not in self._tasks:
            raise SelfmaskError(f"MaskBank: unknown task {name!r}; tasks: {self.tasks}")
        return self._tasks[name]


__all__ = ["MaskBank", "unpack_bits_shifts", "unpack_bits_torch"]
