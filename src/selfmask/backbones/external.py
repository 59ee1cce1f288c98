"""Any model a user already has as a backbone: ``timm:NAME``, ``torchvision:NAME``, ``open_clip:NAME``,
``module.path:factory``.

A backbone *specification* with a colon names a model outside the registry:

* ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)``, head removed with timm's
  ``reset_classifier(0)``; input size, mean and std from its ``pretrained_cfg``.
* ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None)``, the final
  classifier replaced by ``nn.Identity``; input size, mean and std from the preprocessing
  of its default weights enum (read from the enum; nothing is downloaded).
* ``open_clip:NAME``: the image tower (``.visual``) of ``open_clip.create_model(NAME,
  pretrained=None)``; it has no classifier. Size, mean and std from the tower.
* ``module.path:factory`` (or ``path/to/file.py:factory``): ``factory()`` from the user's
  code, which must return an ``nn.Module``. Its head (timm's ``reset_classifier`` if it has
  one, else a final ``nn.Linear`` whose output is the model's output) is removed unless the
  module sets ``selfmask_keep_head = True``. Optional attributes ``input_size`` (pixels),
  ``mean``, ``std`` state its preprocessing (default 224 px, ImageNet statistics).

Weights never come from the network: the model is built with random weights (after
``torch.manual_seed``, by the caller) and ``create_backbone(spec, weights=FILE)`` loads a
local file through the usual loader, which drops the removed head's keys with a note.
The embedding size is found by a dry forward pass of two blank images in evaluation mode
(nothing, BatchNorm statistics included, is changed). The mask preset is
:func:`generic_targets`: every convolution and linear weight of the body and fused attention
input projections (``nn.MultiheadAttention.in_proj_weight``). Fused q/k/v weights named as
:data:`~selfmask.masking.config.FUSED_QKV` (``attn.qkv.weight``, ``attn.in_proj_weight``) are
masked as three parts, each with its own ``alpha`` and top-k count (``MaskConfig.split_fused``,
the default); a fused tensor under another name is masked as one tensor.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfmask.backbones.info import IMAGENET_MEAN, IMAGENET_STD, BackboneInfo
from selfmask.errors import SelfmaskError

#: ``prefix: (module to import, pip command)`` of the libraries a specification can name.
LIBRARIES = {
    "timm": ("timm", "pip install timm"),
    "torchvision": ("torchvision", "pip install torchvision"),
    "open_clip": ("open_clip", "pip install open_clip_torch"),
}
SPEC_HELP = "timm:NAME, torchvision:NAME, open_clip:NAME or module.path:factory"
#: Attribute a user's module sets to keep its final linear layer (an embedding projection, not a head).
KEEP_HEAD_ATTR = "selfmask_keep_head"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DRY_BATCH = 2

_INFO_CACHE: dict[str, BackboneInfo] = {}


def is_external(name: str) -> bool:
    """Whether ``name`` is a specification of a model outside the registry (it has a colon)."""
    return ":" in name


def parse_spec(spec: str) -> tuple[str, str]:
    """``(kind, target)``: kind is a library prefix or ``"factory"``; target its model name / ``module:attr``."""
    prefix, _, rest = spec.partition(":")
    if prefix in LIBRARIES:
        if not rest:
            raise SelfmaskError(f"backbone {spec!r}: no model name after {prefix + ':'!r}; expected {SPEC_HELP}")
        return prefix, rest
    module, _, attr = spec.rpartition(":")
    if not module or not _IDENT.fullmatch(attr) or not (
        module.endswith(".py") or all(_IDENT.fullmatch(part) for part in module.split("."))
    ):
        raise SelfmaskError(f"backbone {spec!r}: not a valid specification; expected {SPEC_HELP}")
    return "factory", spec


# --- building -----------------------------------------------------------------------------------


def _import_library(kind: str, spec: str) -> Any:
    module, pip = LIBRARIES[kind]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SelfmaskError(
            f"backbone {spec!r}: the library {module} is not installed or cannot be imported ({exc}); {pip}"
        ) from None


def _unknown_model(spec: str, library: str, name: str, known: Iterable[str]) -> SelfmaskError:
    close = difflib.get_close_matches(name, list(known), n=3)
    hint = f" (close matches: {', '.join(close)})" if close else ""
    return SelfmaskError(f"backbone {spec!r}: {library} has no model {name!r}{hint}")


def _call(spec: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run a library's or user's constructor; its failure becomes one line naming the specification."""
    try:
        return fn()
    except SelfmaskError:
        raise
    except Exception as exc:  # noqa: BLE001  (the user's / library's code: any error, reported in one line)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SelfmaskError(f"backbone {spec!r}: {what} failed: {type(exc).__name__}: {first}") from None


