"""Put the masks of a mask file on a model, and bake them into plain weights.

:func:`apply_mask` checks that the model's base weights are the ones the masks were
trained on (sha256 fingerprint), masks a plain backbone with the file's
:class:`~selfmask.masking.MaskConfig` when needed, and sets the scores so that every
mask equals the stored one bit for bit. :func:`merge_mask` then bakes
``theta * M / alpha`` into ordinary parameters (no selfmask code needed to use them).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from selfmask.errors import SelfmaskError
from selfmask.fingerprint import fingerprint_tensors
from selfmask.masking.layer import topk_count
from selfmask.masking.model import (
    base_state_dict,
    current_masks,
    is_masked,
    iter_score_masks,
    mask_config,
    mask_model,
    merge_masks,
)
from selfmask.storage.maskfile import MaskFile, load_mask


def check_fingerprint(
    actual: str,
    mask: MaskFile,
    *,
    force: bool = False,
    what: str = "apply_mask",
    base_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Refuse base weights with fingerprint ``actual`` unless they are the mask's (warn with ``force``).

    ``base_state`` (the model's ``base_state_dict``) lets files written by older versions
    still apply: those took the fingerprint with the trained buffers they store
    (``buffer.*``, BatchNorm statistics of ``bn="train"`` runs) in place of the base ones. When those buffers
    explain the whole difference, the file is accepted with a note (a warning).
    """
    if actual == mask.fingerprint:
        return
    if base_state is not None and legacy_fingerprint(base_state, mask) == mask.fingerprint:
        warnings.warn(
            f"{what}: note: this mask file was written by an older selfmask whose fingerprint included the "
            "trained BatchNorm statistics it stores; with those statistics the model's base weights match, "
            "so it is applied (re-pack the run to write a current file)",
            stacklevel=3,
        )
        return
    message = (
        f"{what}: the mask was trained on backbone {mask.backbone!r} with base fingerprint "
        f"{mask.fingerprint[:16]}..., but the model's base weights have fingerprint {actual[:16]}... "
        "(different weights or a different backbone)"
    )
    if not force:
        raise SelfmaskError(message + "; pass force=True (--force) to apply it anyway")
    warnings.warn(message + "; applying anyway (force=True)", stacklevel=3)


def legacy_fingerprint(base_state: Mapping[str, torch.Tensor], mask: MaskFile) -> str | None:
    """The fingerprint older files recorded: ``base_state`` with the file's ``buffer.*`` extras substituted."""
    buffers = {k[len(BUFFER_PREFIX):]: v for k, v in mask.extra.items() if k.startswith(BUFFER_PREFIX)}
    if not buffers or not set(buffers) <= set(base_state):
        return None
    if any(tuple(base_state[k].shape) != tuple(v.shape) or base_state[k].dtype != v.dtype for k, v in buffers.items()):
        return None
    return fingerprint_tensors({**base_state, **buffers})


def check_names_and_shapes(targets: dict[str, torch.Size], mask: MaskFile, what: str) -> None:
    """The file's tensors must be exactly ``targets`` (name -> shape); read from the index, nothing decoded."""
    shapes = {t.name: t.shape for t in mask.tensors}
    missing = sorted(set(targets) - set(shapes))
    unexpected = sorted(set(shapes) - set(targets))
    if missing or unexpected:
        raise SelfmaskError(
            f"{what}: the mask file's tensors do not match the model: masked in the model but not in the file "
            f"{missing[:6]}{' ...' if len(missing) > 6 else ''}, in the file but not masked in the model "
            f"{unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}"
        )
    for name, shape in targets.items():
        if tuple(shape) != shapes[name]:
            raise SelfmaskError(
                f"{what}: tensor {name!r} has shape {list(shape)} in the model but {list(shapes[name])} in the mask file"
            )


def _scores_for(mask: torch.Tensor, mode: str, threshold: float, dtype: torch.dtype) -> torch.Tensor:
    """Scores whose mask (threshold or top-k) is exactly ``mask``."""
    if mode == "topk":
        return mask.to(dtype)  # the k ones are strictly above the zeros
    delta = max(1.0, abs(threshold))
    active = torch.tensor(threshold + delta, dtype=dtype)
    inactive = torch.tensor(threshold - delta, dtype=dtype)
    return torch.where(mask, active, inactive)


