"""DINO: self-distillation with no labels, as a second self-supervised objective.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (ICCV 2021). A
*student* (the backbone being adapted plus a projection head) learns to predict, from every
multi-crop view of an image, the output of a *teacher* on the large views of the same image.
The teacher is a momentum (EMA) copy of the student, never trained by gradient; its outputs
are *centred* (a running mean is subtracted, against collapse onto one dimension) and
*sharpened* (a low temperature, against collapse to the uniform distribution). The loss is
the cross-entropy ``-sum_k P_t(k) log P_s(k)`` over every (teacher view, student view) pair of
different views, as ``DINOLoss`` of facebookresearch/dino.

What the teacher is in this library (the paper's teacher is an EMA of all student weights):

* **mask training** (``method`` mask / topk): the student's trainable parameters are the mask
  scores, so the teacher is a copy of the *masked* backbone whose scores are the EMA of the
  student's scores, over the same frozen weights. The teacher's masks are ``1[EMA(S) > mu]``.
* **full fine-tuning** (``fft``): the EMA is over the weights, as in the paper.
* Only parameters that are trainable in the student are averaged (the frozen weights are
  identical in both and stay so exactly; averaging them would only add rounding).
* **BatchNorm buffers** (running mean and variance) are *copied* from the student after every
  optimiser step, not averaged: with ``bn="eval"`` they never change; with ``bn="train"`` the
  teacher evaluates with the student's statistics. The teacher runs in the student's mode,
  module by module (a BatchNorm the student keeps in evaluation mode, the teacher does too).

Pieces, each usable alone:

* :class:`DINOConfig`: every number of the recipe, validated once.
* :class:`DINOHead`: MLP -> L2 normalisation -> weight-normalised linear layer to ``out_dim``.
* :func:`teacher_probabilities` and :func:`dino_loss`: the pure loss functions.
* :func:`teacher_momentum` and :func:`teacher_temperature`: the two schedules.
* :class:`DINOObjective`: student head, teacher (backbone copy + head), centre and loss; an
  :class:`~selfmask.objectives.base.Objective` for the training engine.

Example::

    crops = MultiCrop.for_input_size(32, mean=info.mean, std=info.std)
    obj = DINOObjective(info.embed_dim, DINOConfig(out_dim=256), crops=crops, total_steps=552, backbone=backbone)
    loss, sums = obj.step(backbone, obj.views(images, generator=g), None, epoch=0, step=0)
    loss.backward(); opt.step(); obj.after_optimizer_step(backbone, step=0)

Differences from facebookresearch/dino, written down: the teacher-temperature warm-up and the
momentum schedule count optimiser steps, not epochs; there is no gradient clipping (the engine
owns the optimiser); the optimiser is the engine's SGD (DINO's recipe for ResNets is SGD too).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from selfmask.errors import SelfmaskError
from selfmask.objectives.base import embed_crops, is_int, refuse_unknown_keys, settings_error
from selfmask.objectives.sinkhorn import AllReduce, resolve_all_reduce


@dataclass(frozen=True)
class DINOConfig:
    """The DINO recipe (defaults: facebookresearch/dino, heads sized for small networks).

    Attributes:
        out_dim: K, the size of the output distribution (DINO: 65536 on ImageNet; 1024 here).
        hidden_dim: width of the head's hidden layers (DINO: 2048; 256 here).
        bottleneck_dim: size of the L2-normalised bottleneck before the last layer (DINO: 256; 64 here).
        num_layers: Linear layers of the MLP before the bottleneck normalisation (3, GELU between).
        head_batchnorm: BatchNorm1d after each hidden Linear of the head (DINO's ``use_bn_in_head``;
            False). It takes the batch's common component out of the embeddings, which on
            pretrained features that all look alike keeps the teacher from collapsing to uniform.
        student_temperature: softmax temperature of the student (0.1).
        teacher_temperature: softmax temperature of the teacher after the warm-up (0.04; DINO
            recommends up to 0.07 with a warm-up when training is unstable).
        warmup_teacher_temperature: teacher temperature at step 0 (0.04).
        warmup_teacher_temperature_iters: steps of the linear warm-up from
            ``warmup_teacher_temperature`` to ``teacher_temperature`` (0: none).
        center_momentum: momentum of the centre's running mean of teacher outputs (0.9).
        teacher_momentum: EMA momentum of the teacher at step 0 (0.996); it follows a cosine
            schedule to ``final_teacher_momentum`` at the last step.
        final_teacher_momentum: EMA momentum at the last step (1.0).
        freeze_last_layer_iters: the head's last layer receives no gradient for this many steps
            from the start (DINO: one epoch, 1251 steps on ImageNet at batch 1024).
        freeze_backbone_iters: the backbone (its masks, or its weights in a full fine-tuning
            run) receives no gradient for this many steps from the start, so the fresh head
            first learns on the pretrained features (a head warm-up, as ``SwAVConfig``'s; 0: none).
        head_lr: learning rate of the student head (0.03: DINO's SGD recipe for ResNets).
        head_weight_decay: weight decay of the student head (1e-4: DINO's SGD recipe).
    """

    out_dim: int = 1024
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    num_layers: int = 3
    head_batchnorm: bool = False
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    warmup_teacher_temperature: float = 0.04
    warmup_teacher_temperature_iters: int = 0
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    final_teacher_momentum: float = 1.0
    freeze_last_layer_iters: int = 1251
    freeze_backbone_iters: int = 0
    head_lr: float = 0.03
    head_weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        def is_real(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not is_int(self.out_dim) or self.out_dim < 2:
            raise settings_error(self, "out_dim", "an integer >= 2 (a distribution over at least 2 outputs)")
        for name in ("hidden_dim", "bottleneck_dim", "num_layers"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise settings_error(self, name, "an integer >= 1")
        for name in ("student_temperature", "teacher_temperature", "warmup_teacher_temperature", "head_lr"):
            if not is_real(getattr(self, name)) or getattr(self, name) <= 0:
                raise settings_error(self, name, "a finite number > 0")
        if not is_real(self.head_weight_decay) or self.head_weight_decay < 0:
            raise settings_error(self, "head_weight_decay", "a finite number >= 0")
        for name in ("center_momentum", "teacher_momentum", "final_teacher_momentum"):
            if not is_real(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                raise settings_error(self, name, "a number in [0, 1]")
        if not isinstance(self.head_batchnorm, bool):
            raise settings_error(self, "head_batchnorm", "true or false")
        for name in ("warmup_teacher_temperature_iters", "freeze_last_layer_iters", "freeze_backbone_iters"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise settings_error(self, name, "an integer >= 0")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fields (for run folders)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DINOConfig:
        refuse_unknown_keys(cls, data)
        return cls(**data)


# ---------------------------------------------------------------- schedules and loss


def teacher_temperature(cfg: DINOConfig, step: int) -> float:
    """Teacher temperature at ``step``: linear warm-up, then constant."""
    n = cfg.warmup_teacher_temperature_iters
    if step >= n:
        return cfg.teacher_temperature
    return cfg.warmup_teacher_temperature + (cfg.teacher_temperature - cfg.warmup_teacher_temperature) * step / n


def teacher_momentum(cfg: DINOConfig, step: int, total_steps: int) -> float:
    """EMA momentum after optimiser step ``step`` of ``total_steps``: cosine from the start to the final value."""
    t = min(max(step, 0), max(total_steps, 1)) / max(total_steps, 1)
    final = cfg.final_teacher_momentum
    return final + 0.5 * (cfg.teacher_momentum - final) * (1.0 + math.cos(math.pi * t))


def teacher_probabilities(teacher_logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """Centred and sharpened teacher distribution ``softmax((t - c) / tau_t)`` (no gradient)."""
    return F.softmax((teacher_logits.detach().float() - center) / temperature, dim=-1)


def dino_loss(
    student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor], student_temperature: float
) -> torch.Tensor:
    """Mean over pairs of different views of ``-sum_k P_t(k) log softmax(s / tau_s)(k)``, each averaged over the batch.

    Args:
        student_logits: one (B, K) tensor per view; views ``0 .. len(teacher_probs) - 1`` are the
            large ones the teacher saw, in the same order.
        teacher_probs: one (B, K) teacher distribution per large view (:func:`teacher_probabilities`).
        student_temperature: tau_s.
    """
    if len(student_logits) < 2 or not teacher_probs or len(teacher_probs) > len(student_logits):
        raise SelfmaskError(
            f"dino_loss: need at least 2 student views and 1..{len(student_logits)} teacher views, got "
            f"{len(student_logits)} and {len(teacher_probs)}"
        )
    log_p = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student_logits]
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    terms = 0
    for iq, q in enumerate(teacher_probs):
        for v, lp in enumerate(log_p):
            if v == iq:  # a view never predicts itself
                continue
            total = total + torch.sum(-q * lp, dim=-1).mean()
            terms += 1
    return total / terms


# ---------------------------------------------------------------- modules


class DINOHead(nn.Module):
    """DINO's projection head: ``num_layers`` Linear layers (GELU between) -> L2 norm -> last layer.

    ``batchnorm=True`` puts a BatchNorm1d after each hidden Linear (DINO's ``use_bn_in_head``).

    The last layer is bias-free and weight-normalised with its gain fixed at 1 (DINO's
    ``norm_last_layer=True``): its rows are unit vectors, so its outputs are cosine
    similarities between the normalised bottleneck and ``out_dim`` learnt directions.
    Linear weights start truncated-normal (std 0.02), biases at zero, as DINO's.
    """

    def __init__(self, input_dim: int, out_dim: int, hidden_dim: int = 256, bottleneck_dim: int = 64,
                 num_layers: int = 3, batchnorm: bool = False) -> None:
        super().__init__()
        if min(input_dim, out_dim, hidden_dim, bottleneck_dim, num_layers) < 1:
            raise SelfmaskError(
                f"DINOHead: sizes must be >= 1, got input_dim={input_dim}, out_dim={out_dim}, hidden_dim={hidden_dim}, "
                f"bottleneck_dim={bottleneck_dim}, num_layers={num_layers}"
            )
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                if batchnorm:
                    layers.append(nn.BatchNorm1d(dims[i + 1]))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # the direction of each row is the parameter; its norm is fixed at 1 (weight norm with g = 1)
        self.last_layer = nn.Parameter(nn.Linear(bottleneck_dim, out_dim, bias=False).weight.detach().clone())

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        w = F.normalize(self.last_layer, dim=1)
        return z @ (w.detach() if freeze_last_layer else w).t()


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            module = module._orig_mod
        elif [name for name, _ in module.named_children()] == ["inner"]:  # the engine's channels-last view
            module = module.inner
        else:
            return module


class DINOObjective(nn.Module):
    """DINO for the training engine: student head, momentum teacher, centre and loss.

    Args:
        embed_dim: the backbone's embedding size.
        cfg: the recipe.
        crops: a :class:`~selfmask.data.multicrop.MultiCrop`: its large crops go to the teacher
            and to the student, its small crops to the student only.
        total_steps: optimiser steps of the whole run (the momentum schedule ends there).
        backbone: the student backbone, already masked (mask/topk) or made trainable (fft): the
            teacher backbone is a deep copy of it (:meth:`attach_teacher`). ``None``: the copy is
            made at the first :meth:`step`, from the backbone the engine passes (so an engine may
            build objectives before it attaches the masks).
        all_reduce: sums the centre's batch mean over processes (default: ``torch.distributed``
            when initialised with more than one process; tests inject their own).
    """

    name: ClassVar[str] = "dino"
    needs_labels: ClassVar[bool] = False

    def __init__(
        self,
        embed_dim: int,
        cfg: DINOConfig | None = None,
        *,
        crops: Callable[..., list[torch.Tensor]],
        total_steps: int,
        backbone: nn.Module | None = None,
        all_reduce: AllReduce | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg or DINOConfig()
        n_large = getattr(getattr(crops, "config", None), "n_large", None)
        n_crops = getattr(getattr(crops, "config", None), "n_crops", None)
        if n_large is None or n_crops is None or n_crops < 2:
            raise SelfmaskError(
                f"DINOObjective: crops must be a MultiCrop with at least 2 views in all, got "
                f"{type(crops).__name__} with {n_crops} view(s)"
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise SelfmaskError(f"DINOObjective: total_steps must be an integer >= 1, got {total_steps!r}")
        self.embed_dim = embed_dim
        self.crops = crops
        self.n_large = int(n_large)
        self.total_steps = total_steps
        self.all_reduce = all_reduce
        # parameters left out of some steps' graphs (frozen last layer, head warm-up): DDP must look for them
        self.find_unused_parameters = self.cfg.freeze_last_layer_iters > 0 or self.cfg.freeze_backbone_iters > 0
        c = self.cfg
        self.head = DINOHead(embed_dim, c.out_dim, c.hidden_dim, c.bottleneck_dim, c.num_layers, c.head_batchnorm)
        self.teacher_head = copy.deepcopy(self.head)
        for p in self.teacher_head.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, c.out_dim))
        self.teacher_backbone: nn.Module | None = None
        self._ema_names: list[str] = []
        self._pending_teacher: dict[str, torch.Tensor] | None = None
        if backbone is not None:
            self.attach_teacher(backbone)

    @torch.no_grad()
    def attach_teacher(self, backbone: nn.Module) -> None:
        """Make the teacher backbone: a frozen deep copy of the (masked or trainable) student ``backbone``.

        Called by the constructor when it is given the backbone, else at the first :meth:`step`
        (the student is then still as it starts). A teacher state restored by
        :meth:`load_state_dict` before that is applied here.
        """
        student = _unwrap(backbone)
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher_backbone = teacher
        # which teacher parameters follow the student by EMA: those the student trains
        self._ema_names = [n for n, p in student.named_parameters() if p.requires_grad]
        if self._pending_teacher is not None:
            teacher.load_state_dict(self._pending_teacher)
            self._pending_teacher = None

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; a teacher state arriving before the teacher exists waits for it."""
        prefix = "teacher_backbone."
        if self.teacher_backbone is None and any(k.startswith(prefix) for k in state_dict):
            self._pending_teacher = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.teacher_backbone is None and self._pending_teacher is not None:  # restored, not yet attached
            for k, v in self._pending_teacher.items():
                destination[f"{prefix}teacher_backbone.{k}"] = v

    # -- the Objective protocol --------------------------------------------------------------

    def param_groups(self, lr: float = 0.0) -> list[dict[str, Any]]:
        """The student head with its own learning rate and weight decay (the teacher is not optimised)."""
        return [{"params": list(self.head.parameters()), "lr": self.cfg.head_lr,
                 "weight_decay": self.cfg.head_weight_decay, "name": "dino-head"}]

    def views(self, images: torch.Tensor, *, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The multi-crop views of a uint8 batch (large ones first); float images in [0, 1] are rounded to uint8."""
        if images.dtype != torch.uint8:
            images = (images.float() * 255.0).round().clamp_(0, 255).to(torch.uint8)
        return self.crops(images, generator=generator)

    def step(
        self,
        backbone: nn.Module,
        views: Sequence[torch.Tensor],
        labels: torch.Tensor | None = None,
        *,
        epoch: int = 0,
        step: int = 0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss of one batch of :meth:`views`: the student sees every view, the teacher the large ones."""
        if not isinstance(views, (list, tuple)) or len(views) < max(2, self.n_large):
            n = len(views) if isinstance(views, (list, tuple)) else type(views).__name__
            raise SelfmaskError(f"DINOObjective.step: expected the list of {self.crops.config.n_crops} views of views(), got {n}")
        if self.teacher_backbone is None:
            self.attach_teacher(backbone)
        assert self.teacher_backbone is not None
        batch = views[0].shape[0]
        warmup = step < self.cfg.freeze_backbone_iters  # head warm-up: no gradient reaches the backbone
        with torch.no_grad() if warmup else contextlib.nullcontext():
            embeddings = torch.cat(embed_crops(backbone, list(views)))
        student = self.head(embeddings, freeze_last_layer=step < self.cfg.freeze_last_layer_iters)
        with torch.no_grad():
            # the teacher runs in the student's mode; BatchNorms a bn="eval" policy keeps in evaluation
            # mode stay there through the same hooks, copied with the backbone
            self.teacher_backbone.train(backbone.training)
            teacher = self.teacher_head(torch.cat(embed_crops(self.teacher_backbone, list(views[: self.n_large]))))
        temp = teacher_temperature(self.cfg, step)
        probs = teacher_probabilities(teacher, self.center, temp)
        loss = dino_loss(student.split(batch), probs.split(batch), self.cfg.student_temperature)
        if self.training:
            self.update_center(teacher)
        with torch.no_grad():
            entropy = float(-(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1).mean())
        return loss, {"loss": float(loss.detach()) * batch, "seen": batch, "teacher_entropy": entropy * batch,
                      "teacher_temperature": temp * batch}

    @torch.no_grad()
    def after_optimizer_step(self, backbone: nn.Module, *, step: int) -> None:
        """EMA of the student into the teacher, then the student's buffers copied (module docstring)."""
        if self.teacher_backbone is None:  # no step yet: the teacher is still the student
            return
        m = teacher_momentum(self.cfg, step, self.total_steps)
        student = _unwrap(backbone)
        s_params = dict(student.named_parameters())
        t_params = dict(self.teacher_backbone.named_parameters())
        for name in self._ema_names:
            t_params[name].mul_(m).add_(s_params[name].detach(), alpha=1.0 - m)
        for t, s in zip(self.teacher_head.parameters(), self.head.parameters()):
            t.mul_(m).add_(s.detach(), alpha=1.0 - m)
        t_buffers = dict(self.teacher_backbone.named_buffers())
        for name, buf in student.named_buffers():
            if name in t_buffers and t_buffers[name] is not buf:
                t_buffers[name].copy_(buf)

    def epoch_metrics(self, sums: dict[str, float]) -> dict[str, Any]:
        """``loss``, ``teacher_entropy`` (nats; ln K: uniform teacher, 0: one-hot) and ``teacher_temperature``, epoch means."""
        seen = max(sums.get("seen", 0.0), 1.0)
        return {k: sums[k] / seen for k in ("loss", "teacher_entropy", "teacher_temperature") if k in sums}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"objective": self}  # heads, teacher and centre

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}  # the centre is a buffer and the teacher a submodule: both are in state_dict()

    def config_dict(self) -> dict[str, Any]:
        return self.cfg.to_dict()

    # -- pieces -------------------------------------------------------------------------------

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(teacher outputs)``, the mean over the global batch."""
        total = teacher_logits.detach().float().sum(dim=0, keepdim=True)
        count = torch.tensor([float(teacher_logits.shape[0])], device=total.device)
        reduce = resolve_all_reduce(self.all_reduce)
        if reduce is not None:
            total, count = reduce(total, "sum"), reduce(count, "sum")
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(total / count, alpha=1.0 - m)


def build_dino(inputs: Any, crops: Any) -> DINOObjective:
    """The registry's factory: ``selfmask.objectives.registry.ObjectiveInputs`` and the multi-crop views in.

    ``inputs.settings``: a :class:`DINOConfig`, its ``to_dict()`` form, or ``None`` (the defaults).
    The momentum schedule spans the run's optimiser steps; the teacher backbone is copied from the
    student at the first step (the engine attaches the masks after building objectives).
    """
    settings = inputs.settings if inputs.settings is not None else DINOConfig()
    if isinstance(settings, dict):
        settings = DINOConfig.from_dict(settings)
    if not isinstance(settings, DINOConfig):
        raise SelfmaskError(f"objective 'dino': settings must be a DINOConfig or a dict, got {type(settings).__name__}")
    cfg, n = inputs.cfg, len(inputs.train_set)
    total = max(1, n // min(cfg.batch_size, n)) * cfg.epochs  # the engine drops the last partial batch
    return DINOObjective(inputs.info.embed_dim, settings, crops=crops, total_steps=total)


__all__ = [
    "DINOConfig",
    "DINOHead",
    "DINOObjective",
    "build_dino",
    "dino_loss",
    "teacher_momentum",
    "teacher_probabilities",
    "teacher_temperature",
]
