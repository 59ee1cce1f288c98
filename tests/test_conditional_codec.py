"""Mask bits coded given the base weights (codec 'ans-weight', format version 3; issue 19).

Masks whose pruning depends on weight magnitude are built here from resnet_tiny's base
weights: the file must be well below the per-tensor bound and close to the weight-conditioned
one; independent random masks must be no bigger than without the base. Files that need the
base decode only on it, after the fingerprint check.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfmask.backbones import build_backbone
from selfmask.cli.main import main
from selfmask.errors import SelfmaskError
from selfmask.fingerprint import model_fingerprint
from selfmask.masking import MaskConfig, current_masks, mask_model, mask_scores
from selfmask.masking.layer import selective_trainable_mask
from selfmask.masking.model import base_tensors
from selfmask.storage import MaskBank, apply_mask, codecs, conditional, decode_mask_file, encode_mask_file, load_mask
from selfmask.storage import save_mask
from selfmask.storage.bounds import tensor_bounds

BASE_SEED = 0


def plain(seed: int = BASE_SEED) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_backbone("resnet_tiny").eval()
    model.backbone_name = "resnet_tiny"
    return model


def magnitude_masks(weights: dict[str, torch.Tensor], seed: int = 1, off_max: float = 0.4) -> dict[str, torch.Tensor]:
    """Masks that prune small weights more: P(off) = off_max * (1 - rank(|w|) / n) ** 3 per tensor (90 % active)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, w in weights.items():
        rank = w.abs().flatten().argsort().argsort().to(torch.float64) / w.numel()
        p_off = off_max * (1 - rank) ** 3
        out[name] = (torch.rand(w.numel(), generator=g, dtype=torch.float64) >= p_off).view(w.shape)
    return out


def masked_with(masks: dict[str, torch.Tensor], config: MaskConfig | None = None) -> torch.nn.Module:
    """resnet_tiny (base seed 0) masked so that its masks are exactly ``masks``."""
    model = mask_model(plain(), config or MaskConfig.preset("resnet"))
    model.backbone_name = "resnet_tiny"
    with torch.no_grad():
        for name, s in mask_scores(model).items():
            s.copy_(torch.where(masks[name], 1.0, -1.0))
    return model


def tiny_weights() -> dict[str, torch.Tensor]:
    return base_tensors(mask_model(plain(), MaskConfig.preset("resnet")))


# ---------------------------------------------------------------- the codec on arrays


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(("rows", "cols", "density"), [(1, 1, 1.0), (1, 7, 0.5), (5, 3, 0.2), (64, 72, 0.9),
                                                      (300, 9, 0.97), (8, 2000, 0.6)])
def test_round_trip_exact_any_shape_dtype_and_ties(dtype, rows, cols, density) -> None:
    g = torch.Generator().manual_seed(rows * cols)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    flat = w.view(-1)
    flat[::3] = 0.0  # many ties in |w|
    flat[::5] = -0.0
    flat[1:-1:7] = -flat[2::7][: flat[1:-1:7].numel()]  # w and -w: ties again
    m = (torch.rand(rows, cols, generator=g) < density * (0.5 + w.abs().float().clamp(max=1))).reshape(-1).numpy()
    side = w.reshape(-1).to(torch.float64).numpy()
    for r in (rows, None):
        payload = codecs.encode(m, "ans-weight", rows=r, weights=side)
        back = codecs.decode(payload, "ans-weight", m.size, int(m.sum()), rows=r, weights=side)
        assert np.array_equal(back, m)


def test_contexts_of_more_than_65536_entries_code_their_counts_in_two_halves() -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(150_000, generator=g).double().numpy()
    m = (torch.rand(150_000, generator=g) < 0.7).numpy()  # independent of w: one bin is cheapest
    assert conditional.estimate(m, w)[1:] == (1, 1)
    payload = conditional.encode(m, w)
    assert np.array_equal(conditional.decode(payload, w, None, "big"), m)