def _build_timm(spec: str, name: str) -> tuple[nn.Module, dict[str, Any]]:
    timm = _import_library("timm", spec)
    is_model = getattr(timm, "is_model", None)
    if is_model is not None and not is_model(name):
        raise _unknown_model(spec, "timm", name, timm.list_models())
    model = _call(spec, f"timm.create_model({name!r})", lambda: timm.create_model(name, pretrained=False))
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    return model, cfg


def _build_torchvision(spec: str, name: str) -> tuple[nn.Module, dict[str, Any]]:
    _import_library("torchvision", spec)
    models = importlib.import_module("torchvision.models")
    known = models.list_models()
    if name not in known:
        raise _unknown_model(spec, "torchvision", name, known)
    model = _call(spec, f"torchvision.models.get_model({name!r})", lambda: models.get_model(name, weights=None))
    cfg: dict[str, Any] = {}
    try:  # the preprocessing of the default weights: an attribute of the enum, no download
        preset = models.get_model_weights(name).DEFAULT.transforms()
        crop = preset.crop_size
        cfg = {"input_size": (3, *([crop[0]] * 2 if len(crop) == 1 else crop)), "mean": preset.mean, "std": preset.std}
    except Exception:  # noqa: BLE001  (a model without weights enum: ImageNet defaults)
        pass
    return model, cfg


def _build_open_clip(spec: str, name: str) -> tuple[nn.Module, dict[str, Any]]:
    open_clip = _import_library("open_clip", spec)
    known = open_clip.list_models()
    if name not in known:
        raise _unknown_model(spec, "open_clip", name, known)
    full = _call(spec, f"open_clip.create_model({name!r})", lambda: open_clip.create_model(name, pretrained=None))
    visual = full.visual
    size = getattr(visual, "image_size", 224)
    size = size if isinstance(size, int) else tuple(size)[0]
    cfg = {
        "input_size": (3, size, size),
        "mean": getattr(visual, "image_mean", None) or getattr(open_clip, "OPENAI_DATASET_MEAN", IMAGENET_MEAN),
        "std": getattr(visual, "image_std", None) or getattr(open_clip, "OPENAI_DATASET_STD", IMAGENET_STD),
    }
    visual.selfmask_keep_head = True  # the image tower ends in the CLIP projection, not a classifier
    return visual, cfg


