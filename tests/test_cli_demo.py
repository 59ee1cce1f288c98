"""The command line end to end on the embedded benchmark (tiny build): demo, adapt, eval, pack, lowshot."""

from __future__ import annotations

import json
import math

import pytest

from selfmask.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "out", root / "cache"
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]) == 0
    return out, cache


def test_quick_demo_results_json(quick_demo) -> None:
    out, _ = quick_demo
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    methods = {r["method"] for r in rows}
    assert {"k-NN (pretrained)", "linear probe", "FFT", "supervised mask", "top-k mask", "SMN k-NN",
            "SMN + linear probe", "SMN + supervised mask"} <= methods
    assert {r["label_fraction"] for r in rows} == {1.0, 0.1}
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert r["knn_k"] == 200 and r["knn_temperature"] == 0.1  # settings recorded with every result
        assert isinstance(r["stored_bits"], int) and r["stored_bits"] >= 0
        if r["method"] in ("FFT", "supervised mask", "top-k mask", "SMN + supervised mask"):
            assert not math.isnan(r["linear_probe_accuracy"])
    by = {(r["method"], r["label_fraction"]): r for r in rows}
    # masks are stored at 1 bit per weight: 32x smaller than the FFT weights (plus a head each)
    assert by[("supervised mask", 1.0)]["stored_bits"] * 20 < by[("FFT", 1.0)]["stored_bits"]
    topk = by[("top-k mask", 1.0)]["fraction_active"]
    assert abs(topk - 0.9) < 0.01
    for name in ("lowshot.png", "loss.png", "sparsity.png", "results.md"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "status.json").read_text())["status"] == "finished"


def test_finished_demo_is_not_overwritten(quick_demo, capsys) -> None:
    out, cache = quick_demo
    before = (out / "results.json").read_bytes()
    assert main(["demo", "--quick", "--out", str(out), "--cache-dir", str(cache)]) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_adapt_eval_pack_lowshot_on_the_cached_checkpoint(quick_demo, tmp_path) -> None:
    out, cache = quick_demo
    weights = json.loads((out / "results.json").read_text())["pretrained_checkpoint"]
    run = tmp_path / "mask"
    common = ["--data", "embedded-tiny", "--cache-dir", str(cache), "--weights", weights, "--no-progress"]
    assert main(["adapt", *common, "--epochs", "1", "--out", str(run), "--no-flip"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "mask" and 0 <= res["test_accuracy"] <= 1 and res["knn"]["k"] == 200
    assert main(["eval", "--data", "embedded-tiny", "--cache-dir", str(cache), "--run", str(run),
                 "--output", str(tmp_path / "eval.json")]) == 0
    ev = json.loads((tmp_path / "eval.json").read_text())
    assert ev["knn_accuracy"] == pytest.approx(res["knn_accuracy"])  # same adapted model, same protocol
    assert main(["pack", str(run), "-o", str(tmp_path / "task.mask")]) == 0
    assert (tmp_path / "task.mask").stat().st_size > 0
    smn = tmp_path / "smn"
    assert main(["adapt", *common, "--objective", "swav", "--epochs", "1", "--prototypes", "20", "--queue-length", "0",
                 "--freeze-prototypes-iters", "1", "--large-crop-scale", "0.5", "1", "--small-crop-scale", "0.3", "0.6",
                 "--no-color", "--no-blur", "--out", str(smn)]) == 0
    crops = json.loads((smn / "config.json").read_text())["crops"]  # the multi-crop recipe the run used
    assert crops["large_scale"] == [0.5, 1.0] and crops["small_scale"] == [0.3, 0.6]
    assert crops["jitter_p"] == crops["grayscale_p"] == crops["blur_p"] == 0.0
    sweep = tmp_path / "sweep"
    assert main(["lowshot", "--data", "embedded-tiny", "--cache-dir", str(cache), "--smn", str(smn), "--fractions",
                 "0.1", "--seeds", "0", "1", "--methods", "lp", "smn-lp", "--out", str(sweep), "--no-progress"]) == 0
    summary = json.loads((sweep / "results.json").read_text())["summary"]
    assert {(s["method"], s["seeds"]) for s in summary} == {("linear probe", 2), ("SMN + linear probe", 2)}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["adapt", "--data", "embedded-tiny", "--label-fraction", "0", "--out", "{tmp}/r"], "label fraction must be in"),
        (["adapt", "--data", "embedded-tiny", "--label-fraction", "1.5", "--out", "{tmp}/r"], "label fraction must be in"),
        (["adapt", "--data", "nope", "--out", "{tmp}/r"], "unknown data specification"),
        (["adapt", "--data", "embedded-tiny", "--weights", "{tmp}/missing.pt", "--out", "{tmp}/r"], "does not exist"),
        (["adapt", "--data", "embedded-tiny", "--device", "cuda", "--out", "{tmp}/r"], "CUDA"),
        (["adapt", "--data", "embedded-tiny", "--out", "{tmp}/file/r"], "not writable|not a folder"),
        (["eval", "--data", "embedded-tiny", "--knn-k", "0"], "--knn-k must be >= 1"),
        (["eval", "--data", "embedded-tiny", "--per-class", "1000"], "per_class=1000"),
        (["lowshot", "--methods", "smn-lp", "--out", "{tmp}/s"], "need --smn"),
        (["adapt", "--data", "embedded-tiny", "--objective", "swav", "--large-crop-scale", "0.9", "0.2", "--out",
          "{tmp}/r"], "large_scale"),
        (["adapt", "--data", "embedded-tiny", "--no-color", "--prototypes", "10", "--out", "{tmp}/r"],
         "--prototypes, --no-color only apply to --objective swav"),
        (["adapt", "--data", "embedded-tiny", "--queue-length", "0", "--out", "{tmp}/r"],
         "--queue-length only apply to --objective swav .this run's objective: 'supervised'"),
    ],
)
def test_cli_bad_input_exits_2(argv, message, tmp_path, capsys, monkeypatch) -> None:
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("machine has CUDA")
    monkeypatch.setenv("SELFMASK_CACHE", str(tmp_path / "cache"))
    (tmp_path / "file").write_text("x")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    import re

    assert re.search(message, err), err
