"""Regression tests for the red-team cases of issue 16: nothing lost, nothing silently wrong.

Each test names the case it guards; each failed before its fix. The runs are real
``selfmask`` commands (in-process through ``selfmask.cli.main.main``, or subprocesses
for signals) on a small image folder written here, resnet_tiny, one short epoch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cli_resume import write_image_folder

from selfmask.backbones import build_backbone
from selfmask.cli.main import main
from selfmask.storage import load_mask, load_run, save_mask


def adapt_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["adapt", "--data", f"folder:{data}", "--epochs", "1", "--batch-size", "8", "--cache-dir",
            str(data.parent / "cache"), "--no-progress", "--no-eval", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("red_team") / "data", n_train=16, n_test=8)


@pytest.fixture(scope="module")
def bn_train_run(data) -> Path:
    """A finished default run (``--bn train``: the BatchNorm statistics change), with base weights on disk."""
    weights = data.parent / "base.pt"
    torch.manual_seed(5)
    torch.save(build_backbone("resnet_tiny").state_dict(), weights)
    run = data.parent / "bn-train-run"
    assert main(adapt_args(data, run, "--weights", str(weights))) == 0
    assert (run / "buffers.safetensors").is_file()
    return run


def _masked_outputs(run: Path, x: torch.Tensor) -> torch.Tensor:
    from selfmask.training.run_folder import load_run as rebuild

    model, _head, _cfg = rebuild(run)
    return model.eval()(x)


# ---------------------------------------------------------------------------- mask files and fingerprints


def test_pack_then_apply_on_a_default_bn_train_run_reproduces_the_masked_model(bn_train_run, tmp_path) -> None:
    """Case: ``pack`` then ``apply`` on a default (``--bn train``) run was refused (fingerprint of trained buffers)."""
    weights = json.loads((bn_train_run / "config.json").read_text())["weights"]
    mask = tmp_path / "t.mask"
    assert main(["pack", str(bn_train_run), "-o", str(mask)]) == 0
    mf = load_mask(mask)
    assert any(k.startswith("buffer.") for k in mf.extra)  # the trained statistics travel with the masks
    merged = tmp_path / "m.safetensors"
    assert main(["apply", str(mask), "--backbone", "resnet_tiny", "--weights", weights, "-o", str(merged)]) == 0
    assert mf.fingerprint == load_run(bn_train_run).base_fingerprint
    plain = build_backbone("resnet_tiny")
    plain.load_state_dict(load_file(str(merged)), strict=True)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), _masked_outputs(bn_train_run, x), atol=1e-6, rtol=0)


def test_old_mask_file_with_buffer_fingerprint_still_applies_with_a_note(bn_train_run, tmp_path, capsys) -> None:
    """Files written by the old code (fingerprint taken with the trained buffers) apply, with a note."""
    weights = json.loads((bn_train_run / "config.json").read_text())["weights"]
    rebuilt = load_run(bn_train_run)
    old = tmp_path / "old.mask"
    save_mask(rebuilt.model, old, backbone=rebuilt.backbone, extra=rebuilt.extra, source=rebuilt.source)  # old way
    assert load_mask(old).fingerprint != rebuilt.base_fingerprint
    merged = tmp_path / "m.safetensors"
    capsys.readouterr()
    assert main(["apply", str(old), "--backbone", "resnet_tiny", "--weights", weights, "-o", str(merged)]) == 0
    assert "older selfmask" in capsys.readouterr().out
    plain = build_backbone("resnet_tiny")
    plain.load_state_dict(load_file(str(merged)))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), _masked_outputs(bn_train_run, x), atol=1e-6, rtol=0)
    # other base weights are still refused: the buffers do not explain that difference
    other = tmp_path / "other.pt"
    torch.manual_seed(6)
    torch.save(build_backbone("resnet_tiny").state_dict(), other)
    assert main(["apply", str(old), "--backbone", "resnet_tiny", "--weights", str(other), "-o",
                 str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)


# ---------------------------------------------------------------------------- data: labels, split files, skipped images


def _two_class_folder(root: Path, train: tuple[str, ...], test: tuple[str, ...]) -> Path:
    import numpy as np
    from PIL import Image

    for split, classes in (("train", train), ("test", test)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 40 * i + 60 * len(c), np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_folder_test_split_is_labelled_by_the_training_classes(tmp_path) -> None:
    """Case: with fewer test class folders, test images got another class's label (k-NN 1.000 became 0.000)."""
    from selfmask.data.sources import load_data

    root = _two_class_folder(tmp_path / "d", ("cat", "dog"), ("dog",))
    train, test = load_data(f"folder:{root}", resolution=8, cache_dir=tmp_path / "cache")
    assert train.classes == test.classes == ["cat", "dog"]
    assert test.labels.tolist() == [1, 1]  # "dog" is label 1 in both splits (was 0 in the test split)


