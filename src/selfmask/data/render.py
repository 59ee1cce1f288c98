"""Pure rendering units of the embedded benchmark: glyph masks, textures, composition.

Everything here is built from data that ships inside installed packages: the TrueType
fonts in matplotlib's ``mpl-data`` folder and scikit-learn's 8 x 8 handwritten digits.
Glyphs are rendered once as grey-level masks on a square canvas; every image is then a
random affine warp of one mask (rotation, scale, shear, translation), composited with a
random foreground colour over a random textured background. All randomness comes from
an explicit :class:`torch.Generator`, so a seed fixes every pixel on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from selfmask.errors import SelfmaskError

CANVAS = 64  # side of the square canvas glyph masks are rendered on, in pixels
GLYPH_BOX = 44  # the longer side of every glyph's ink is scaled to this many canvas pixels


def matplotlib_font_dir() -> Path:
    """The folder of TrueType fonts shipped inside matplotlib (DejaVu, STIX, Computer Modern)."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def render_glyph_masks(font_files: list[str], chars: str, canvas: int = CANVAS) -> torch.Tensor:
    """Render every ``chars`` glyph of every font as a centred grey-level mask.

    Returns a float tensor ``(len(font_files), len(chars), canvas, canvas)`` in [0, 1]; each
    glyph's ink bounding box is scaled so its longer side is ``GLYPH_BOX * canvas / 64`` pixels,
    so size differences between fonts do not give the class away.
    """
    from PIL import Image, ImageDraw, ImageFont

    font_dir = matplotlib_font_dir()
    box = round(GLYPH_BOX * canvas / 64)
    out = torch.zeros(len(font_files), len(chars), canvas, canvas)
    for i, name in enumerate(font_files):
        path = font_dir / name
        if not path.is_file():
            raise SelfmaskError(f"font {name!r} not found in {font_dir} (is matplotlib installed completely?)")
        font = ImageFont.truetype(str(path), size=2 * canvas)
        for j, ch in enumerate(chars):
            big = Image.new("L", (4 * canvas, 4 * canvas), 0)
            draw = ImageDraw.Draw(big)
            draw.text((canvas, canvas), ch, fill=255, font=font)
            bbox = big.getbbox()
            if bbox is None:
                raise SelfmaskError(f"font {name!r} has no visible glyph for {ch!r}")
            glyph = big.crop(bbox)
            w, h = glyph.size
            scale = box / max(w, h)
            glyph = glyph.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
            tile = Image.new("L", (canvas, canvas), 0)
            tile.paste(glyph, ((canvas - glyph.size[0]) // 2, (canvas - glyph.size[1]) // 2))
            out[i, j] = torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255.0)
    return out


def handwritten_digit_masks(canvas: int = CANVAS) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 handwritten 8 x 8 digits as masks ``(N, canvas, canvas)`` plus labels ``(N,)``.

    The 0-16 grey levels are upsampled bicubically to the glyph box and sharpened with a
    smoothstep, so strokes look like pen strokes rather than blurred squares.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / 16.0).unsqueeze(1)
    box = round(GLYPH_BOX * canvas / 64)
    big = F.interpolate(small, size=(box, box), mode="bicubic", align_corners=False).clamp_(0, 1)
    big = _smoothstep((big - 0.2) / 0.4)
    pad = (canvas - box) // 2
    masks = F.pad(big, (pad, canvas - box - pad, pad, canvas - box - pad)).squeeze(1)
    return masks, torch.from_numpy(np.asarray(digits.target, dtype=np.int64))


