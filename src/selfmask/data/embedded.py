"""The embedded benchmark: a real transfer problem built only from data inside installed packages.

Two domains, each with a train and a test split, 32 x 32 RGB, deterministic from a seed:

* **pretrain domain** - 26 classes, the letters A-Z (upper and lower case share a class),
  rendered in 12 upright fonts shipped with matplotlib (DejaVu Sans/Serif/Mono regular and
  bold, STIX General regular and bold, Computer Modern roman, bold, sans and typewriter).
* **downstream domain** - 10 classes, the digits 0-9: half of them scikit-learn's handwritten
  digits (the source images are split between train and test, so no handwriting sample is
  seen in both), half rendered in 8 slanted fonts that the pretrain domain never uses
  (DejaVu obliques and italics, STIX italics, Computer Modern italic and math italic, whose
  digits are old-style). Version 2 paints every digit in one colour scheme (a light grey glyph
  on a plain dark grey background, no distractor stroke), so that two augmented views of an image
  share mainly the glyph; version 1's random textures and colours identified each image and gave a
  self-supervised objective a shortcut (docs/embedded.md).

The pretraining images place each glyph with a random rotation, scale, shear and shift, paint it in
a random colour over a random textured background, and half of them get a distractor stroke, so
raw pixels carry little class information and features matter; downstream images keep the random
pose (measured numbers in ``docs/embedded.md``). The four splits are cached in one safetensors file keyed by
the size variant, the seed and :data:`EMBEDDED_VERSION`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfmask.data.base import ImageTensorDataset
from selfmask.data.render import Appearance, compose, handwritten_digit_masks, render_glyph_masks
from selfmask.errors import SelfmaskError
from selfmask.io import atomic_save_safetensors

EMBEDDED_VERSION = "2"  # bump whenever a change alters any pixel, so stale caches are never read
#: the random streams are keyed by this, not by the version, so version 2 draws exactly what version 1 drew:
#: the pretraining splits are bit-identical to version 1's, the downstream splits the same glyphs and poses.
_STREAM_VERSION = "1"
RESOLUTION = 32

PRETRAIN_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)
DOWNSTREAM_FONTS = (
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "STIXGeneralItalic.ttf",
    "cmti10.ttf",
    "cmmi10.ttf",
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
DIGITS = "0123456789"

PRETRAIN_APPEARANCE = Appearance(textures=("grating", "blobs", "noise"))
#: version 1's downstream appearance, kept for ablations (tools/smn_levers.py)
DOWNSTREAM_APPEARANCE_V1 = Appearance(textures=("checker", "blobs", "noise"))
#: version 2: digits in one colour scheme on a plain background, no distractor strokes. What two augmented
#: views of one image share is then mostly the glyph, not a texture or a colour that identifies the image,
#: so a self-supervised objective has the class-bearing content to learn from (docs/embedded.md, docs/swav.md).
DOWNSTREAM_APPEARANCE = Appearance(textures=("flat",), distractor_prob=0.0, colours="mono")
HANDWRITTEN_FRACTION = 0.5  # share of downstream images drawn from scikit-learn's handwritten digits
HANDWRITTEN_TRAIN_FRACTION = 2 / 3  # share of the 1,797 handwriting sources reserved for the train split

SIZES: dict[str, dict[str, int]] = {
    "default": {"pretrain_train": 15000, "pretrain_test": 2000, "downstream_train": 3000, "downstream_test": 1500},
    "tiny": {"pretrain_train": 260, "pretrain_test": 104, "downstream_train": 200, "downstream_test": 100},
}
SPLITS = ("pretrain_train", "pretrain_test", "downstream_train", "downstream_test")


@dataclass
class EmbeddedBenchmark:
    """The four splits of the embedded benchmark and how they were built."""

    pretrain_train: ImageTensorDataset
    pretrain_test: ImageTensorDataset
    downstream_train: ImageTensorDataset
    downstream_test: ImageTensorDataset
    meta: dict[str, object] = field(default_factory=dict)

    def split(self, name: str) -> ImageTensorDataset:
        if name not in SPLITS:
            raise SelfmaskError(f"unknown embedded split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def default_cache_dir() -> Path:
    """``$SELFMASK_CACHE`` if set, else ``~/.cache/selfmask``."""
    env = os.environ.get("SELFMASK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfmask"


def cache_path(seed: int, size: str, cache_dir: str | Path | None = None) -> Path:
    """Where :func:`load_embedded` caches the benchmark for ``seed`` and ``size``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"embedded-v{EMBEDDED_VERSION}-{size}-seed{seed}.safetensors"