def test_folder_test_class_without_training_images_is_a_clear_error(tmp_path, capsys) -> None:
    root = _two_class_folder(tmp_path / "d", ("cat", "dog"), ("cow", "dog"))
    assert main(adapt_args(root, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "['cow'] have no training images" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _split_file(tmp_path: Path, train: list, test: list) -> str:
    import numpy as np
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / name)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": train, "val": [], "test": test}))
    return f"split:{split}:{images}"


def test_split_file_label_far_out_of_range_is_a_clear_error_without_a_memory_blow_up(tmp_path) -> None:
    """Case: a split-file label of 10**10 built a list of 10**10 integers (memory blow-up)."""
    import tracemalloc

    from selfmask.data.sources import load_data
    from selfmask.errors import SelfmaskError

    spec = _split_file(tmp_path, [["a.png", 0, "a"], ["b.png", 10**10, "b"]], [["a.png", 0, "a"]])
    tracemalloc.start()
    with pytest.raises(SelfmaskError, match=r"labels \[1, 2, 3"):
        load_data(spec, resolution=8, cache_dir=tmp_path / "cache")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**24


@pytest.mark.parametrize("rel", ["../outside.png", "/etc/passwd", "sub/../../outside.png"])
def test_split_file_paths_must_stay_inside_the_image_root(tmp_path, rel) -> None:
    """Case: split-file paths with '..' or an absolute path read files outside IMAGE_ROOT."""
    import numpy as np
    from PIL import Image

    from selfmask.data.sources import load_data
    from selfmask.errors import SelfmaskError

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "outside.png")
    spec = _split_file(tmp_path, [["a.png", 0, "a"], [rel, 1, "b"]], [["a.png", 0, "a"]])
    with pytest.raises(SelfmaskError, match="not a path inside the image folder"):
        load_data(spec, resolution=8, cache_dir=tmp_path / "cache")


def test_dangling_and_looping_image_links_are_counted_and_reported(tmp_path, caplog) -> None:
    """Case: dangling or looping symlinked images were dropped without a word."""
    from selfmask.data.folders import list_image_folder

    root = _two_class_folder(tmp_path / "d", ("cat", "dog"), ("dog",))
    (root / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "train" / "dog" / "x.png").symlink_to("y.png")
    (root / "train" / "dog" / "y.png").symlink_to("x.png")
    with caplog.at_level("WARNING", logger="selfmask.data"):
        files, labels, _ = list_image_folder(root / "train")
    assert len(files) == 4 and labels == [0, 0, 1, 1]
    assert "skipped 3 image link(s)" in caplog.text and "gone.png" in caplog.text


# ---------------------------------------------------------------------------- run folders and output files


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_folder_holding_no_run_is_never_written_replaced_or_deleted(data, tmp_path, capsys, overwrite) -> None:
    """Cases: --out on a user's folder overwrote config.json/results.json and appended to log.txt;
    with --overwrite, run-file names and plots/ were deleted."""
    mine = tmp_path / "mine"
    (mine / "plots").mkdir(parents=True)
    for name in ("config.json", "results.json", "log.txt", "plots/fig.png"):
        (mine / name).write_text(f"the user's {name}\n")
    before = _snapshot(mine)
    assert main(adapt_args(data, mine, *(["--overwrite"] if overwrite else []))) == 2
    err = capsys.readouterr().err
    assert "is not a selfmask run folder" in err and "Traceback" not in err
    assert _snapshot(mine) == before


def test_a_run_folder_of_an_older_version_is_still_recognised(data, bn_train_run, tmp_path) -> None:
    """Run folders written before the marker existed (status.json + config.json) can still be replaced."""
    old = tmp_path / "old-run"
    shutil.copytree(bn_train_run, old)
    (old / ".selfmask-run").unlink()
    assert main(adapt_args(data, old, "--overwrite")) == 0
    assert (old / ".selfmask-run").is_file()


