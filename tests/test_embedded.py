"""The embedded benchmark: deterministic from its seed, cached, right shapes and classes, no download."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from selfmask.data import embedded
from selfmask.data.embedded import SIZES, SPLITS, build_embedded, cache_path, load_embedded
from selfmask.data.render import Appearance, compose, render_glyph_masks
from selfmask.errors import SelfmaskError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[embedded.EmbeddedBenchmark, Path]:
    root = tmp_path_factory.mktemp("cache")
    return load_embedded(seed=0, cache_dir=root, size="tiny"), root


def test_shapes_dtypes_and_classes(tiny: tuple[embedded.EmbeddedBenchmark, Path]) -> None:
    bench, _ = tiny
    for split in SPLITS:
        ds = bench.split(split)
        n = SIZES["tiny"][split]
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
        expected = 26 if split.startswith("pretrain") else 10
        assert ds.num_classes == expected
        counts = torch.bincount(ds.labels, minlength=expected)
        assert int(counts.max() - counts.min()) <= 1  # balanced
    assert bench.pretrain_train.classes[0] == "A" and bench.downstream_train.classes == list("0123456789")
    meta = bench.meta
    assert meta["seed"] == 0 and meta["size"] == "tiny" and meta["sizes"] == SIZES["tiny"]
    assert not set(meta["pretrain_fonts"]) & set(meta["downstream_fonts"])  # fonts do not overlap across domains
    # images are not constant and use the full colour range
    assert float(bench.pretrain_train.images.float().std()) > 30


def test_second_load_reads_cache_and_matches(tiny: tuple[embedded.EmbeddedBenchmark, Path], monkeypatch) -> None:
    bench, root = tiny
    assert bench.meta["loaded_from_cache"] is False
    assert Path(bench.meta["cache_path"]) == cache_path(0, "tiny", root) and cache_path(0, "tiny", root).is_file()

    def no_build(*args, **kwargs):
        raise AssertionError("the second load must read the cache, not rebuild")

    monkeypatch.setattr(embedded, "build_embedded", no_build)
    again = load_embedded(seed=0, cache_dir=root, size="tiny")
    assert again.meta["loaded_from_cache"] is True
    for split in SPLITS:
        assert torch.equal(again.split(split).images, bench.split(split).images)
        assert torch.equal(again.split(split).labels, bench.split(split).labels)
    assert again.meta["pretrain_fonts"] == bench.meta["pretrain_fonts"]


def test_deterministic_from_seed(tiny: tuple[embedded.EmbeddedBenchmark, Path]) -> None:
    bench, _ = tiny
    torch.manual_seed(1234)  # the global RNG must not matter ...
    rebuilt = build_embedded(seed=0, size="tiny")
    state = torch.random.get_rng_state()
    other = build_embedded(seed=1, size="tiny")
    assert torch.equal(torch.random.get_rng_state(), state)  # ... and must not be disturbed
    for split in SPLITS:
        assert torch.equal(rebuilt.split(split).images, bench.split(split).images)
        assert torch.equal(rebuilt.split(split).labels, bench.split(split).labels)
        assert not torch.equal(other.split(split).images, bench.split(split).images)


def test_train_and_test_differ(tiny: tuple[embedded.EmbeddedBenchmark, Path]) -> None:
    bench, _ = tiny
    tr = bench.downstream_train.images.flatten(1)
    te = bench.downstream_test.images.flatten(1)
    assert not (tr[:, None, :] == te[None, :, :]).all(-1).any()  # no test image copied into train


def test_corrupt_cache_is_rebuilt_with_warning(tmp_path: Path) -> None:
    path = cache_path(3, "tiny", tmp_path)
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="rebuilding"):
        bench = load_embedded(seed=3, cache_dir=tmp_path, size="tiny")
    assert bench.meta["loaded_from_cache"] is False
    assert load_embedded(seed=3, cache_dir=tmp_path, size="tiny").meta["loaded_from_cache"] is True
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


def test_env_cache_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SELFMASK_CACHE", str(tmp_path / "c"))
    assert cache_path(0, "tiny").parent == tmp_path / "c"


def test_bad_settings_raise(tiny: tuple[embedded.EmbeddedBenchmark, Path], tmp_path: Path) -> None:
    with pytest.raises(SelfmaskError, match="size"):
        load_embedded(seed=0, cache_dir=tmp_path, size="huge")
    with pytest.raises(SelfmaskError, match="seed"):
        build_embedded(seed=-1, size="tiny")
    with pytest.raises(SelfmaskError, match="split"):
        tiny[0].split("validation")
    with pytest.raises(SelfmaskError, match="not found"):
        render_glyph_masks(["NoSuchFont.ttf"], "A")


def test_compose_keeps_glyph_visible() -> None:
    """The glyph must differ from its background: compare with the same draw and an empty mask."""
    masks = render_glyph_masks(["DejaVuSans.ttf"], "AB").flatten(0, 1).repeat(8, 1, 1)
    app = Appearance(distractor_prob=0.0)
    with_glyph = compose(masks, 32, app, torch.Generator().manual_seed(0)).float()
    without = compose(torch.zeros_like(masks), 32, app, torch.Generator().manual_seed(0)).float()
    per_image = (with_glyph - without).abs().mean((1, 2, 3))
    assert bool((per_image > 5).all())


def test_load_data_resizes_for_a_larger_backbone_input(tiny: tuple[embedded.EmbeddedBenchmark, Path]) -> None:
    """`--backbone efficientnet_lite0_64 --data embedded` gets 64 px images, not silently 32 px ones."""
    from selfmask.data.sources import load_data

    bench, root = tiny
    train, test = load_data("embedded-tiny", resolution=64, cache_dir=root)
    assert train.images.shape[1:] == (3, 64, 64) and test.resolution == 64
    assert torch.equal(train.labels, bench.downstream_train.labels) and train.meta["resized_from"] == 32
    same, _ = load_data("embedded-tiny", resolution=32, cache_dir=root)
    assert same.images is bench.downstream_train.images or torch.equal(same.images, bench.downstream_train.images)
    # bicubic upsampling: a 2x2 average of the 64 px image is close to the 32 px one
    down = torch.nn.functional.avg_pool2d(train.images.float(), 2)
    assert (down - bench.downstream_train.images.float()).abs().mean() < 8