def test_decoder_refuses_missing_weights_and_corrupt_payloads() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 50, generator=g)
    m = (torch.rand(40, 50, generator=g) < 0.5 + 0.4 * w.abs().clamp(max=1)).reshape(-1).numpy()
    side = w.reshape(-1).double().numpy()
    payload = codecs.encode(m, "ans-weight", rows=40, weights=side)
    k = int(m.sum())
    with pytest.raises(SelfmaskError, match="decodes only given the 2000 base weights of the tensor, got none"):
        codecs.decode(payload, "ans-weight", m.size, k, rows=40)
    with pytest.raises(SelfmaskError, match="4-byte words"):
        codecs.decode(payload[:-1], "ans-weight", m.size, k, rows=40, weights=side)
    for cut in (0, 4, len(payload) // 2):
        with pytest.raises(SelfmaskError):
            codecs.decode(payload[:cut], "ans-weight", m.size, k, rows=40, weights=side)
    damaged = bytearray(payload)
    damaged[len(payload) // 2] ^= 0x10
    with pytest.raises(SelfmaskError) as err:
        codecs.decode(bytes(damaged), "ans-weight", m.size, k, rows=40, weights=side, where="x.mask")
    assert str(err.value).count("x.mask") == 1  # one message, not one wrapped in another


def test_writer_picks_bins_and_channel_groups_by_estimate() -> None:
    """Weight-dependent masks get several bins; channels of very different rates get groups too."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 288, generator=g)
    rank = w.abs().flatten().argsort().argsort().view(64, 288) / w.numel()
    rate = torch.linspace(0.05, 2.0, 64)[:, None]
    m = (torch.rand(64, 288, generator=g) >= (0.5 * (1 - rank) ** 2 * rate).clamp(max=1)).reshape(-1).numpy()
    side = w.reshape(-1).double().numpy()
    bits, bins, groups = conditional.estimate(m, side, rows=64)
    assert bins >= 4 and groups >= 2
    assert bits < tensor_bounds(m, 64, side)["weight"]  # finer contexts than the 16-bin bound's
    assert abs(8 * len(conditional.encode(m, side, 64)) - bits) < 64  # the estimate is the size, within 2 words
    _bits, _bins, groups = conditional.estimate(m, side, rows=None)
    assert groups == 1


# ---------------------------------------------------------------- files


def test_magnitude_dependent_masks_below_per_tensor_bound_close_to_conditional_bound() -> None:
    weights = tiny_weights()
    masks = magnitude_masks(weights)
    fp = "ab" * 32
    data, infos = encode_mask_file(masks, backbone="resnet_tiny", fingerprint=fp, config=MaskConfig(), base=weights)
    portable, _ = encode_mask_file(masks, backbone="resnet_tiny", fingerprint=fp, config=MaskConfig())
    payload = sum(i.payload_bytes for i in infos)
    per_tensor = sum(i.entropy_bits for i in infos) / 8
    conditional_bound = sum(
        tensor_bounds(masks[n].reshape(-1).numpy(), None, w.reshape(-1).double().numpy())["weight"]
        for n, w in weights.items()
    ) / 8
    assert all(i.codec == "ans-weight" for i in infos if i.numel > 1000)  # on tiny tensors the counts may not pay
    assert conditional_bound < 0.85 * per_tensor  # the masks really depend on |w|
    assert payload < 0.85 * per_tensor  # well below what the file could reach before
    assert payload < 1.03 * conditional_bound  # close to the weight-conditioned bound
    assert len(data) < len(portable) - 0.1 * per_tensor
    mf = decode_mask_file(data)
    assert mf.version == 3 and mf.needs_base
    mf.decode_with_base(weights, fp)
    assert not mf.needs_base and all(torch.equal(mf.masks[n], m) for n, m in masks.items())


def test_independent_random_masks_no_bigger_than_without_base() -> None:
    weights = tiny_weights()
    g = torch.Generator().manual_seed(5)
    for density in (0.5, 0.9, 0.99):
        masks = {n: torch.rand(w.shape, generator=g) < density for n, w in weights.items()}
        with_base, _ = encode_mask_file(masks, backbone="b", fingerprint="ab" * 32, config=MaskConfig(), base=weights)
        without, _ = encode_mask_file(masks, backbone="b", fingerprint="ab" * 32, config=MaskConfig())
        assert len(with_base) <= len(without)


def test_selective_masking_codes_the_stored_entries_given_their_weights() -> None:
    config = MaskConfig.preset("resnet")
    config = MaskConfig.from_dict({**config.to_dict(), "trainable_fraction": 0.5, "seed": 4})
    weights = tiny_weights()
    masks = {n: m | ~selective_trainable_mask(tuple(m.shape), 0.5, 4, n) for n, m in magnitude_masks(weights).items()}
    model = masked_with(masks, config)
    assert all(torch.equal(current_masks(model)[n], m) for n, m in masks.items())
    data, infos = encode_mask_file(masks, backbone="resnet_tiny", fingerprint=model_fingerprint(model), config=config,
                                   base=weights)
    assert any(i.codec == "ans-weight" for i in infos)
    target = plain()
    apply_mask(target, decode_mask_file(data))
    assert all(torch.equal(current_masks(target)[n], m) for n, m in masks.items())


def test_save_load_apply_bank_with_the_base_and_refusals_without(tmp_path) -> None:
    masks = magnitude_masks(tiny_weights())
    model = masked_with(masks)
    path = tmp_path / "w.mask"
    infos = save_mask(model, path, extra={"head.bias": torch.ones(3)})
    assert any(i.codec == "ans-weight" for i in infos)
    # load_mask alone: header, fingerprint, config, per-tensor sizes; the masks need the base
    mf = load_mask(path)
    assert mf.fingerprint == model_fingerprint(model) and mf.config == MaskConfig.preset("resnet")
    assert [i.name for i in mf.tensors] == list(masks) and mf.summary()["payload_bytes"] == sum(
        i.payload_bytes for i in infos)
    with pytest.raises(SelfmaskError, match=r"w\.mask: \d+ mask\(s\) .* are coded given the base weights .* need them"):
        mf.masks  # noqa: B018
    # with the base: apply_mask, MaskBank.add, load_mask(base=)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    target = apply_mask(plain(), path)
    assert torch.equal(target(x), model(x))
    bank = MaskBank(plain())
    bank.add("w", path)
    bank.activate("w")
    assert torch.allclose(bank.model(x), model(x), atol=1e-5)
    bank.add("again", load_mask(path))  # the base weights of a bank with an active task are still its originals
    full = load_mask(path, base=plain())
    assert all(torch.equal(full.masks[n], m) for n, m in masks.items())
    # portable: decodes alone, larger
    save_mask(model, tmp_path / "p.mask", portable=True)
    assert not load_mask(tmp_path / "p.mask").needs_base
    assert (tmp_path / "p.mask").stat().st_size > path.stat().st_size


def test_other_base_weights_get_the_fingerprint_error_never_a_decode(tmp_path, monkeypatch) -> None:
    path = tmp_path / "w.mask"
    save_mask(masked_with(magnitude_masks(tiny_weights())), path)
    calls = []
    real = conditional.decode
    monkeypatch.setattr(conditional, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    other = plain(seed=1)
    with pytest.raises(SelfmaskError, match="fingerprint"):
        apply_mask(other, path)
    with pytest.warns(UserWarning, match="fingerprint"), pytest.raises(
        SelfmaskError, match="coded given the base weights of fingerprint .* decode only on the exact base"
    ):
        apply_mask(other, path, force=True)  # force cannot apply: the masks would decode to others
    with pytest.warns(UserWarning), pytest.raises(SelfmaskError, match="decode only on the exact base"):
        MaskBank(plain(seed=1), force=True).add("w", path)
    with pytest.raises(SelfmaskError, match="decode only on the exact base"):
        load_mask(path, base=plain(seed=1))
    assert calls == []  # refused before any decoding
    assert not any("parametrizations" in k for k in other.state_dict())  # the model untouched
    apply_mask(plain(), path)
    assert calls


def test_corrupted_conditioned_file_refused_by_checksum(tmp_path) -> None:
    path = tmp_path / "w.mask"
    save_mask(masked_with(magnitude_masks(tiny_weights())), path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x20
    with pytest.raises(SelfmaskError, match="checksum mismatch"):
        decode_mask_file(bytes(data), "w.mask")


# ---------------------------------------------------------------- command line


def test_cli_apply_inspect_compress_report_with_and_without_the_base(tmp_path, capsys) -> None:
    model = masked_with(magnitude_masks(tiny_weights()))
    path = tmp_path / "w.mask"
    save_mask(model, path, source={"seed": BASE_SEED})
    merged = tmp_path / "m.safetensors"
    assert main(["apply", str(path), "--backbone", "resnet_tiny", "-o", str(merged)]) == 0
    fresh = build_backbone("resnet_tiny")
    fresh.load_state_dict(load_file(str(merged)))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), model(x))
    capsys.readouterr()
    assert main(["apply", str(path), "--backbone", "resnet_tiny", "--seed", "1", "-o", str(tmp_path / "o")]) == 2
    assert "fingerprint" in capsys.readouterr().err and not (tmp_path / "o").exists()

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ans-weight" in out and "coded given the base weights: pass --backbone" in out
    assert main(["inspect", str(path), "--backbone", "resnet_tiny", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    bounds = summary["bounds_bytes"]
    assert summary["version"] == 3 and not summary["needs_base"]
    assert summary["payload_bytes"] < 0.9 * bounds["per_tensor"] and bounds["weight"] < bounds["per_channel"]
    assert all(t["bounds_bits"]["weight"] is not None for t in summary["tensors"])
    assert main(["inspect", str(path), "--backbone", "resnet_tiny"]) == 0
    out = capsys.readouterr().out
    assert "weight-conditioned bound" in out and "H | w" in out

    assert main(["compress-report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "coded given the base weights: pass --backbone" in err
    assert main(["compress-report", str(path), "--backbone", "resnet_tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bounds_bytes"] == bounds and report["ours"]["payload_bytes"] == summary["payload_bytes"]
    assert main(["compress-report", str(path), "--backbone", "resnet_tiny", "--seed", "2"]) == 2
    assert "fingerprint" in capsys.readouterr().err


def test_pack_of_a_run_with_adapted_batchnorm_statistics_applies_on_its_base(tmp_path, capsys) -> None:
    """Found while measuring: a run with bn='train' changed BatchNorm buffers, so `pack` recorded the
    fingerprint of the adapted model and `apply` refused the base it came from; with masks coded given
    the base weights even --force could not apply it. `pack` now records the base backbone's fingerprint."""
    from safetensors.torch import save_file

    weights = tiny_weights()
    masks = magnitude_masks(weights)
    run = tmp_path / "run"
    run.mkdir()
    config = MaskConfig.preset("resnet")
    (run / "config.json").write_text(json.dumps({"backbone": "resnet_tiny", "weights": None, "seed": BASE_SEED,
                                                 "mask": config.to_dict()}))
    save_file({n: torch.where(m, 1.0, -1.0) for n, m in masks.items()}, str(run / "scores.safetensors"))
    buffers = {n: b + 0.5 if n.endswith("running_mean") else b for n, b in plain().named_buffers()}
    save_file(buffers, str(run / "buffers.safetensors"))
    out = tmp_path / "run.mask"
    assert main(["pack", str(run), "-o", str(out)]) == 0
    assert "coded given the base weights" in capsys.readouterr().out
    assert load_mask(out).fingerprint == model_fingerprint(plain())
    merged = tmp_path / "m.safetensors"
    assert main(["apply", str(out), "--backbone", "resnet_tiny", "-o", str(merged)]) == 0
    fresh = build_backbone("resnet_tiny")
    fresh.load_state_dict(load_file(str(merged)))
    adapted = masked_with(masks)
    adapted.load_state_dict({**adapted.state_dict(), **buffers})
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), adapted.eval()(x))