def test_init_from_and_out_the_same_folder_is_refused(data, bn_train_run, tmp_path, capsys) -> None:
    """Case: ``--init-from S --out S --overwrite`` deleted the finished run S it was asked to start from."""
    run = tmp_path / "s"
    shutil.copytree(bn_train_run, run)
    before = _snapshot(run)
    assert main(adapt_args(data, run, "--init-from", str(run), "--overwrite")) == 2
    assert "are the same folder" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_a_second_process_cannot_own_a_run_folder(data, tmp_path, capsys) -> None:
    """Case: two ``adapt`` processes on one --out both "succeeded"; the first run was silently replaced."""
    import subprocess
    import sys

    run = tmp_path / "busy"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from selfmask.training.ownership import claim; claim(sys.argv[1]); "
         "print('held', flush=True); sys.stdin.read()", str(run)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(adapt_args(data, run)) == 2
        assert "in use by another selfmask process" in capsys.readouterr().err
        assert sorted(p.name for p in run.iterdir()) == [".selfmask-run"]  # nothing written
    finally:
        holder.communicate("", timeout=30)
    assert main(adapt_args(data, run)) == 0  # free again once the other process ended


def _mask_file(tmp_path: Path) -> Path:
    from selfmask.masking import MaskConfig, mask_model

    torch.manual_seed(0)
    model = mask_model(build_backbone("resnet_tiny"), MaskConfig.preset("resnet"))
    path = tmp_path / "x.mask"
    save_mask(model, path, source={"seed": 0})
    return path


