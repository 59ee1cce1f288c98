"""Multi-crop augmentation for SwAV, applied to whole uint8 batches on the training device.

SwAV (Caron et al. 2020; METHOD.md section 2) views each image through 2 large
crops (224 px, scale 0.14-1.0) and 6 small ones (96 px, scale 0.05-0.14), each with
a horizontal flip, colour jitter (0.8, 0.8, 0.8, 0.2) with p 0.8, grayscale with
p 0.2 and Gaussian blur with p 0.5. Per-image CPU transforms starve a GPU, so here
every crop of a batch is made at once with batched tensor operations on the device
the batch lives on: one ``grid_sample`` per crop size for crop-and-resize, closed-form
colour operations, and kornia's batched Gaussian blur with a sigma per image.

Random parameters are drawn on the CPU from a ``torch.Generator``, so a seed gives
the same crops on any device. Choices where batched code differs from
torchvision's per-image transforms (written down in docs/swav.md):

* the order of the four colour-jitter operations is drawn once per crop size and
  call, not per image (kornia's ``ColorJitter`` does the same);
* crops are resampled bilinearly through the box corners (``align_corners=True``,
  as ``kornia.geometry.transform.crop_and_resize``), without antialiasing;
* the blur sigma range (0.1-2.0 px at 224 px, SwAV's ``PILRandomGaussianBlur``) is
  scaled with the input size by :meth:`MultiCropConfig.for_input_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from selfmask.errors import SelfmaskError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale
_PAPER_SIZE = 224
_PAPER_SMALL = 96


def _import_kornia() -> Any:
    try:
        import kornia
    except ImportError as exc:
        raise SelfmaskError(
            "MultiCrop needs the 'kornia' package (pip install 'kornia>=0.7'), which is not importable "
            f"here: {exc}"
        ) from None
    return kornia


@dataclass(frozen=True)
class MultiCropConfig:
    """Multi-crop settings (defaults: the paper at 224 px).

    Attributes:
        n_large, n_small: number of large and small crops (2 and 6).
        large_size, small_size: output side lengths in pixels (224 and 96).
        large_scale, small_scale: range of the fraction of the image area each crop covers.
        ratio: range of crop aspect ratios (3/4-4/3, as RandomResizedCrop).
        flip_p: probability of a horizontal flip.
        jitter: (brightness, contrast, saturation, hue) strengths, torchvision's ColorJitter meaning.
        jitter_p: probability of colour jitter.
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of Gaussian blur.
        blur_sigma: range of the blur sigma in output pixels.
        mean, std: per-channel normalisation after the augmentations.
        min_batch: smallest batch accepted (2: SwAV's Sinkhorn shares prototypes between images).
    """

    n_large: int = 2
    n_small: int = 6
    large_size: int = _PAPER_SIZE
    small_size: int = _PAPER_SMALL
    large_scale: tuple[float, float] = (0.14, 1.0)
    small_scale: tuple[float, float] = (0.05, 0.14)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    min_batch: int = 2

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> SelfmaskError:
            return SelfmaskError(f"MultiCropConfig.{name}: expected {expected}, got {getattr(self, name)!r}")

        for name, lo in (("n_large", 1), ("n_small", 0), ("large_size", 1), ("small_size", 1), ("min_batch", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise bad(name, f"an integer >= {lo}")
        if self.n_small and self.small_size > self.large_size:
            raise bad("small_size", f"at most large_size={self.large_size}")
        for name in ("large_scale", "small_scale"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi <= 1):
                raise bad(name, "(low, high) with 0 < low <= high <= 1")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise bad("ratio", "(low, high) with 0 < low <= high")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "a probability in [0, 1]")
        if len(self.jitter) != 4 or any(v < 0 for v in self.jitter) or self.jitter[3] > 0.5:
            raise bad("jitter", "(brightness, contrast, saturation, hue), all >= 0, hue <= 0.5")
        if not (0 < self.blur_sigma[0] <= self.blur_sigma[1]):
            raise bad("blur_sigma", "(low, high) with 0 < low <= high")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise bad("std" if len(self.std) != 3 or any(s <= 0 for s in self.std) else "mean", "3 values (std > 0)")

    @classmethod
    def for_input_size(cls, input_size: int, **overrides: Any) -> MultiCropConfig:
        """The paper's recipe scaled to a backbone input size.

        Large crops are ``input_size``; small crops ``round(input_size * 96 / 224)``
        (96 at 224, 14 at 32); blur sigmas scale by ``input_size / 224``. Any field
        can be overridden, e.g. ``for_input_size(32, small_size=16, mean=..., std=...)``.
        """
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
            raise SelfmaskError(f"MultiCropConfig.for_input_size: input_size must be an integer >= 1, got {input_size!r}")
        factor = input_size / _PAPER_SIZE
        base = cls(
            large_size=input_size,
            small_size=max(1, round(_PAPER_SMALL * factor)),
            blur_sigma=(0.1 * factor, 2.0 * factor),
        )
        return replace(base, **overrides)

    @property
    def n_crops(self) -> int:
        return self.n_large + self.n_small


@dataclass
class _GroupParams:
    """Random parameters for ``n`` images of one crop size, all on the CPU."""

    theta: torch.Tensor  # (n, 2, 3) affine sampling matrices of the crop boxes
    flip: torch.Tensor  # (n,) bool
    jitter: torch.Tensor  # (n,) bool
    factors: torch.Tensor  # (n, 4) brightness, contrast, saturation multipliers and hue shift (turns)
    order: list[int]  # order of the four jitter operations
    gray: torch.Tensor  # (n,) bool
    blur: torch.Tensor  # (n,) bool
    sigma: torch.Tensor  # (n,)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64) * (hi - lo) + lo


def sample_crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """Crop boxes as torchvision's RandomResizedCrop draws them, vectorised over ``n`` images.

    Ten attempts per image at an area fraction in ``scale`` and a log-uniform aspect
    ratio in ``ratio``; the first that fits is kept, else a centre crop with the ratio
    clamped into ``ratio``. Returns (n, 4) integer ``(top, left, h, w)``.
    """
    attempts = 10
    area = float(height * width)
    target = area * (torch.rand(n, attempts, generator=g, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(n, attempts, generator=g, dtype=torch.float64) * (log_hi - log_lo) + log_lo)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(ok.any(dim=1), ok.to(torch.int8).argmax(dim=1), torch.full((n,), -1))
    # centre-crop fallback
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    rows = torch.arange(n)
    pick = first.clamp_min(0)
    cw = torch.where(first >= 0, w[rows, pick], torch.full((n,), float(fw))).long()
    ch = torch.where(first >= 0, h[rows, pick], torch.full((n,), float(fh))).long()
    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (height - ch + 1).double()).long()
    left = torch.floor(u[:, 1] * (width - cw + 1).double()).long()
    top = torch.where(first >= 0, top, (height - ch) // 2)
    left = torch.where(first >= 0, left, (width - cw) // 2)
    return torch.stack([top, left, ch, cw], dim=1)


def crop_theta(tlhw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Affine matrices (n, 2, 3) for ``F.affine_grid(..., align_corners=True)`` sampling boxes ``(top, left, h, w)``.

    The corner pixels of each box map to the corner pixels of the output, the same
    resampling as ``kornia.geometry.transform.crop_and_resize(..., align_corners=True)``
    at a third of its cost on the CPU (no general homography).
    """
    top, left, h, w = (tlhw[:, i].to(torch.float32) for i in range(4))
    theta = torch.zeros(tlhw.shape[0], 2, 3)
    theta[:, 0, 0] = (w - 1) / max(width - 1, 1)
    theta[:, 0, 2] = (2 * left + w - 1) / max(width - 1, 1) - 1
    theta[:, 1, 1] = (h - 1) / max(height - 1, 1)
    theta[:, 1, 2] = (2 * top + h - 1) / max(height - 1, 1) - 1
    return theta


def hue_shift(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB images ``x`` (n, 3, H, W) in [0, 1] by ``turns`` (n,) of a full turn.

    Equals ``kornia.enhance.adjust_hue(x, 2 * pi * turns)`` (and torchvision's
    ``adjust_hue``) up to float rounding, with the HSV round trip written in closed
    form: value and saturation are kept, so only the hue is computed.
    """
    maxc, argmax = x.max(dim=1, keepdim=True)
    delta = maxc - x.min(dim=1, keepdim=True).values
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    h = torch.where(
        argmax == 0,
        torch.remainder((g - b) / safe, 6.0),
        torch.where(argmax == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0),
    )
    h = torch.remainder(h + turns.to(x.dtype).view(-1, 1, 1, 1) * 6.0, 6.0)
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1) + h, 6.0)
    return maxc - delta * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


class MultiCrop:
    """SwAV multi-crop on uint8 batches: ``crops = MultiCrop(cfg, seed=0)(images)``.

    Args:
        config: the recipe (see :meth:`MultiCropConfig.for_input_size`).
        seed: seed of the generator used when a call passes none.

    Calling with a uint8 batch ``(B, 3, H, W)`` on any device returns
    ``config.n_large`` float32 tensors ``(B, 3, large_size, large_size)`` followed by
    ``config.n_small`` tensors ``(B, 3, small_size, small_size)``, normalised with
    ``mean``/``std``, on the same device. Crop ``v`` of image ``b`` is an independent
    augmentation of image ``b``.

    Raises:
        SelfmaskError: kornia missing; input not a uint8 (B, 3, H, W) tensor; crops larger
            than the images; a batch smaller than ``min_batch``.
    """

    def __init__(self, config: MultiCropConfig | None = None, seed: int = 0) -> None:
        self.config = config or MultiCropConfig()
        _import_kornia()  # fail at construction, not at the first batch
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def for_input_size(cls, input_size: int, seed: int = 0, **overrides: Any) -> MultiCrop:
        """:meth:`MultiCropConfig.for_input_size` wrapped in a :class:`MultiCrop`."""
        return cls(MultiCropConfig.for_input_size(input_size, **overrides), seed=seed)

    def _check(self, images: torch.Tensor) -> None:
        cfg = self.config
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4 or (
            images.shape[1] != 3
        ):
            what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise SelfmaskError(f"MultiCrop: expected a uint8 image batch (B, 3, H, W), got {what}")
        b, _, h, w = images.shape
        if b < cfg.min_batch:
            raise SelfmaskError(
                f"MultiCrop: batch of {b} image(s) is smaller than min_batch={cfg.min_batch} "
                "(SwAV's Sinkhorn needs at least 2 images per batch)"
            )
        biggest = max(cfg.large_size, cfg.small_size if cfg.n_small else 0)
        if biggest > min(h, w):
            raise SelfmaskError(
                f"MultiCrop: crops of {biggest} px are larger than the {h}x{w} images; "
                f"use MultiCropConfig.for_input_size({min(h, w)}) or smaller crop sizes"
            )

    def sample_params(self, n: int, height: int, width: int, large: bool, g: torch.Generator) -> _GroupParams:
        """Random parameters of ``n`` crops of one size (CPU)."""
        cfg = self.config
        scale = cfg.large_scale if large else cfg.small_scale
        theta = crop_theta(sample_crop_boxes(n, height, width, scale, cfg.ratio, g), height, width)
        flip = torch.rand(n, generator=g) < cfg.flip_p
        jitter = torch.rand(n, generator=g) < cfg.jitter_p
        b, c, s, hue = cfg.jitter
        factors = torch.stack(
            [
                _uniform(n, max(0.0, 1 - b), 1 + b, g),
                _uniform(n, max(0.0, 1 - c), 1 + c, g),
                _uniform(n, max(0.0, 1 - s), 1 + s, g),
                _uniform(n, -hue, hue, g),
            ],
            dim=1,
        ).to(torch.float32)
        order = torch.randperm(4, generator=g).tolist()
        gray = torch.rand(n, generator=g) < cfg.grayscale_p
        blur = torch.rand(n, generator=g) < cfg.blur_p
        sigma = _uniform(n, cfg.blur_sigma[0], cfg.blur_sigma[1], g).to(torch.float32)
        return _GroupParams(theta, flip, jitter, factors, order, gray, blur, sigma)

    def _jitter(self, x: torch.Tensor, factors: torch.Tensor, order: list[int]) -> torch.Tensor:
        f = factors.to(x.device).view(-1, 4, 1, 1, 1).unbind(1)
        for op in order:
            if op == 0:  # brightness: scale
                x = (x * f[0]).clamp_(0, 1)
            elif op == 1:  # contrast: blend with the mean grey level
                mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
                x = (f[1] * x + (1 - f[1]) * mean).clamp_(0, 1)
            elif op == 2:  # saturation: blend with the grayscale image
                x = (f[2] * x + (1 - f[2]) * _grayscale(x)).clamp_(0, 1)
            elif self.config.jitter[3] > 0:  # hue: rotate, factor in turns -> radians
                x = hue_shift(x, f[3].view(-1))
        return x

    def _apply(self, x: torch.Tensor, size: int, p: _GroupParams) -> torch.Tensor:
        """Crop, resize and augment ``x`` (n, 3, H, W) float in [0, 1]."""
        dev = x.device
        grid = F.affine_grid(p.theta.to(dev), [x.shape[0], 3, size, size], align_corners=True)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
        out = torch.where(p.flip.to(dev).view(-1, 1, 1, 1), out.flip(-1), out)
        idx = p.jitter.nonzero().view(-1)
        if idx.numel():
            i = idx.to(dev)
            out[i] = self._jitter(out[i], p.factors[idx], p.order)
        idx = p.gray.nonzero().view(-1)
        if idx.numel():
            i = idx.to(dev)
            out[i] = _grayscale(out[i]).expand(-1, 3, -1, -1)
        idx = p.blur.nonzero().view(-1)
        if idx.numel():
            i = idx.to(dev)
            sigma = p.sigma[idx]
            radius = max(1, math.ceil(3 * float(sigma.max())))
            ksize = min(2 * radius + 1, size if size % 2 else size - 1)
            if ksize >= 3:
                sig = sigma.to(dev).view(-1, 1).expand(-1, 2).contiguous()
                out[i] = _import_kornia().filters.gaussian_blur2d(out[i], (ksize, ksize), sig, border_type="reflect")
        mean = torch.tensor(self.config.mean, dtype=out.dtype, device=dev).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, dtype=out.dtype, device=dev).view(1, 3, 1, 1)
        return (out - mean) / std

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """The crops of ``images``: large ones first, then small ones."""
        self._check(images)
        cfg = self.config
        g = generator if generator is not None else self.generator
        b, _, h, w = images.shape
        x = images.to(torch.float32).div_(255.0)
        crops: list[torch.Tensor] = []
        for n, size, large in ((cfg.n_large, cfg.large_size, True), (cfg.n_small, cfg.small_size, False)):
            if n == 0:
                continue
            params = self.sample_params(n * b, h, w, large, g)
            group = self._apply(x.repeat(n, 1, 1, 1), size, params)
            crops.extend(group.split(b))
        return crops


__all__ = ["MultiCrop", "MultiCropConfig", "crop_theta", "hue_shift", "sample_crop_boxes"]
