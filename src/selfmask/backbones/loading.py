"""Load backbone weights from a local file: no network, no arbitrary unpickling, clear errors.

The pipeline (in the manner of timm's ``_builder``/``_helpers``) is a chain of small
pure steps, each of which can be used on its own:

1. :func:`read_checkpoint` reads ``.safetensors`` (``safetensors``) or a torch file
   (``.pth``, ``.pt``, ``.pth.tar``, ``.tar``, ``.bin``, ``.ckpt``) with
   ``torch.load(weights_only=True)`` (plus ``argparse.Namespace`` training arguments);
   a file that needs real unpickling, a
   TorchScript archive, a truncated or corrupted file is a :class:`SelfmaskError`
   naming it.
2. :func:`unwrap_checkpoint` descends into ``state_dict`` / ``model`` / ``teacher``
   containers (training checkpoints of torchvision's references, SwAV, DINO) and
   keeps the tensors.
3. :func:`strip_prefixes` removes wrapper prefixes present on every key
   (``module.`` of DistributedDataParallel, ``_orig_mod.`` of ``torch.compile``) and
   selects the ``backbone.`` part of a DINO checkpoint or the ``visual.`` image tower
   of a full CLIP / open_clip checkpoint, dropping the rest (heads, text tower) with a note.
4. :func:`adapt_state_dict` maps timm's ViT names onto OpenAI CLIP's (for CLIP ViTs)
   and drops classification and projection heads (``fc.``, SwAV's
   ``projection_head.`` / ``prototypes.``) with a note.
5. :func:`load_into` checks every remaining key and shape against the model and loads;
   any missing key, unexpected key or shape mismatch is an error listing them.

:func:`create_backbone` runs the chain; :func:`backbone_fingerprint` is the sha256 of
the loaded base weights that mask files record.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from selfmask.backbones.external import external_info, is_external
from selfmask.backbones.registry import backbone_info, build_backbone
from selfmask.backbones.vit import CLIPVisionTransformer
from selfmask.errors import SelfmaskError

logger = logging.getLogger(__name__)

#: File endings read with ``torch.load(weights_only=True)``.
TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar", ".tar", ".bin", ".ckpt")
#: File endings read with ``safetensors``.
SAFETENSORS_SUFFIXES = (".safetensors",)
#: Containers a training checkpoint may wrap its state dict in, tried in this order.
CONTAINER_KEYS = ("state_dict", "model", "teacher", "model_state", "module")
#: Prefixes removed when every key carries them.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: Prefixes that select the backbone part of a larger checkpoint (the rest is dropped).
SELECTOR_PREFIXES = {"backbone.": "non-backbone keys (heads)", "visual.": "CLIP text tower and logit scale"}
#: Heads that are not part of an embedding backbone: dropped with a note.
HEAD_PREFIXES = {
    "fc.": "classification head",
    "_fc.": "classification head",
    "projection_head.": "SwAV projection head",
    "prototypes.": "SwAV prototypes",
}
#: Classes allowed in a weights-only torch file besides tensors and containers: the training
#: arguments that DINO's and torchvision's reference scripts store next to the weights
#: (an attribute bag; its values must themselves be plain data).
SAFE_CHECKPOINT_GLOBALS = (argparse.Namespace,)
_MAX_LISTED = 8


@dataclass
class LoadReport:
    """What loading a checkpoint did: for logs and for the record of a run."""

    path: str
    backbone: str
    layout: str = "native"
    containers: list[str] = field(default_factory=list)
    stripped_prefixes: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # reason -> keys
    fingerprint: str = ""

    def notes(self) -> list[str]:
        out = []
        if self.containers:
            out.append(f"unwrapped checkpoint container(s) {self.containers}")
        if self.stripped_prefixes:
            out.append(f"stripped key prefix(es) {self.stripped_prefixes}")
        if self.layout != "native":
            out.append(f"mapped {self.layout} parameter names onto the backbone's")
        for reason, keys in self.dropped.items():
            out.append(f"dropped {len(keys)} key(s) of the {reason}: {_short_list(keys)}")
        return out


def _short_list(keys: list[str] | tuple[str, ...]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _suffix_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    raise SelfmaskError(
        f"weights file {str(path)!r}: unsupported file type; expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}"
    )


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def read_checkpoint(path: str | Path) -> object:
    """The object stored in a local weights file, read without arbitrary unpickling.

    Raises:
        SelfmaskError: the path does not exist or is not a file, the type is not
            supported, the file is truncated or corrupted, it holds Python objects that
            ``torch.load(weights_only=True)`` refuses, or it is a TorchScript archive.
    """
    path = Path(path)
    if not path.exists():
        raise SelfmaskError(f"weights file {str(path)!r} does not exist")
    if not path.is_file():
        raise SelfmaskError(f"weights file {str(path)!r} is not a file")
    kind = _suffix_kind(path)
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise SelfmaskError(
                f"weights file {str(path)!r} is not a readable safetensors file (truncated or corrupted?): {e}"
            ) from None
    if _is_torchscript(path):
        raise SelfmaskError(
            f"weights file {str(path)!r} is a TorchScript archive (e.g. OpenAI CLIP's download), which cannot be "
            "read without executing its code; on a machine you trust, save its weights with "
            "`safetensors.torch.save_file(torch.jit.load(path).state_dict(), 'clip.safetensors')` and load that"
        )
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(list(SAFE_CHECKPOINT_GLOBALS)):
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = unpickling_detail(e)
        raise SelfmaskError(
            f"weights file {str(path)!r} holds Python objects other than tensors and plain containers, which are "
            f"not unpickled for safety ({detail}); save its state dict (tensors only) instead"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError, TypeError, AttributeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SelfmaskError(
            f"weights file {str(path)!r} could not be read (truncated or corrupted?): {type(e).__name__}: {first}"
        ) from None


def unpickling_detail(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that names the offending global (not its generic preamble)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if ("global" in ln.lower() or ln.startswith("Trying to")) and "weights_only" not in ln]
    detail = named[0] if named else (lines[0] if lines else type(exc).__name__)
    return detail.split(". Please use")[0].removeprefix("WeightsUnpickler error: ").rstrip(".")  # not: allowlist it


def unwrap_checkpoint(obj: object, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat ``name -> tensor`` state dict inside ``obj`` and the containers descended into.

    Non-tensor entries beside the tensors (an epoch counter, a config) are ignored.
    """
    containers: list[str] = []
    while isinstance(obj, Mapping):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        containers.append(inner)
        obj = obj[inner]
    if not isinstance(obj, Mapping):
        raise SelfmaskError(
            f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}"
        )
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        keys = _short_list([str(k) for k in obj])
        raise SelfmaskError(f"{source}: no tensors found (top-level keys: {keys or 'none'})")
    return state, containers