def test_conditional_benchmark_on_a_mask_file_and_a_synthetic_mask(tmp_path, capsys) -> None:
    """`selfmask bench --only conditional`: sizes against the bounds and lzma-9 (the times are not checked)."""
    from selfmask.bench import conditional_coding, synthetic_mask

    mask, base = synthetic_mask("resnet_tiny", "resnet", seed=BASE_SEED)
    res = conditional_coding(mask, base, repeats=1)
    assert res["tensors_coded_given_weights"] > 0 and res["masked_weights"] == 306_096
    assert res["payload_bytes"]["conditioned"] < res["payload_bytes"]["portable"]
    assert res["conditioned_over_per_tensor_bound"] < 0.9 < res["portable_over_per_tensor_bound"]
    assert set(res["encode_s"]) == set(res["decode_s"]) == {"conditioned", "portable", "lzma9"}
    with pytest.raises(SelfmaskError, match="fingerprint"):
        conditional_coding(synthetic_mask("resnet_tiny", "resnet", seed=BASE_SEED)[0], plain(seed=7))

    path = tmp_path / "w.mask"
    save_mask(masked_with(magnitude_masks(tiny_weights())), path, source={"seed": BASE_SEED})
    assert main(["bench", "--only", "conditional", "--mask", str(path), "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["conditional[0]"]
    assert out["file"] == str(path) and out["payload_bytes"]["conditioned"] == load_mask(path).payload_bytes


def test_bounds_of_one_dimensional_tensors_and_totals() -> None:
    """Found on ResNet-50's 'resnet-authors' targets (BatchNorm vectors): a 1-D tensor is one channel."""
    g = torch.Generator().manual_seed(4)
    masks = {"v": torch.rand(300, generator=g) < 0.8, "m": torch.rand(6, 50, generator=g) < 0.8}
    base = {"v": torch.randn(300, generator=g), "m": torch.randn(6, 50, generator=g)}
    data, _ = encode_mask_file(masks, backbone="b", fingerprint="ab" * 32, config=MaskConfig(), base=base)
    summary = decode_mask_file(data).decode_with_base(base, "ab" * 32).summary(base)
    v = summary["tensors"][0]["bounds_bits"]
    assert v["per_channel"] == pytest.approx(v["per_tensor"]) and v["weight"] <= v["per_tensor"]
    assert all(x is not None for x in summary["bounds_bytes"].values())
    assert summary["bounds_bytes"]["per_tensor"] == pytest.approx(summary["entropy_bound_bytes"])