def _generator(seed: int, split: str) -> torch.Generator:
    """An independent, reproducible random stream per (seed, split)."""
    digest = hashlib.sha256(f"selfmask-embedded-v{_STREAM_VERSION}:{seed}:{split}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _balanced_labels(n: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    labels = torch.arange(n) % num_classes
    return labels[torch.randperm(n, generator=gen)]


def _render_pretrain(n: int, glyphs: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``glyphs``: (fonts, 52, S, S) with upper case then lower case letters."""
    labels = _balanced_labels(n, len(LETTERS), gen)
    font = torch.randint(glyphs.shape[0], (n,), generator=gen)
    lower = torch.randint(2, (n,), generator=gen)
    masks = glyphs[font, labels + lower * len(LETTERS)]
    return _compose_chunked(masks, PRETRAIN_APPEARANCE, gen), labels


def _render_downstream(
    n: int, glyphs: torch.Tensor, hand: torch.Tensor, hand_labels: torch.Tensor, gen: torch.Generator,
    appearance: Appearance = DOWNSTREAM_APPEARANCE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``glyphs``: (fonts, 10, S, S) digits; ``hand``/``hand_labels``: this split's handwriting sources."""
    labels = _balanced_labels(n, len(DIGITS), gen)
    use_hand = torch.rand(n, generator=gen) < HANDWRITTEN_FRACTION
    font = torch.randint(glyphs.shape[0], (n,), generator=gen)
    masks = glyphs[font, labels].clone()
    pick = torch.rand(n, generator=gen)
    for c in range(len(DIGITS)):
        pool = torch.nonzero(hand_labels == c).flatten()
        rows = torch.nonzero(use_hand & (labels == c)).flatten()
        if len(rows):
            masks[rows] = hand[pool[(pick[rows] * len(pool)).long().clamp(max=len(pool) - 1)]]
    return _compose_chunked(masks, appearance, gen), labels


@functools.lru_cache(maxsize=2)
def _glyph_sources() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Letter masks, digit masks, handwriting masks and labels: seed-independent, so rendered once per process."""
    letters = render_glyph_masks(list(PRETRAIN_FONTS), LETTERS + LETTERS.lower())
    digits = render_glyph_masks(list(DOWNSTREAM_FONTS), DIGITS)
    hand, hand_labels = handwritten_digit_masks()
    return letters, digits, hand, hand_labels


def _compose_chunked(masks: torch.Tensor, app: Appearance, gen: torch.Generator, chunk: int = 2048) -> torch.Tensor:
    return torch.cat([compose(masks[i : i + chunk], RESOLUTION, app, gen) for i in range(0, len(masks), chunk)])


def build_embedded(
    seed: int = 0, size: str = "default", downstream_appearance: Appearance | None = None
) -> EmbeddedBenchmark:
    """Build the benchmark from scratch (no cache); see the module docstring for its design.

    ``downstream_appearance`` replaces :data:`DOWNSTREAM_APPEARANCE` (for ablations such as
    ``tools/smn_levers.py``: the same glyphs and poses painted another way; never cached).
    """
    down_app = downstream_appearance or DOWNSTREAM_APPEARANCE
    if size not in SIZES:
        raise SelfmaskError(f"unknown embedded benchmark size {size!r}; expected one of {sorted(SIZES)}")
    if not isinstance(seed, int) or seed < 0:
        raise SelfmaskError(f"embedded benchmark seed must be a non-negative int, got {seed!r}")
    start = time.perf_counter()
    sizes = SIZES[size]
    with torch.random.fork_rng(devices=[]):  # never disturb the caller's global RNG
        letters, digits, hand, hand_labels = _glyph_sources()  # read-only below (indexing copies)
        order = torch.randperm(len(hand), generator=_generator(seed, "handwriting"))
        n_train = round(HANDWRITTEN_TRAIN_FRACTION * len(hand))
        hand_split = {"downstream_train": order[:n_train], "downstream_test": order[n_train:]}
        data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split in SPLITS:
            gen = _generator(seed, split)
            if split.startswith("pretrain"):
                data[split] = _render_pretrain(sizes[split], letters, gen)
            else:
                idx = hand_split[split]
                data[split] = _render_downstream(sizes[split], digits, hand[idx], hand_labels[idx], gen, down_app)
    meta: dict[str, object] = {
        "name": "embedded",
        "version": EMBEDDED_VERSION,
        "seed": seed,
        "size": size,
        "resolution": RESOLUTION,
        "sizes": dict(sizes),
        "pretrain_classes": list(LETTERS),
        "downstream_classes": list(DIGITS),
        "pretrain_fonts": list(PRETRAIN_FONTS),
        "downstream_fonts": list(DOWNSTREAM_FONTS),
        "handwritten_fraction": HANDWRITTEN_FRACTION,
        "handwritten_sources": {k: len(v) for k, v in hand_split.items()},
        "pretrain_appearance": PRETRAIN_APPEARANCE.to_dict(),
        "downstream_appearance": down_app.to_dict(),
        "sources": "matplotlib mpl-data TrueType fonts + sklearn.datasets.load_digits (no download)",
        "build_seconds": round(time.perf_counter() - start, 3),
    }
    return _assemble(data, meta)


def _assemble(data: dict[str, tuple[torch.Tensor, torch.Tensor]], meta: dict[str, object]) -> EmbeddedBenchmark:
    def make(split: str) -> ImageTensorDataset:
        classes = meta["pretrain_classes"] if split.startswith("pretrain") else meta["downstream_classes"]
        images, labels = data[split]
        return ImageTensorDataset(images, labels, list(classes), f"embedded/{split}", {"split": split})  # type: ignore[arg-type]

    return EmbeddedBenchmark(**{s: make(s) for s in SPLITS}, meta=meta)


def save_embedded(bench: EmbeddedBenchmark, path: str | Path) -> None:
    """Write the four splits and ``meta`` to one safetensors file, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for split in SPLITS:
        ds = bench.split(split)
        tensors[f"{split}.images"] = ds.images
        tensors[f"{split}.labels"] = ds.labels
    meta = {k: v for k, v in bench.meta.items() if k not in ("cache_path", "loaded_from_cache")}
    atomic_save_safetensors(path, tensors, {"meta": json.dumps(meta)})


def read_embedded(path: str | Path) -> EmbeddedBenchmark:
    """Read a file written by :func:`save_embedded`; a malformed file raises :class:`SelfmaskError`."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["meta"])
            data = {s: (f.get_tensor(f"{s}.images"), f.get_tensor(f"{s}.labels")) for s in SPLITS}
    except (OSError, KeyError, ValueError, RuntimeError) as exc:  # safetensors raises SafetensorError(Exception)
        raise SelfmaskError(f"{path}: not a valid embedded benchmark cache ({exc})") from exc
    except Exception as exc:
        raise SelfmaskError(f"{path}: not a valid embedded benchmark cache ({exc})") from exc
    return _assemble(data, meta)


def load_embedded(seed: int = 0, cache_dir: str | Path | None = None, size: str = "default") -> EmbeddedBenchmark:
    """The embedded benchmark for ``seed``: read from the cache, or built and cached on first use.

    ``meta["loaded_from_cache"]`` says which happened and ``meta["cache_path"]`` where the file is.
    A cache file that cannot be read, or that was built for other settings, is rebuilt (with a
    warning) and replaced atomically.
    """
    if size not in SIZES:
        raise SelfmaskError(f"unknown embedded benchmark size {size!r}; expected one of {sorted(SIZES)}")
    path = cache_path(seed, size, cache_dir)
    bench: EmbeddedBenchmark | None = None
    if path.is_file():
        try:
            bench = read_embedded(path)
        except SelfmaskError as exc:
            warnings.warn(f"rebuilding the embedded benchmark: {exc}", stacklevel=2)
        else:
            wanted = (EMBEDDED_VERSION, seed, size)
            if (bench.meta.get("version"), bench.meta.get("seed"), bench.meta.get("size")) != wanted:
                warnings.warn(f"rebuilding the embedded benchmark: {path} was built for other settings", stacklevel=2)
                bench = None
            else:
                bench.meta["loaded_from_cache"] = True
    if bench is None:
        bench = build_embedded(seed, size)
        try:
            save_embedded(bench, path)
        except OSError as exc:
            warnings.warn(f"could not cache the embedded benchmark at {path}: {exc}", stacklevel=2)
        bench.meta["loaded_from_cache"] = False
    bench.meta["cache_path"] = str(path)
    return bench