def strip_prefixes(
    state: dict[str, torch.Tensor], model_keys: set[str], report: LoadReport | None = None
) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes and select the backbone / image-tower part of ``state``."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in model_keys):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                if report is not None:
                    report.stripped_prefixes.append(prefix)
                changed = True
        for prefix, reason in SELECTOR_PREFIXES.items():
            if any(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in model_keys):
                dropped = sorted(k for k in state if not k.startswith(prefix))
                state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                if report is not None:
                    report.stripped_prefixes.append(prefix)
                    if dropped:
                        report.dropped.setdefault(reason, []).extend(dropped)
                changed = True
    return state


# --- timm ViT (vit_base_patch32_clip_224) -> OpenAI CLIP names -------------------------------------

_TIMM_BLOCK_RENAMES = (
    ("norm1.", "ln_1."),
    ("norm2.", "ln_2."),
    ("attn.qkv.weight", "attn.in_proj_weight"),
    ("attn.qkv.bias", "attn.in_proj_bias"),
    ("attn.proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
)
_TIMM_TOP_RENAMES = (("patch_embed.proj.", "conv1."), ("norm_pre.", "ln_pre."), ("norm.", "ln_post."))
_TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def is_timm_vit_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for timm ``VisionTransformer`` names (``patch_embed.proj``, ``blocks.N``)."""
    return "patch_embed.proj.weight" in state or any(_TIMM_BLOCK.fullmatch(k) for k in state)


def timm_vit_to_openai_clip(state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename a timm CLIP ViT state dict (``vit_base_patch32_clip_224``) to OpenAI CLIP's names.

    ``cls_token (1, 1, W)`` -> ``class_embedding (W,)``, ``pos_embed (1, L, W)`` ->
    ``positional_embedding (L, W)``, ``head.weight (D, W)`` -> ``proj (W, D)`` (transposed;
    timm stores CLIP's projection as a linear head with a zero bias, which must be zero).
    Names that have no rule pass through unchanged (and are reported as unexpected later).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = _TIMM_BLOCK.fullmatch(k)
        if m:
            rest = m.group(2)
            for old, new in _TIMM_BLOCK_RENAMES:
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            out[f"transformer.resblocks.{m.group(1)}.{rest}"] = v
        elif k == "cls_token" and v.dim() == 3:
            out["class_embedding"] = v.reshape(v.shape[-1])
        elif k == "pos_embed" and v.dim() == 3:
            out["positional_embedding"] = v[0]
        elif k == "head.weight" and v.dim() == 2:
            out["proj"] = v.t().contiguous()
        elif k == "head.bias":
            if bool(v.detach().ne(0).any()):
                raise SelfmaskError(
                    f"{source}: 'head.bias' is not zero; CLIP's projection has no bias, so this timm head "
                    "(a fine-tuned classifier?) cannot be loaded as the CLIP projection"
                )
        else:
            for old, new in _TIMM_TOP_RENAMES:
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            out[k] = v
    return out


def adapt_state_dict(
    state: dict[str, torch.Tensor], model: nn.Module, source: str = "checkpoint", report: LoadReport | None = None
) -> dict[str, torch.Tensor]:
    """Map foreign names onto the model's and drop head keys the model does not have (or had removed)."""
    model_keys = set(model.state_dict())
    if isinstance(model, CLIPVisionTransformer) and is_timm_vit_layout(state):
        state = timm_vit_to_openai_clip(state, source)
        if report is not None:
            report.layout = "timm"
    removed_head = set(getattr(model, "removed_head_keys", ()))  # a model whose classifier was removed
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        reason = next((r for p, r in HEAD_PREFIXES.items() if k.startswith(p) and k not in model_keys), None)
        if reason is None and k in removed_head and k not in model_keys:
            reason = "removed classifier"
        if reason is None:
            out[k] = v
        elif report is not None:
            report.dropped.setdefault(reason, []).append(k)
    return out


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` after checking every key and shape.

    A missing BatchNorm ``num_batches_tracked`` counter (old torchvision files) is not
    an error: the model keeps its own. Tensors are cast to the model's floating-point dtypes;
    an integer or bool tensor where the model holds floats is an error.

    Raises:
        SelfmaskError: listing the missing keys, the unexpected keys and the shape
            mismatches (key, checkpoint shape, model shape).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        name = getattr(model, "backbone_name", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_short_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_short_list(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_short_list(mismatched)}")
        raise SelfmaskError(f"{source}: does not fit backbone {name!r} (wrong architecture?): " + "; ".join(parts))
    not_float = [
        f"{k} ({str(state[k].dtype).removeprefix('torch.')})"
        for k, v in expected.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    if not_float:  # integer or bool weights cast to float would train near chance, without a word
        raise SelfmaskError(
            f"{source}: {len(not_float)} tensor(s) that must hold floating-point numbers hold another type "
            f"(quantised or corrupted weights?): {_short_list(not_float)}"
        )
    full = dict(state)
    for k, v in expected.items():
        full.setdefault(k, v)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as e:  # e.g. a dtype that cannot be copied
        raise SelfmaskError(f"{source}: could not be loaded: {str(e).splitlines()[0]}") from None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """The flat ``name -> tensor`` state dict in a local weights file (containers unwrapped)."""
    state, _ = unwrap_checkpoint(read_checkpoint(path), str(path))
    return state


def backbone_fingerprint(model: nn.Module) -> str:
    """sha256 of the backbone's base weights (masked or not); mask files record it."""
    from selfmask.fingerprint import model_fingerprint

    return model_fingerprint(model)


def load_backbone_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a local checkpoint into ``model`` in place (see the module docstring)."""
    source = str(path)
    report = LoadReport(path=source, backbone=getattr(model, "backbone_name", type(model).__name__))
    state, report.containers = unwrap_checkpoint(read_checkpoint(path), source)
    state = strip_prefixes(state, set(model.state_dict()), report)
    state = adapt_state_dict(state, model, source, report)
    load_into(model, state, source)
    report.fingerprint = backbone_fingerprint(model)
    for note in report.notes():
        logger.info("%s: %s", source, note)
    return report


def create_backbone(name: str, weights: str | Path | None = None, embedding: str | None = None) -> nn.Module:
    """Build backbone ``name``; with ``weights``, load them from a local file.

    Without ``weights``, a backbone whose :class:`BackboneInfo` names default weights
    (``efficientnet_lite0``: the ImageNet checkpoint of an installed package) loads those;
    the others keep their random initialisation (:func:`build_backbone`).
    ``embedding`` picks the output of a backbone that offers several (CLIP ViTs:
    ``"class_token"``, the default, or ``"projected"``); ``None`` is the backbone's default.

    The load report (what was unwrapped, mapped and dropped, and the weights'
    fingerprint) is attached as ``model.weights_report``.
    """
    model = build_backbone(name, embedding)
    if is_external(name):
        external_info(name, model)  # cache the embedding size and preset from this build (no second one)
    default = backbone_info(name).default_weights
    if weights is None and default is not None:
        weights = default()
    if weights is not None:
        model.weights_report = load_backbone_weights(model, weights)  # type: ignore[assignment]
    return model