def _smoothstep(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(0, 1)
    return x * x * (3 - 2 * x)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


COLOUR_SCHEMES = ("random", "mono")
MONO_BACKGROUND = 0.2  # grey level of the background in the "mono" colour scheme
MONO_GLYPH = 0.8  # grey level of the glyph in the "mono" colour scheme


@dataclass(frozen=True)
class Appearance:
    """How glyphs are placed and painted in one domain (ranges are sampled uniformly per image).

    Attributes:
        rotation_deg: maximum absolute rotation in degrees.
        scale: range of the glyph's size relative to the image side.
        shear: maximum absolute shear (x offset per unit y).
        max_shift: maximum centre offset as a fraction of the image side (clamped so the glyph stays inside).
        textures: background texture kinds drawn from, any of ``"grating"``, ``"blobs"``, ``"checker"``, ``"noise"``,
            ``"flat"`` (a plain colour with pixel grain).
        min_contrast: minimum luminance gap between glyph colour and background mean, in [0, 1].
        distractor_prob: probability of one extra random stroke (a thick line segment) per image.
        colours: ``"random"`` (a random glyph colour over a random background colour per image) or
            ``"mono"`` (every image: a light grey glyph over a dark grey background, so colour carries
            nothing that tells one image from another).
    """

    rotation_deg: float = 25.0
    scale: tuple[float, float] = (0.55, 0.95)
    shear: float = 0.2
    max_shift: float = 0.25
    textures: tuple[str, ...] = ("grating", "blobs", "noise")
    min_contrast: float = 0.25
    distractor_prob: float = 0.5
    colours: str = "random"

    def __post_init__(self) -> None:
        if self.colours not in COLOUR_SCHEMES:
            raise SelfmaskError(f"Appearance.colours: unknown scheme {self.colours!r}; expected one of {COLOUR_SCHEMES}")

    def to_dict(self) -> dict[str, object]:
        return {
            "rotation_deg": self.rotation_deg,
            "scale": list(self.scale),
            "shear": self.shear,
            "max_shift": self.max_shift,
            "textures": list(self.textures),
            "min_contrast": self.min_contrast,
            "distractor_prob": self.distractor_prob,
            "colours": self.colours,
        }


def warp_masks(masks: torch.Tensor, size: int, app: Appearance, gen: torch.Generator) -> torch.Tensor:
    """Random affine warp of canvas masks ``(B, S, S)`` into alphas ``(B, 1, size, size)``."""
    n = masks.shape[0]
    angle = _uniform(n, -app.rotation_deg, app.rotation_deg, gen) * (math.pi / 180)
    size_rel = _uniform(n, *app.scale, gen)  # the ink's longer side relative to the output image side
    shear = _uniform(n, -app.shear, app.shear, gen)
    # normalised coords span 2 units; the centre may move by at most the free room (1 - size_rel)
    room = torch.minimum((1 - size_rel).clamp(min=0), torch.full_like(size_rel, 2 * app.max_shift))
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * room[:, None]
    cos, sin = torch.cos(angle), torch.sin(angle)
    # forward map (canvas -> output): p_out = zoom * R * Sh * p_in + shift; affine_grid needs its inverse
    rot_inv = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
    shear_inv = torch.eye(2).repeat(n, 1, 1)
    shear_inv[:, 0, 1] = -shear
    zoom = size_rel * (CANVAS / GLYPH_BOX)
    lin = shear_inv @ rot_inv / zoom[:, None, None]
    theta = torch.cat([lin, -(lin @ shift[:, :, None])], 2)
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    smooth = F.avg_pool2d(masks[:, None], 3, 1, 1)  # light pre-blur against aliasing when shrinking ~2x
    return F.grid_sample(smooth, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _luminance(rgb: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, *([1] * (rgb.dim() - 2)))
    return (rgb * w).sum(1, keepdim=True)


def textures(n: int, size: int, kinds: tuple[str, ...], gen: torch.Generator) -> torch.Tensor:
    """Random coloured backgrounds ``(n, 3, size, size)`` in [0, 1], one kind per image from ``kinds``."""
    known = ("grating", "blobs", "checker", "noise", "flat")
    for k in kinds:
        if k not in known:
            raise SelfmaskError(f"unknown texture kind {k!r}; expected one of {known}")
    base = torch.rand(n, 3, 1, 1, generator=gen) * 0.8 + 0.1
    tint = torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1
    amp = _uniform(n, 0.1, 0.35, gen).view(n, 1, 1, 1)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    # every kind is computed for every image (cheap at 32 px) and one is selected, so the
    # random stream does not depend on which kind an image got
    ang = _uniform(n, 0, math.pi, gen).view(n, 1, 1)
    freq = _uniform(n, 1.5, 6.0, gen).view(n, 1, 1)
    phase = _uniform(n, 0, 2 * math.pi, gen).view(n, 1, 1)
    grating = torch.sin(2 * math.pi * freq * (xs * torch.cos(ang) + ys * torch.sin(ang)) + phase)
    blobs = F.interpolate(
        torch.randn(n, 1, 5, 5, generator=gen), size=(size, size), mode="bicubic", align_corners=False
    )
    blobs = blobs[:, 0].clamp(-2, 2) / 1.5
    cells = torch.randint(2, 7, (n,), generator=gen).view(n, 1, 1).float()
    checker = torch.remainder(torch.floor(xs * cells + phase) + torch.floor(ys * cells), 2) * 2 - 1
    noise = F.avg_pool2d(torch.randn(n, 1, size, size, generator=gen), 3, 1, 1)[:, 0] * 2
    stack = torch.stack([grating, blobs, checker, noise, torch.zeros_like(noise)], 1)
    choice = torch.tensor([known.index(k) for k in kinds])[torch.randint(len(kinds), (n,), generator=gen)]
    pattern = stack[torch.arange(n), choice]
    bg = base + amp * tint * pattern[:, None]
    grain = torch.randn(n, 3, size, size, generator=gen) * _uniform(n, 0.0, 0.06, gen).view(n, 1, 1, 1)
    return (bg + grain).clamp(0, 1)


def _strokes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random thick line segment per image, as alphas ``(n, 1, size, size)``."""
    p0 = torch.rand(n, 2, generator=gen)
    p1 = torch.rand(n, 2, generator=gen)
    width = _uniform(n, 0.03, 0.07, gen)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    pts = torch.stack([xs, ys], -1).view(1, size * size, 2)
    d = (p1 - p0)[:, None]
    t = (((pts - p0[:, None]) * d).sum(-1) / (d * d).sum(-1).clamp(min=1e-6)).clamp(0, 1)
    dist = (pts - (p0[:, None] + t[..., None] * d)).norm(dim=-1)
    alpha = (1 - (dist - width[:, None]) * size).clamp(0, 1)
    return alpha.view(n, 1, size, size)


def compose(masks: torch.Tensor, size: int, app: Appearance, gen: torch.Generator) -> torch.Tensor:
    """Render canvas masks ``(B, S, S)`` as uint8 images ``(B, 3, size, size)`` with ``app``'s appearance."""
    n = masks.shape[0]
    alpha = warp_masks(masks, size, app, gen)
    bg = textures(n, size, app.textures, gen)
    # glyph colour: a random colour pushed away from the background's mean luminance
    fg = torch.rand(n, 3, 1, 1, generator=gen)
    bg_lum = _luminance(bg.mean((2, 3), keepdim=True))
    fg_lum = _luminance(fg)
    gap = fg_lum - bg_lum
    direction = torch.where(gap.abs() < 1e-3, torch.where(bg_lum < 0.5, 1.0, -1.0), gap.sign())
    need = (app.min_contrast - gap.abs()).clamp(min=0)
    fg = (fg + (direction * need)).clamp(0, 1)
    if app.colours == "mono":  # same draws as "random", so the rest of the random stream is unchanged
        bg = (bg - bg.mean((2, 3), keepdim=True) + MONO_BACKGROUND).clamp(0, 1)
        fg = torch.full_like(fg, MONO_GLYPH)
    fg_tex = 1 + 0.15 * (torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * textures(n, size, ("blobs",), gen)
    img = bg * (1 - alpha) + (fg * fg_tex).clamp(0, 1) * alpha
    stroke = _strokes(n, size, gen) * (torch.rand(n, 1, 1, 1, generator=gen) < app.distractor_prob)
    stroke_col = torch.rand(n, 3, 1, 1, generator=gen)
    img = img * (1 - stroke) + stroke_col * stroke
    return (img.clamp(0, 1) * 255).round_().to(torch.uint8)
