"""Mask files: codecs, container, save/load/apply/merge, MaskBank and every bad input of issue 6."""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from selfmask.backbones import build_backbone
from selfmask.errors import SelfmaskError
from selfmask.fingerprint import model_fingerprint
from selfmask.masking import MaskConfig, binary_entropy, current_masks, mask_model, mask_scores
from selfmask.storage import (
    MaskBank,
    apply_mask,
    codecs,
    decode_mask_file,
    encode_mask_file,
    load_mask,
    merge_mask,
    save_mask,
)
from selfmask.storage.container import write_container

DENSITIES = [0.0, 0.5, 0.7, 0.9, 0.923, 0.99, 0.999, 1.0]
SHAPES = [(1,), (7,), (3, 5), (16, 8, 3, 3), (4000,)]


def random_mask(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def masked_tiny(density: float = 0.9, seed: int = 0, config: MaskConfig | None = None) -> torch.nn.Module:
    """resnet_tiny (base seed 0) masked, with random scores giving about ``density`` active."""
    torch.manual_seed(0)
    model = mask_model(build_backbone("resnet_tiny"), config or MaskConfig.preset("resnet"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in mask_scores(model).values():
            s.copy_(torch.rand(s.shape, generator=g) - (1 - density))
    return model.eval()


def plain_tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone("resnet_tiny").eval()


def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))


# ---------------------------------------------------------------- codecs


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_codec_round_trip_and_size_near_entropy(shape: tuple[int, ...], density: float) -> None:
    flat = random_mask(shape, density, seed=len(shape)).reshape(-1).numpy()
    n, k = flat.size, int(flat.sum())
    codec, payload = codecs.encode_best(flat)
    assert np.array_equal(codecs.decode(payload, codec, n, k), flat)
    # the smallest codec is at most the n * H(p) bound plus two ANS words, never above packbits
    assert len(payload) <= math.ceil(n / 8)
    assert len(payload) * 8 <= n * binary_entropy(k / n) + 64
    if k in (0, n):
        assert codec == "const" and payload == b""
    rows = shape[0] if len(shape) >= 2 else None
    weights = torch.randn(n, generator=torch.Generator().manual_seed(n)).numpy()
    for name in codecs.CODECS:
        if (name == "const" and k not in (0, n)) or (name == "ans-channel" and rows is None):
            continue
        payload = codecs.encode(flat, name, rows=rows, weights=weights)
        assert np.array_equal(codecs.decode(payload, name, n, k, rows=rows, weights=weights), flat)
    # given the base weights of a mask that does not depend on them: never bigger than without
    assert len(codecs.encode_best(flat, rows, weights)[1]) <= len(codecs.encode_best(flat, rows)[1])


def structured_mask(rows: int = 32, cols: int = 300, seed: int = 0) -> torch.Tensor:
    """Rows (output channels) of very different densities, some all ones or all zeros."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(rows, 1, generator=g)
    density[:3] = torch.tensor([[0.0], [1.0], [1.0]])
    return torch.rand(rows, cols, generator=g) < density


def test_channel_codec_wins_on_structured_masks() -> None:
    flat = structured_mask().reshape(-1).numpy()
    k = int(flat.sum())
    codec, payload = codecs.encode_best(flat, rows=32)
    assert codec == "ans-channel"
    assert len(payload) < len(codecs.encode(flat, "ans"))
    assert np.array_equal(codecs.decode(payload, codec, flat.size, k, rows=32), flat)
    with pytest.raises(SelfmaskError, match="row count"):
        codecs.decode(payload, codec, flat.size, k, rows=7)
    with pytest.raises(SelfmaskError, match="decoded|corrupt"):
        codecs.decode(payload, codec, flat.size, k - 1, rows=32)
    uniform = random_mask((32, 300), 0.9).reshape(-1).numpy()
    assert codecs.encode_best(uniform, rows=32)[0] == "ans"  # no channel structure: per-tensor wins


def test_codec_rejects_bad_payloads() -> None:
    flat = random_mask((1000,), 0.9).numpy()
    k = int(flat.sum())
    packed = codecs.encode(flat, "packbits")
    coded = codecs.encode(flat, "ans")
    with pytest.raises(SelfmaskError, match="payload bytes"):
        codecs.decode(packed[:-1], "packbits", 1000, k)
    with pytest.raises(SelfmaskError, match="decoded"):
        codecs.decode(packed, "packbits", 1000, k - 1)
    with pytest.raises(SelfmaskError, match="4-byte words"):
        codecs.decode(coded[:-1], "ans", 1000, k)
    with pytest.raises(SelfmaskError, match="too short"):
        codecs.decode(coded[:4], "ans", 1000, k)
    with pytest.raises(SelfmaskError, match="unknown codec"):
        codecs.decode(coded, "zip", 1000, k)
    with pytest.raises(SelfmaskError, match="const"):
        codecs.decode(b"", "const", 1000, k)


# ---------------------------------------------------------------- file bytes


def sample_masks() -> dict[str, torch.Tensor]:
    masks = {}
    for i, (shape, density) in enumerate(zip(SHAPES * 2, DENSITIES + [0.6, 0.95])):
        masks[f"block{i}.conv.weight"] = random_mask(shape, density, seed=i)
    masks["all_ones.weight"] = torch.ones(5, 6, dtype=torch.bool)
    masks["all_zeros.weight"] = torch.zeros(9, dtype=torch.bool)
    masks["structured.weight"] = structured_mask(16, 36).reshape(16, 4, 3, 3)
    return masks


def sample_file(extra: dict[str, torch.Tensor] | None = None) -> tuple[bytes, dict[str, torch.Tensor]]:
    masks = sample_masks()
    data, _ = encode_mask_file(
        masks, backbone="toy", fingerprint="ab" * 32, config=MaskConfig(targets=["weight"]), extra=extra
    )
    return data, masks


def test_file_round_trip_bit_identical_with_extras() -> None:
    extra = {
        "head.weight": torch.randn(3, 4),
        "head.bias": torch.randn(3).to(torch.bfloat16),
        "counts": torch.arange(5),
    }
    data, masks = sample_file(extra)
    mf = decode_mask_file(data)
    assert list(mf.masks) == list(masks)
    for name, m in masks.items():
        assert mf.masks[name].dtype == torch.bool and torch.equal(mf.masks[name], m), name
    for name, t in extra.items():
        assert mf.extra[name].dtype == t.dtype and torch.equal(mf.extra[name], t), name
    assert mf.backbone == "toy" and mf.fingerprint == "ab" * 32
    assert mf.config == MaskConfig(targets=["weight"])
    info = {i.name: i for i in mf.tensors}
    assert info["all_ones.weight"].codec == "const" and info["all_zeros.weight"].payload_bytes == 0
    assert info["structured.weight"].codec == "ans-channel"
    assert mf.summary()["header_bytes"] < 4096


def test_file_is_a_safetensors_container(tmp_path) -> None:
    data, _ = sample_file({"head.weight": torch.ones(2, 2)})
    path = tmp_path / "m.mask"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {"index", "masks", "extra.head.weight"}
        assert json.loads(f.metadata()["selfmask"])["format"] == "selfmask.mask"
    assert torch.equal(load_file(str(path))["extra.head.weight"], torch.ones(2, 2))


def test_truncated_file_is_a_clear_error() -> None:
    data, _ = sample_file()
    (n_header,) = struct.unpack("<Q", data[:8])
    for cut in sorted({0, 3, 8, 20, 8 + n_header // 2, 8 + n_header, len(data) // 2, len(data) - 1}):
        with pytest.raises(SelfmaskError, match="truncated|corrupt|header|bytes"):
            decode_mask_file(data[:cut], "m.mask")


def test_every_flipped_byte_is_a_clear_error() -> None:
    data, _ = sample_file()
    rng = np.random.default_rng(0)
    positions = list(range(0, len(data), max(1, len(data) // 300))) + [len(data) - 1]
    for pos in positions:
        mutated = bytearray(data)
        mutated[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(SelfmaskError):
            decode_mask_file(bytes(mutated), "m.mask")


def test_random_mutations_never_crash() -> None:
    data, _ = sample_file()
    rng = np.random.default_rng(1)
    for _ in range(150):
        mutated = bytearray(data)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
            mutated[pos] = int(rng.integers(256))
        cut = len(mutated) if rng.random() < 0.7 else int(rng.integers(len(mutated)))
        try:
            decode_mask_file(bytes(mutated[:cut]))
        except SelfmaskError:
            pass


def _forged(meta_changes: dict, index: list | None = None, blob: bytes = b"") -> bytes:
    """A file with a valid checksum but a hand-made header (for checks behind the checksum)."""
    import zlib

    meta = {
        "format": "selfmask.mask",
        "version": 1,
        "backbone": "toy",
        "fingerprint": "ab" * 32,
        "mask_config": MaskConfig(targets=["weight"]).to_dict(),
        "source": {},
        "tensors": len(index or []),
    }
    meta.update(meta_changes)
    idx = zlib.compress(json.dumps(index or []).encode())
    return write_container(meta, {"index": ("U8", (len(idx),), idx), "masks": ("U8", (len(blob),), blob)})


def test_unknown_version_and_forged_headers() -> None:
    with pytest.raises(SelfmaskError, match="unknown format version 99; this selfmask reads versions 1, 2, 3"):
        decode_mask_file(_forged({"version": 99}))
    with pytest.raises(SelfmaskError, match="unknown format version True"):
        decode_mask_file(_forged({"version": True}))
    weighted = [{"name": "w", "shape": [10], "active": 3, "codec": "ans-weight", "bytes": 0}]
    for version in (1, 2):
        with pytest.raises(SelfmaskError, match=f"codec 'ans-weight' is not part of format version {version}"):
            decode_mask_file(_forged({"version": version}, weighted))
    with pytest.raises(SelfmaskError, match="not a selfmask mask file"):
        decode_mask_file(_forged({"format": "other"}))
    huge = [{"name": "w", "shape": [2**39, 2**39], "active": 0, "codec": "const", "bytes": 0}]
    with pytest.raises(SelfmaskError, match="mask entries"):
        decode_mask_file(_forged({}, huge))
    over = [{"name": "w", "shape": [10], "active": 3, "codec": "packbits", "bytes": 2}]
    with pytest.raises(SelfmaskError, match="exceed"):
        decode_mask_file(_forged({}, over, b"\x07"))
    with pytest.raises(SelfmaskError, match="invalid mask_config"):
        decode_mask_file(_forged({"mask_config": {"mode": "nope"}}))
    bogus = [{"name": "w", "shape": [10], "active": 11, "codec": "packbits", "bytes": 2}]
    with pytest.raises(SelfmaskError, match="active count"):
        decode_mask_file(_forged({}, bogus, b"\xff\x03"))
    from selfmask.storage.container import _tensor_table

    overflow = {"extra.x": {"dtype": "F32", "shape": [2**39] * 8, "data_offsets": [0, 0]}}  # 2**312 wraps to 0
    with pytest.raises(SelfmaskError, match="bytes for shape"):
        _tensor_table(overflow, 0, "m.mask")
    with pytest.raises(SelfmaskError, match="truncated or not a mask file"):
        decode_mask_file(struct.pack("<Q", 2**62) + b"{}")


# ---------------------------------------------------------------- save / load / apply / merge


@pytest.mark.parametrize("density", [0.5, 0.9, 0.999])
def test_save_load_apply_identical_masks_and_outputs(tmp_path, density: float) -> None:
    model = masked_tiny(density, seed=int(density * 1000))
    path = tmp_path / "a.mask"
    infos = save_mask(model, path, extra={"head.weight": torch.ones(2)})
    assert {i.name for i in infos} == set(mask_scores(model))
    mf = load_mask(path)
    for name, m in current_masks(model).items():
        assert torch.equal(mf.masks[name], m)
    plain = plain_tiny()
    apply_mask(plain, mf)
    for name, m in current_masks(plain).items():
        assert torch.equal(m, mf.masks[name])
    x = inputs()
    assert torch.equal(plain(x), model(x))
    # applying to a model that is already masked works too
    other = masked_tiny(0.6, seed=99)
    apply_mask(other, path)
    assert torch.equal(other(x), model(x))


def test_merged_export_loads_into_plain_backbone(tmp_path) -> None:
    model = masked_tiny(0.8, seed=3)
    save_mask(model, tmp_path / "a.mask")
    merged = merge_mask(plain_tiny(), tmp_path / "a.mask")
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(tmp_path / "merged.safetensors"))
    fresh = build_backbone("resnet_tiny")
    fresh.load_state_dict(load_file(str(tmp_path / "merged.safetensors")), strict=True)
    fresh.eval()
    x = inputs()
    assert not any("parametrizations" in k for k in fresh.state_dict())
    assert torch.equal(fresh(x), model(x))


def test_fingerprint_mismatch_refused_unless_forced(tmp_path) -> None:
    model = masked_tiny(0.8)
    save_mask(model, tmp_path / "a.mask")
    other = plain_tiny(seed=1)
    with pytest.raises(SelfmaskError, match="fingerprint"):
        apply_mask(other, tmp_path / "a.mask")
    assert model_fingerprint(other) == model_fingerprint(plain_tiny(seed=1))  # untouched
    with pytest.warns(UserWarning, match="fingerprint"):
        apply_mask(other, tmp_path / "a.mask", force=True)
    assert all(torch.equal(m, current_masks(model)[n]) for n, m in current_masks(other).items())


def test_name_and_shape_mismatch(tmp_path) -> None:
    model = masked_tiny(0.8)
    masks = current_masks(model)
    fp = model_fingerprint(model)
    renamed = {("x" + k if i == 0 else k): v for i, (k, v) in enumerate(masks.items())}
    data, _ = encode_mask_file(renamed, backbone="resnet_tiny", fingerprint=fp, config=MaskConfig.preset("resnet"))
    plain = plain_tiny()
    with pytest.raises(SelfmaskError, match="do not match the model.*conv1.weight"):
        apply_mask(plain, decode_mask_file(data))
    reshaped = dict(masks)
    first = next(iter(reshaped))
    reshaped[first] = reshaped[first].reshape(-1)
    data, _ = encode_mask_file(reshaped, backbone="resnet_tiny", fingerprint=fp, config=MaskConfig.preset("resnet"))
    with pytest.raises(SelfmaskError, match="shape"):
        apply_mask(plain, decode_mask_file(data))
    assert not hasattr(plain, "_selfmask_config")  # refused before masking anything


def test_existing_output_refused_and_untouched(tmp_path) -> None:
    model = masked_tiny(0.8)
    path = tmp_path / "a.mask"
    path.write_bytes(b"precious")
    with pytest.raises(SelfmaskError, match="exists"):
        save_mask(model, path)
    assert path.read_bytes() == b"precious"
    save_mask(model, path, overwrite=True)
    assert load_mask(path).backbone == "resnet_tiny"
    assert sorted(os.listdir(tmp_path)) == ["a.mask"]  # no temporary files left
    with pytest.raises(SelfmaskError, match="no masks"):
        save_mask(plain_tiny(), tmp_path / "b.mask")
    with pytest.raises(SelfmaskError, match="does not exist"):
        load_mask(tmp_path / "missing.mask")


def test_topk_masks_round_trip(tmp_path) -> None:
    config = MaskConfig.preset("resnet", mode="topk", keep_ratio=0.7)
    model = masked_tiny(0.5, config=config)
    save_mask(model, tmp_path / "k.mask")
    plain = apply_mask(plain_tiny(), tmp_path / "k.mask")
    x = inputs()
    assert torch.equal(plain(x), model(x))


def test_selective_file_stores_only_trainable_entries(tmp_path) -> None:
    config = MaskConfig.preset("resnet", trainable_fraction=0.25, seed=7)
    model = masked_tiny(0.5, config=config)
    full = masked_tiny(0.5)
    infos = save_mask(model, tmp_path / "s.mask")
    save_mask(full, tmp_path / "f.mask")
    for info in infos:
        assert info.coded == max(1, round(0.25 * info.numel))
    assert os.path.getsize(tmp_path / "s.mask") < 0.4 * os.path.getsize(tmp_path / "f.mask")
    mf = load_mask(tmp_path / "s.mask")
    assert all(torch.equal(mf.masks[n], m) for n, m in current_masks(model).items())
    plain = apply_mask(plain_tiny(), mf)
    x = inputs()
    assert torch.equal(plain(x), model(x))
    with pytest.raises(SelfmaskError, match="outside the trainable set"):
        encode_mask_file(current_masks(full), backbone="b", fingerprint="ab" * 32, config=config)


# ---------------------------------------------------------------- MaskBank


def test_mask_bank_switches_exactly(tmp_path) -> None:
    model_a, model_b = masked_tiny(0.9, seed=1), masked_tiny(0.6, seed=2)
    save_mask(model_a, tmp_path / "a.mask", extra={"head.weight": torch.ones(3)})
    save_mask(model_b, tmp_path / "b.mask")
    plain = plain_tiny()
    base = {k: v.clone() for k, v in plain.state_dict().items()}
    bank = MaskBank(plain)
    bank.add("a", tmp_path / "a.mask")
    bank.add("b", load_mask(tmp_path / "b.mask"))
    x = inputs()
    with torch.no_grad():
        out_a = bank.activate("a")(x)
        state_a = {k: v.clone() for k, v in plain.state_dict().items()}
        assert torch.equal(out_a, model_a(x))
        assert torch.equal(bank.activate("b")(x), model_b(x))
        bank.activate("a")
        merged_a = merge_mask(plain_tiny(), tmp_path / "a.mask").state_dict()
        for k, v in plain.state_dict().items():
            assert torch.equal(v.view(-1).view(torch.uint8), merged_a[k].view(-1).view(torch.uint8)), k
            assert torch.equal(v.view(-1).view(torch.uint8), state_a[k].view(-1).view(torch.uint8)), k
        bank.deactivate()
    for k, v in plain.state_dict().items():
        assert torch.equal(v.view(-1).view(torch.uint8), base[k].view(-1).view(torch.uint8)), k
    assert torch.equal(bank.extra("a")["head.weight"], torch.ones(3))
    n = sum(m.numel() for m in current_masks(model_a).values())
    assert bank.packed_bytes() == 2 * sum((m.numel() + 7) // 8 for m in current_masks(model_a).values())
    assert bank.original_bytes() == 4 * n


@pytest.mark.parametrize("numel", [1, 8, 13, 1000])
def test_unpack_bits_device_paths_agree(numel: int) -> None:
    from selfmask.storage.bank import unpack_bits_shifts, unpack_bits_torch

    flat = random_mask((numel,), 0.6, seed=numel)
    packed = torch.from_numpy(np.frombuffer(codecs.pack_bits(flat.numpy()), dtype=np.uint8).copy())
    assert torch.equal(unpack_bits_torch(packed, numel), flat)
    assert torch.equal(unpack_bits_shifts(packed, numel), flat)


def test_mask_bank_refuses_wrong_backbone(tmp_path) -> None:
    save_mask(masked_tiny(0.9), tmp_path / "a.mask")
    bank = MaskBank(plain_tiny(seed=4))
    with pytest.raises(SelfmaskError, match="fingerprint"):
        bank.add("a", tmp_path / "a.mask")
    with pytest.raises(SelfmaskError, match="fingerprint"):  # a loaded MaskFile is checked too
        bank.add("a", load_mask(tmp_path / "a.mask"))
    with pytest.raises(SelfmaskError, match="unknown task"):
        bank.activate("a")
    with pytest.raises(SelfmaskError, match="plain backbone"):
        MaskBank(masked_tiny(0.9))
