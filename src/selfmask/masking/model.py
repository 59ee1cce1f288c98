"""Put learnable masks on any PyTorch model, by qualified parameter name.

``mask_model(model, config)`` is to masks what PEFT's ``get_peft_model`` is to
adapters: it finds the targeted parameters by name, registers a
:class:`~selfmask.masking.layer.ScoreMask` parametrization on each (the host
module keeps its class and its forward), and freezes everything else.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from selfmask.masking.config import MaskConfig
from selfmask.masking.layer import FlatMaskCache, ScoreMask, selective_trainable_mask

_CONFIG_ATTR = "_selfmask_config"
_BN_HOOK_ATTR = "_selfmask_bn_hook"


def iter_score_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, ScoreMask]]:
    """Yield ``(qualified_name, host_module, tensor_name, ScoreMask)`` for every masked tensor.

    ``qualified_name`` is the name the parameter had before masking, e.g.
    ``layer1.0.conv1.weight``.
    """
    for module_name, module in model.named_modules():
        plist = getattr(module, "parametrizations", None)
        if plist is None or not parametrize.is_parametrized(module):
            continue
        for tensor_name, chain in plist.items():
            for p in chain:
                if isinstance(p, ScoreMask):
                    qualified = f"{module_name}.{tensor_name}" if module_name else tensor_name
                    yield qualified, module, tensor_name, p


def is_masked(model: nn.Module) -> bool:
    """Whether ``model`` carries any selfmask masks."""
    return next(iter_score_masks(model), None) is not None


def _resolve_targets(model: nn.Module, config: MaskConfig) -> list[str]:
    params = dict(model.named_parameters())
    names = [n for n in params if config.matches(n)]
    buffers = {n: b for n, b in model.named_buffers()}
    if isinstance(config.targets, (list, tuple)):
        # every entry of an explicit list must match something: catches typos
        for entry in config.targets:
            single = MaskConfig(targets=[entry])
            if not any(single.matches(n) for n in params):
                _raise_no_match(repr(entry), params, buffers, single)
    elif not names:
        _raise_no_match(repr(config.targets), params, buffers, config)
    for n in names:
        p = params[n]
        if not p.dtype.is_floating_point:
            raise ValueError(
                f"mask_model: target parameter {n!r} has dtype {p.dtype}; only floating-point "
                "parameters can be masked"
            )
    return names


def _raise_no_match(
    what: str, params: dict[str, nn.Parameter], buffers: dict[str, torch.Tensor], config: MaskConfig
) -> None:
    hit = [n for n in buffers if config.matches(n)]
    if hit:
        b = buffers[hit[0]]
        kind = "non-floating " if not b.dtype.is_floating_point else ""
        raise ValueError(
            f"mask_model: target {what} names the {kind}buffer {hit[0]!r} (dtype {b.dtype}); "
            "only floating-point parameters can be masked"
        )
    if not params:
        raise ValueError(f"mask_model: target {what} matches nothing: the model has no parameters")
    sample = list(params)[:8]
    more = f", ... ({len(params)} in all)" if len(params) > len(sample) else ""
    raise ValueError(
        f"mask_model: target {what} matches no parameter. Parameters that exist include: "
        + ", ".join(sample)
        + more
    )


def mask_model(model: nn.Module, config: MaskConfig | None = None) -> nn.Module:
    """Mask the parameters of ``model`` that ``config.targets`` names, in place.

    Every targeted parameter ``theta`` is replaced by ``theta * M / alpha`` with a
    learnable score tensor of its shape; all other parameters are frozen
    (``requires_grad=False``). The only trainable parameters afterwards are the
    scores, plus whatever the caller later sets trainable (a head).

    Example::

        model = mask_model(resnet, MaskConfig.preset("resnet"))
        opt = torch.optim.SGD(mask_scores(model).values(), lr=50, momentum=0.9)

    Raises:
        ValueError: a target matches nothing (a few existing names are listed), a
            target is not a floating-point parameter, or the model is already masked.
    """
    config = config or MaskConfig()
    if is_masked(model):
        first = next(iter_score_masks(model))[0]
        raise ValueError(
            f"mask_model: the model is already masked (e.g. {first!r}); "
            "call merge_masks(model) first or mask a fresh model"
        )
    names = _resolve_targets(model, config)
    generator = torch.Generator().manual_seed(config.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        module_name, _, tensor_name = name.rpartition(".")
        module = modules[module_name]
        weight = getattr(module, tensor_name)
        score_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        pm = ScoreMask(
            weight.shape,
            mode=config.mode,
            threshold=config.threshold,
            keep_ratio=config.keep_ratio,
            rescale=config.rescale,
            init_score=config.init_score,
            init_noise=config.noise,
            generator=generator,
            device=weight.device,
            dtype=score_dtype,
            trainable=(
                selective_trainable_mask(weight.shape, config.trainable_fraction, config.seed, name)
                if config.trainable_fraction < 1.0
                else None
            ),
            parts=config.parts(name, tuple(weight.shape)),
            topk_count=config.topk_count,
        )
        parametrize.register_parametrization(module, tensor_name, pm, unsafe=True)
    if config.bn == "eval":
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                handle = module.register_forward_pre_hook(_bn_eval_hook)
                setattr(module, _BN_HOOK_ATTR, handle)
    setattr(model, _CONFIG_ATTR, config)
    return model


def _bn_eval_hook(module: nn.Module, _inputs: object) -> None:
    # keep this BatchNorm in evaluation mode whatever model.train() said
    module.training = False


def mask_config(model: nn.Module) -> MaskConfig:
    """The :class:`MaskConfig` a model was masked with."""
    config = getattr(model, _CONFIG_ATTR, None)
    if config is None:
        raise ValueError("mask_config: the model has no masks (call mask_model first)")
    return config


def mask_scores(model: nn.Module) -> dict[str, nn.Parameter]:
    """The score parameter of every masked tensor, keyed by qualified parameter name."""
    return {name: pm.scores for name, _m, _t, pm in iter_score_masks(model)}


def current_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The current binary mask (bool) of every masked tensor, keyed by qualified name."""
    return {name: pm.mask() for name, _m, _t, pm in iter_score_masks(model)}


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The frozen original (pre-mask) tensor of every masked parameter, by qualified name."""
    out = {}
    for name, module, tensor_name, _pm in iter_score_masks(model):
        out[name] = module.parametrizations[tensor_name].original
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as if it were not masked: originals under their plain names, no scores.

    For an unmasked model this is ``model.state_dict()``. Fingerprints of base
    weights (:func:`selfmask.fingerprint.model_fingerprint`) are taken over this.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".parametrizations." in key or key.startswith("parametrizations."):
            head, _, rest = key.rpartition("parametrizations.")
            tensor_name, _, leaf = rest.partition(".")
            if leaf == "original":
                out[f"{head}{tensor_name}"] = value
            continue  # scores
        out[key] = value
    return out


def merge_masks(model: nn.Module) -> nn.Module:
    """Bake ``theta * M / alpha`` into plain parameters and remove all masking machinery.

    The result is an ordinary model with the same outputs as the masked one and no
    extra cost at inference: no parametrizations, no scores, no hooks. Merged
    parameters stay frozen (``requires_grad=False``).
    """
    entries = list(iter_score_masks(model))
    if not entries:
        raise ValueError("merge_masks: the model has no masks to merge (was mask_model called?)")
    disable_fast_masks(model)
    for _name, module, tensor_name, _pm in entries:
        parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
    for module in model.modules():
        handle = getattr(module, _BN_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            delattr(module, _BN_HOOK_ATTR)
    if hasattr(model, _CONFIG_ATTR):
        delattr(model, _CONFIG_ATTR)
    return model


def enable_fast_masks(model: nn.Module) -> FlatMaskCache | None:
    """Switch the threshold-mode masks of ``model`` to the fast path, in place.

    All their scores move into one flat buffer per device and dtype (the score
    parameters keep their identity, names and values, so an optimiser built before
    or after this call works alike), and masks and alphas of all tensors are
    computed in one pass per optimiser step instead of once per layer per forward
    pass (:class:`~selfmask.masking.layer.FlatMaskCache`). Outputs, gradients and
    masks are the plain path's. Top-k masks keep the plain path. Calling it again
    re-gathers the scores (e.g. after masks were added); :func:`merge_masks` and
    :func:`disable_fast_masks` undo it.

    Returns:
        the cache, or ``None`` when the model has no threshold-mode masks.

    Raises:
        ValueError: the model has no masks.
    """
    entries = list(iter_score_masks(model))
    if not entries:
        raise ValueError("enable_fast_masks: the model has no masks (call mask_model first)")
    disable_fast_masks(model)
    members = [pm for _n, _m, _t, pm in entries if pm.mode == "threshold"]
    return FlatMaskCache(members) if members else None


def disable_fast_masks(model: nn.Module) -> None:
    """Return every mask of ``model`` to the plain per-layer computation (scores unchanged)."""
    for _n, _m, _t, pm in iter_score_masks(model):
        if pm._flat_cache is not None:
            pm._flat_cache.detach()


def binary_entropy(p: float) -> float:
    """``H(p)`` in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