def _load_user_module(spec: str, module: str) -> Any:
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise SelfmaskError(f"backbone {spec!r}: the file {str(path)!r} does not exist")
        name = "selfmask_user_" + re.sub(r"\W", "_", str(path.resolve()))
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise SelfmaskError(f"backbone {spec!r}: cannot import the file {str(path)!r}")
        mod = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = mod
        try:
            _call(spec, f"importing {str(path)!r}", lambda: loader_spec.loader.exec_module(mod))
        except SelfmaskError:
            del sys.modules[name]
            raise
        return mod
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise SelfmaskError(
                f"backbone {spec!r}: no module named {exc.name!r} (is its folder on PYTHONPATH?)"
            ) from None
        raise SelfmaskError(f"backbone {spec!r}: importing {module!r} failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (the user's module raised while importing)
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SelfmaskError(f"backbone {spec!r}: importing {module!r} failed: {type(exc).__name__}: {first}") from None


def _build_factory(spec: str, target: str) -> tuple[nn.Module, dict[str, Any]]:
    module, _, attr = target.rpartition(":")
    mod = _load_user_module(spec, module)
    factory = getattr(mod, attr, None)
    if factory is None:
        public = sorted(n for n in vars(mod) if not n.startswith("_") and callable(vars(mod)[n]))
        raise SelfmaskError(f"backbone {spec!r}: {module} has no attribute {attr!r} (callables: {', '.join(public[:8]) or 'none'})")
    if not callable(factory):
        raise SelfmaskError(f"backbone {spec!r}: {module}.{attr} is a {type(factory).__name__}, not a callable factory")
    model = _call(spec, f"{attr}()", factory)
    if not isinstance(model, nn.Module):
        raise SelfmaskError(f"backbone {spec!r}: {attr}() returned a {type(model).__name__}, not a torch.nn.Module")
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    size = getattr(model, "input_size", None)
    if size is not None:
        cfg["input_size"] = (3, size, size) if isinstance(size, int) else tuple(size)
    for key in ("mean", "std"):
        if getattr(model, key, None) is not None:
            cfg[key] = getattr(model, key)
    return model, cfg


_BUILDERS = {
    "timm": _build_timm,
    "torchvision": _build_torchvision,
    "open_clip": _build_open_clip,
    "factory": _build_factory,
}


# --- head removal, dry forward, preset ----------------------------------------------------------


def _input_size(spec: str, cfg: dict[str, Any]) -> int:
    size = cfg.get("input_size", 224)
    if isinstance(size, (tuple, list)):
        size = size[-1]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise SelfmaskError(f"backbone {spec!r}: input size must be a positive number of pixels, got {size!r}")
    return size


def _stats(spec: str, cfg: dict[str, Any], key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    value = cfg.get(key, default)
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise SelfmaskError(f"backbone {spec!r}: {key} must be three numbers (RGB), got {value!r}")
    return out  # type: ignore[return-value]


def dry_forward(model: nn.Module, size: int, spec: str = "model") -> torch.Tensor:
    """The model's output for two blank ``size`` px images, in evaluation mode, changing nothing."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    was_training = [m.training for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(_DRY_BATCH, 3, size, size, device=device, dtype=dtype))
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise SelfmaskError(
            f"backbone {spec!r}: a forward pass of {size} px images failed: {type(exc).__name__}: {first}"
        ) from None
    finally:
        for m, flag in zip(model.modules(), was_training):
            m.training = flag
    return out


def _embedding(out: Any, spec: str, size: int) -> int:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != _DRY_BATCH:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SelfmaskError(
            f"backbone {spec!r}: the model returns {shape} for {_DRY_BATCH} images of {size} px; expected "
            "(batch, embedding) vectors (pool the feature map in the model)"
        )
    return int(out.shape[1])


def remove_head(model: nn.Module, size: int, spec: str = "model") -> list[str]:
    """Remove the classifier of ``model`` in place; returns the state-dict keys it had.

    timm's ``reset_classifier(0)`` where the model has it; else the final ``nn.Linear``
    (in registration order) is replaced by ``nn.Identity`` if, and only if, its output is
    the model's output (checked by a dry forward). A module with ``selfmask_keep_head = True``
    is left alone.
    """
    if getattr(model, KEEP_HEAD_ATTR, False):
        return []
    before = set(model.state_dict())
    if callable(getattr(model, "reset_classifier", None)):
        _call(spec, "reset_classifier(0)", lambda: model.reset_classifier(0))
        return sorted(before - set(model.state_dict()))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n]
    if not linears:
        return []
    name, last = linears[-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        out = dry_forward(model, size, spec)
    finally:
        handle.remove()
    if not seen or seen[-1] is not out:
        return []
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return sorted(before - set(model.state_dict()))


def _compress(names: list[str], universe: list[str]) -> str:
    """A regex matching exactly ``names`` among ``universe``, numbered blocks written as ``\\d+`` where exact.

    Numeric name parts are generalised all at once, else one position at a time; a pattern is
    used only if it covers several names and matches no other name of ``universe``.
    """
    targets, left, parts = set(names), list(names), []
    split = {n: n.split(".") for n in names}
    depth = max(len(p) for p in split.values())
    for positions in [None, *([i] for i in range(depth))]:
        groups: dict[str, list[str]] = {}
        for n in left:
            pieces = split[n]
            chosen = [i for i, piece in enumerate(pieces) if piece.isdigit() and (positions is None or i in positions)]
            if chosen:
                key = r"\.".join(r"\d+" if i in chosen else re.escape(piece) for i, piece in enumerate(pieces))
                groups.setdefault(key, []).append(n)
        for pattern, members in groups.items():
            if len(members) > 1 and all(u in targets for u in universe if re.fullmatch(pattern, u)):
                parts.append(pattern)
                left = [n for n in left if n not in members]
    return "|".join(parts + [re.escape(n) for n in left])


def generic_targets(model: nn.Module) -> str:
    """The generic mask preset of ``model``: a regular expression over its parameter names.

    Matches the weight of every convolution (``nn.Conv1d/2d/3d`` and transposed) and every
    ``nn.Linear`` (attention output projections included), and the fused input projection
    of every ``nn.MultiheadAttention`` (``in_proj_weight``, or ``q/k/v_proj_weight``); not
    biases, normalisation layers, embeddings or tokens. Built from the names the model has,
    with numbered blocks written as ``\\d+`` where that matches nothing else.
    """
    params = [n for n, _ in model.named_parameters()]
    present = set(params)
    wanted = []
    for mname, m in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            wanted.append(prefix + "weight")
        elif isinstance(m, nn.MultiheadAttention):
            wanted += [prefix + t for t in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")]
    names = [n for n in dict.fromkeys(wanted) if n in present]
    if not names:
        raise SelfmaskError("the model has no convolution or linear weight to mask; pass --mask-targets")
    return _compress(names, params)


def build_external(spec: str) -> nn.Module:
    """Build the model ``spec`` names with random weights, its head removed (see the module docstring).

    The removed head's state-dict keys are kept as ``model.removed_head_keys`` (the loader
    drops them from checkpoints), the preprocessing as ``model.selfmask_cfg``.
    """
    kind, target = parse_spec(spec)
    model, cfg = _BUILDERS[kind](spec, target)
    size = _input_size(spec, cfg)
    model.removed_head_keys = remove_head(model, size, spec)  # type: ignore[assignment]
    model.selfmask_cfg = cfg  # type: ignore[assignment]
    return model


def external_info(spec: str, model: nn.Module | None = None) -> BackboneInfo:
    """The :class:`BackboneInfo` of ``spec``: embedding size by a dry forward, generic preset.

    Cached per specification. Without ``model`` one is built, under a forked RNG so the
    caller's random stream (and so the next backbone's initialisation) is not disturbed.
    """
    if spec in _INFO_CACHE:
        return _INFO_CACHE[spec]
    if model is None:
        with torch.random.fork_rng(devices=[]):
            model = build_external(spec)
    cfg = getattr(model, "selfmask_cfg", {})
    size = _input_size(spec, cfg)
    embed_dim = _embedding(dry_forward(model, size, spec), spec, size)
    try:
        preset = generic_targets(model)
    except SelfmaskError as exc:
        raise SelfmaskError(f"backbone {spec!r}: {exc}") from None
    removed = getattr(model, "removed_head_keys", [])
    info = BackboneInfo(
        spec,
        embed_dim,
        size,
        _stats(spec, cfg, "mean", IMAGENET_MEAN),
        _stats(spec, cfg, "std", IMAGENET_STD),
        preset,
        f"{type(model).__name__} from {spec}" + (f", head removed ({', '.join(removed)})" if removed else ""),
    )
    _INFO_CACHE[spec] = info
    return info


__all__ = [
    "KEEP_HEAD_ATTR",
    "LIBRARIES",
    "SPEC_HELP",
    "build_external",
    "dry_forward",
    "external_info",
    "generic_targets",
    "is_external",
    "parse_spec",
    "remove_head",
]