def apply_mask(model: nn.Module, mask: MaskFile | str | Path, *, force: bool = False) -> nn.Module:
    """Set the masks of ``model`` to the stored ones, in place, and return it.

    ``model`` is a plain backbone (it is masked with the file's ``MaskConfig``) or a
    model already masked with the same targets. Its base fingerprint must match the
    file's unless ``force=True`` (then a warning; but masks coded given the base weights
    are refused on other weights even then). Names and shapes must match exactly.
    Afterwards ``current_masks(model)`` equals ``mask.masks`` bit for bit.
    """
    if not isinstance(mask, MaskFile):
        mask = load_mask(mask)
    base_state = base_state_dict(model)
    fingerprint = fingerprint_tensors(base_state)
    check_fingerprint(fingerprint, mask, force=force, base_state=base_state)
    if is_masked(model):
        config = mask_config(model)
        if config.mode != mask.config.mode:
            raise SelfmaskError(
                f"apply_mask: the model is masked in mode {config.mode!r}, the file in {mask.config.mode!r}"
            )
        for key in ("split_fused", "topk_count"):  # what changes the masked weights of the same scores
            ours, theirs = getattr(config, key), getattr(mask.config, key)
            if ours != theirs:
                raise SelfmaskError(
                    f"apply_mask: the model is masked with {key}={ours!r}, the file with {key}={theirs!r}; "
                    "apply the file to a plain backbone"
                )
        targets = {name: pm.scores.shape for name, _m, _t, pm in iter_score_masks(model)}
    else:
        targets = {n: p.shape for n, p in model.named_parameters() if mask.config.matches(n)}
    check_names_and_shapes(targets, mask, "apply_mask")  # before the model is changed in any way
    mask.decode_with_base(base_state, fingerprint)  # masks coded given the base (none: no-op)
    if mask.config.mode == "topk":
        for info in mask.tensors:
            stored = mask.masks[info.name]
            k = topk_count(stored.numel() // info.parts, float(mask.config.keep_ratio or 1.0), mask.config.topk_count)
            counts = stored.reshape(info.parts, -1).sum(dim=1).tolist()
            if counts != [k] * info.parts:
                each = " in each of its parts" if info.parts > 1 else ""
                raise SelfmaskError(
                    f"apply_mask: tensor {info.name!r} has {'/'.join(map(str, counts))} active entries; top-k with "
                    f"keep_ratio={mask.config.keep_ratio} keeps {k}{each}"
                )
    buffers = check_buffers(model, mask, "apply_mask")
    if not is_masked(model):
        try:
            mask_model(model, mask.config)
        except ValueError as exc:
            raise SelfmaskError(f"apply_mask: cannot mask the model with the file's MaskConfig: {exc}") from None
    with torch.no_grad():
        for name, _module, _tensor, pm in iter_score_masks(model):
            stored = mask.masks[name].to(pm.scores.device)
            pm.scores.copy_(_scores_for(stored, pm.mode, pm.threshold, pm.scores.dtype))
        for name, value in buffers.items():
            name_buffer = dict(model.named_buffers())[name]
            name_buffer.copy_(value.to(name_buffer.device))
    for name, got in current_masks(model).items():
        if not torch.equal(got.cpu(), mask.masks[name]):  # pragma: no cover - guards the construction above
            raise SelfmaskError(f"apply_mask: tensor {name!r}: could not reproduce the stored mask")
    return model


BUFFER_PREFIX = "buffer."


def changed_buffers(model: nn.Module, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``buffer.<name>`` extras of a mask file: the buffers of ``model`` that training changed from ``base``.

    BatchNorm running statistics keep updating during mask training (``bn="train"``) and are part
    of the adapted model; ``base`` is the untrained backbone's ``named_buffers()``. CPU copies.
    """
    return {f"{BUFFER_PREFIX}{k}": v.detach().cpu().clone() for k, v in model.named_buffers()
            if k in base and not torch.equal(v.detach().cpu(), base[k].cpu())}


def check_buffers(model: nn.Module, mask: MaskFile, what: str) -> dict[str, torch.Tensor]:
    """The file's adapted buffers (``buffer.*`` extras), checked against the model's names and shapes."""
    live = dict(model.named_buffers())
    out = {}
    for key, value in mask.extra.items():
        if not key.startswith(BUFFER_PREFIX):
            continue
        name = key[len(BUFFER_PREFIX):]
        if name not in live:
            raise SelfmaskError(f"{what}: the file stores buffer {name!r}, which the model does not have")
        if tuple(live[name].shape) != tuple(value.shape) or live[name].dtype != value.dtype:
            raise SelfmaskError(
                f"{what}: buffer {name!r} is {value.dtype} {list(value.shape)} in the file, "
                f"{live[name].dtype} {list(live[name].shape)} in the model"
            )
        out[name] = value
    return out


def merge_mask(model: nn.Module, mask: MaskFile | str | Path, *, force: bool = False) -> nn.Module:
    """Apply ``mask`` and bake ``theta * M / alpha`` into plain parameters (see ``merge_masks``).

    The result is an ordinary model whose ``state_dict()`` loads into a fresh
    backbone without any selfmask code and gives the masked model's outputs.
    """
    return merge_masks(apply_mask(model, mask, force=force))


__all__ = ["apply_mask", "changed_buffers", "check_buffers", "check_fingerprint", "check_names_and_shapes", "legacy_fingerprint", "merge_mask"]