@dataclass(frozen=True)
class TensorMaskStats:
    name: str
    shape: tuple[int, ...]
    numel: int
    active: int

    @property
    def fraction_active(self) -> float:
        return self.active / self.numel if self.numel else 0.0

    @property
    def entropy_bits(self) -> float:
        """Information limit of this mask: ``n * H(p)`` bits."""
        return self.numel * binary_entropy(self.fraction_active)


@dataclass(frozen=True)
class MaskSummary:
    """Per-tensor and total mask statistics (see :func:`mask_summary`)."""

    tensors: list[TensorMaskStats] = field(default_factory=list)
    total_parameters: int = 0

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def active(self) -> int:
        return sum(t.active for t in self.tensors)

    @property
    def fraction_active(self) -> float:
        return self.active / self.numel if self.numel else 0.0

    @property
    def raw_bits(self) -> int:
        """One bit per masked weight."""
        return self.numel

    @property
    def entropy_bits(self) -> float:
        """Sum over tensors of ``n * H(p)``: the per-tensor information limit."""
        return sum(t.entropy_bits for t in self.tensors)

    def to_dict(self) -> dict[str, object]:
        return {
            "masked_tensors": len(self.tensors),
            "masked_weights": self.numel,
            "active_weights": self.active,
            "fraction_active": self.fraction_active,
            "raw_bits": self.raw_bits,
            "entropy_bits": self.entropy_bits,
            "bits_per_weight_entropy": self.entropy_bits / self.numel if self.numel else 0.0,
            "total_parameters": self.total_parameters,
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "numel": t.numel,
                    "active": t.active,
                    "fraction_active": t.fraction_active,
                    "entropy_bits": t.entropy_bits,
                }
                for t in self.tensors
            ],
        }

    def __str__(self) -> str:
        width = max([len(t.name) for t in self.tensors] + [6])
        lines = [f"{'tensor':<{width}}  {'weights':>10}  {'active':>8}  {'H bits/w':>8}"]
        for t in self.tensors:
            hb = t.entropy_bits / t.numel if t.numel else 0.0
            lines.append(f"{t.name:<{width}}  {t.numel:>10,}  {t.fraction_active:>8.2%}  {hb:>8.3f}")
        hb = self.entropy_bits / self.numel if self.numel else 0.0
        lines.append(f"{'total':<{width}}  {self.numel:>10,}  {self.fraction_active:>8.2%}  {hb:>8.3f}")
        lines.append(
            f"raw: {self.raw_bits:,} bits ({self.raw_bits / 8 / 1024:.1f} KiB); "
            f"entropy bound: {self.entropy_bits:,.0f} bits ({self.entropy_bits / 8 / 1024:.1f} KiB)"
        )
        return "\n".join(lines)


def mask_summary(model: nn.Module) -> MaskSummary:
    """Per-tensor and total counts, fraction active and bits needed (raw and entropy bound)."""
    rows = []
    for name, _m, _t, pm in iter_score_masks(model):
        m = pm.mask()
        rows.append(TensorMaskStats(name, tuple(m.shape), m.numel(), int(m.sum())))
    if not rows:
        raise ValueError("mask_summary: the model has no masks (call mask_model first)")
    total = sum(p.numel() for p in model.parameters()) - sum(r.numel for r in rows)  # scores not counted
    return MaskSummary(rows, total)