def test_apply_refuses_to_replace_its_own_input(tmp_path, capsys) -> None:
    """Case: ``apply X.mask -o X.mask --overwrite`` replaced its own input."""
    mask = _mask_file(tmp_path)
    before = mask.read_bytes()
    assert main(["apply", str(mask), "--backbone", "resnet_tiny", "-o", str(mask), "--overwrite"]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert mask.read_bytes() == before
    (tmp_path / "link.mask").symlink_to(mask)
    assert main(["apply", str(tmp_path / "link.mask"), "--backbone", "resnet_tiny", "-o", str(mask), "--overwrite"]) == 2
    assert mask.read_bytes() == before


def test_pack_refuses_to_write_over_a_file_of_its_run(bn_train_run, tmp_path, capsys) -> None:
    run = tmp_path / "r"
    shutil.copytree(bn_train_run, run)
    before = _snapshot(run)
    assert main(["pack", str(run), "-o", str(run / "scores.safetensors"), "--overwrite"]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert _snapshot(run) == before


@pytest.mark.parametrize("kind", ["fifo", "char-device"])
def test_outputs_that_are_not_regular_files_are_never_replaced(tmp_path, capsys, kind) -> None:
    """Case: ``-o`` on a character device or FIFO with --overwrite replaced it with a regular file."""
    import os
    import stat

    mask = _mask_file(tmp_path)
    target = tmp_path / "special"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(target, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # like /dev/null, inside tmp_path
    for argv in (["apply", str(mask), "--backbone", "resnet_tiny", "-o", str(target), "--overwrite"],
                 ["pack", str(tmp_path), "-o", str(target), "--overwrite"]):
        assert main(argv) == 2
        assert "is not a regular file" in capsys.readouterr().err
        mode = target.lstat().st_mode
        assert stat.S_ISFIFO(mode) if kind == "fifo" else stat.S_ISCHR(mode)


# ---------------------------------------------------------------------------- resume checks what defines the run


def _interrupted_copy(run: Path, to: Path, **edits) -> Path:
    shutil.copytree(run, to)
    (to / "status.json").write_text(json.dumps({"status": "interrupted"}))
    cfg = json.loads((to / "config.json").read_text())
    cfg.update(edits)
    (to / "config.json").write_text(json.dumps(cfg))
    return to


def _resume(run: Path) -> list[str]:
    return ["adapt", "--resume", str(run), "--no-progress", "--no-eval", "--cache-dir", str(run.parent / "cache")]


def test_resume_refuses_edited_data_or_weights_and_names_them(data, bn_train_run, tmp_path, capsys) -> None:
    """Case: after config.json's data_spec or weights was edited, --resume continued on other data/weights."""
    other = _two_class_folder(tmp_path / "other", ("c0", "c1"), ("c0", "c1"))
    run = _interrupted_copy(bn_train_run, tmp_path / "a", data_spec=f"folder:{other}")
    assert main(_resume(run)) == 2
    assert "different settings than this run's config.json: data_spec: the checkpoint was written with" in \
        capsys.readouterr().err
    torch.manual_seed(9)
    torch.save(build_backbone("resnet_tiny").state_dict(), tmp_path / "w2.pt")
    run = _interrupted_copy(bn_train_run, tmp_path / "b", weights=str(tmp_path / "w2.pt"))
    assert main(_resume(run)) == 2
    assert ": weights: the checkpoint was written with" in capsys.readouterr().err
    # the same path, other numbers: the fingerprint of the base weights tells
    run = _interrupted_copy(bn_train_run, tmp_path / "c")
    weights = Path(json.loads((run / "config.json").read_text())["weights"])
    saved = weights.read_bytes()
    try:
        shutil.copy(tmp_path / "w2.pt", weights)
        assert main(_resume(run)) == 2
        assert ": base_fingerprint: the checkpoint was written with" in capsys.readouterr().err
    finally:
        weights.write_bytes(saved)
    run = _interrupted_copy(bn_train_run, tmp_path / "d", backbone="resnet_small")
    assert main(_resume(run)) == 2
    assert "does not fit backbone 'resnet_small'" in capsys.readouterr().err  # the weights tell first
    assert main(_resume(_interrupted_copy(bn_train_run, tmp_path / "e"))) == 0  # unedited: resumes


@pytest.mark.parametrize("edit", [{"backbone": 5}, {"data_spec": 5}, {"weights": 5}, {"seed": "0"}])
def test_resume_with_wrong_types_in_config_json_is_one_clear_line(bn_train_run, tmp_path, capsys, edit) -> None:
    """Case: other edits of config.json ended in a traceback."""
    run = _interrupted_copy(bn_train_run, tmp_path / "r", **edit)
    assert main(_resume(run)) == 2
    err = capsys.readouterr().err
    key = next(iter(edit))
    assert f"config.json: {key!r} must be" in err and "Traceback" not in err


def test_first_difference_names_data_and_weights_before_training_settings() -> None:
    from selfmask.training.identity import first_difference, with_run_identity

    a = with_run_identity({"method": "mask", "lr": 1.0}, "resnet_tiny", {"data_spec": "folder:a", "weights": None})
    b = with_run_identity({"method": "topk", "lr": 2.0}, "resnet_small", {"data_spec": "folder:b", "weights": None})
    assert first_difference(a, a) is None
    assert first_difference(a, b).startswith("data_spec: the checkpoint was written with 'folder:a'")
    assert first_difference(a, {**b, "run": a["run"]}).startswith("method:")
    assert first_difference({"method": "mask", "lr": 1.0}, a) is None  # an older checkpoint: training settings only


# ---------------------------------------------------------------------------- typed settings, numbers, weights dtype


@pytest.mark.parametrize(("settings", "message"), [
    ({"weights": 5}, "'weights' must be a string or null, got 5"),
    ({"data": 5}, "'data' must be a string, got 5"),
    ({"backbone": ["resnet_tiny"]}, "'backbone' must be a string, got ['resnet_tiny']"),
    ({"seed": "0"}, "seed must be an integer, got '0'"),
    ({"augment": "no"}, "augment must be true or false, got 'no'"),
    ({"checkpoint_every": 1.5}, "checkpoint_every must be an integer, got 1.5"),
    ({"lr": "fast"}, "lr must be a number or null, got 'fast'"),
    ({"threshold": float("inf")}, "threshold must be a finite number, got inf"),
])
def test_config_file_with_wrong_json_types_is_one_clear_line(data, tmp_path, capsys, settings, message) -> None:
    """Cases: {"weights": 5}, {"seed": "0"}, {"data": 5} ended in tracebacks; {"augment": "no"} left augmentation on."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(settings).replace("Infinity", "1e999"))
    assert main(adapt_args(data, tmp_path / "run", "--config", str(cfg))) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("flag", "message"), [
    (["--seed", str(10**20)], "seed must be an integer in [0, 4294967295], got 100000000000000000000"),
    (["--seed", "-5"], "seed must be an integer in [0, 4294967295], got -5"),
    (["--epochs", str(10**20)], "epochs must be an integer in [0, 2147483647]"),
    (["--checkpoint-every", str(2**63)], "checkpoint_every must be an integer in [0, 2147483647]"),
])
def test_out_of_range_integers_have_a_clear_message(data, tmp_path, capsys, flag, message) -> None:
    """Case: an out-of-range integer said only "Overflow when unpacking long long" (or ran forever)."""
    assert main(adapt_args(data, tmp_path / "run", *flag)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_weights_that_are_not_floating_point_are_refused(data, tmp_path, capsys, dtype) -> None:
    """Case: safetensors weights of an integer or bool dtype were cast to float (a run trained near chance)."""
    from safetensors.torch import save_file

    state = {k: (v * 10).to(dtype) if v.is_floating_point() else v for k, v in build_backbone("resnet_tiny").state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    assert main(adapt_args(data, tmp_path / "run", "--weights", str(tmp_path / "w.safetensors"))) == 2
    err = capsys.readouterr().err
    assert "must hold floating-point numbers hold another type" in err and "conv1.weight" in err


# ---------------------------------------------------------------------------- signals and write errors


def _sigterm_self(*_args, **_kwargs) -> None:
    import os
    import signal
    import time

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises as soon as this Python frame runs again
    raise AssertionError("SIGTERM was not handled")


def test_sigterm_during_the_final_evaluation_leaves_a_resumable_run(data, tmp_path, monkeypatch, capsys) -> None:
    """Case: SIGTERM during the final evaluation left no results and a run that refused to resume."""
    import selfmask.experiments.evaluate as evaluate

    run = tmp_path / "run"
    argv = [a for a in adapt_args(data, run) if a != "--no-eval"] + ["--no-probe", "--knn-k", "3"]
    real = evaluate.evaluate_features
    monkeypatch.setattr(evaluate, "evaluate_features", _sigterm_self)
    assert main(argv) == 143
    assert "stopped by SIGTERM during the final evaluation" in capsys.readouterr().err
    assert json.loads((run / "status.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(evaluate, "evaluate_features", real)
    assert main(["adapt", "--resume", str(run), "--no-progress", "--no-probe", "--knn-k", "3", "--cache-dir",
                 str(data.parent / "cache")]) == 0
    assert "knn_accuracy" in json.loads((run / "results.json").read_text())
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def _fsync_then(action):  # noqa: ANN001, ANN202
    import os

    real = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        action()

    return fsync


@pytest.mark.parametrize("command", ["pack", "apply"])
def test_sigterm_during_pack_or_apply_removes_the_temporary_file(bn_train_run, tmp_path, monkeypatch, capsys,
                                                                 command) -> None:
    """Case: SIGTERM during pack/apply left the hidden temporary file behind."""
    import os

    mask = tmp_path / "in.mask"
    assert main(["pack", str(bn_train_run), "-o", str(mask)]) == 0
    weights = json.loads((bn_train_run / "config.json").read_text())["weights"]
    out = tmp_path / ("t.mask" if command == "pack" else "m.safetensors")
    argv = (["pack", str(bn_train_run), "-o", str(out)] if command == "pack" else
            ["apply", str(mask), "--backbone", "resnet_tiny", "--weights", weights, "-o", str(out)])
    monkeypatch.setattr(os, "fsync", _fsync_then(_sigterm_self))
    assert main(argv) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mask"]  # no output, no temporary file


@pytest.mark.parametrize("command", ["pack", "apply"])
@pytest.mark.parametrize("errno_", ["ENOSPC", "EROFS", "EACCES"])
def test_disk_and_permission_errors_of_pack_and_apply_are_one_line(bn_train_run, tmp_path, monkeypatch, capsys,
                                                                   command, errno_) -> None:
    """Cases: ``apply``/``pack`` onto a full or read-only file system ended in a traceback."""
    import errno
    import os

    mask = tmp_path / "in.mask"
    assert main(["pack", str(bn_train_run), "-o", str(mask)]) == 0
    code = getattr(errno, errno_)

    def fail() -> None:
        raise OSError(code, os.strerror(code))

    out = tmp_path / "out.bin"
    argv = (["pack", str(bn_train_run), "-o", str(out)] if command == "pack" else
            ["apply", str(mask), "--backbone", "resnet_tiny", "--weights",
             json.loads((bn_train_run / "config.json").read_text())["weights"], "-o", str(out)])
    monkeypatch.setattr(os, "fsync", _fsync_then(fail))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"selfmask {command}: error: writing {str(out)!r} failed: {os.strerror(code)}; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mask"]
