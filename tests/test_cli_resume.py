"""Kill-and-resume through the real command line: SIGKILL mid-epoch, SIGTERM, ``--resume RUN_DIR``.

Every run is ``python -m selfmask adapt`` in a subprocess on a small image folder written
here (``--data folder:ROOT``), resnet_tiny, two epochs of six steps, a checkpoint every step.
The resumed runs must end with a ``scores.safetensors`` byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import selfmask.training.loop as loop
from selfmask.cli.main import main

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 12  # 48 images, batches of 8, 2 epochs


def write_image_folder(root: Path, n_train: int = 48, n_test: int = 8, size: int = 32) -> Path:
    """``root/{train,test}/<class>/*.png``: two classes of noisy stripes (horizontal vs vertical)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    x = np.arange(size)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                wave = np.sin((x[None, :] if c == 0 else x[:, None]) * 0.9 + rng.uniform(0, 6))
                img = (wave * 60 + 128 + rng.normal(0, 30, (size, size))).clip(0, 255).astype(np.uint8)
                Image.fromarray(np.stack([img] * 3, -1)).save(folder / f"{i}.png")
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_resume")
    data = write_image_folder(base / "data")
    cmd = [
        sys.executable, "-m", "selfmask", "adapt", "--data", f"folder:{data}", "--cache-dir", str(base / "cache"),
        "--backbone", "resnet_tiny", "--epochs", "2", "--batch-size", "8", "--checkpoint-every", "1", "--seed", "1",
        "--no-eval", "--no-progress",
    ]
    ref = base / "reference"
    done = subprocess.run([*cmd, "--out", str(ref)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return base, cmd, (ref / "scores.safetensors").read_bytes()


def _start_and_wait_for_checkpoint(cmd: list[str], out: Path) -> subprocess.Popen:
    """Start a run; return once it has written its first (mid-epoch) checkpoint."""
    proc = subprocess.Popen([*cmd, "--out", str(out)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (out / "checkpoint.pt").is_file():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before its first checkpoint: {proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint within 240 s")
        time.sleep(0.01)
    return proc


def _checkpoint_position(run: Path) -> tuple[int, int, int]:
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    return state["epoch"], state["batch"], state["step"]


def _resume(run: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "selfmask", "adapt", "--resume", str(run), "--cache-dir", str(run.parent / "cache"),
           "--no-eval", "--no-progress"]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(setup) -> None:
    base, cmd, ref_scores = setup
    run = base / "killed"
    proc = _start_and_wait_for_checkpoint(cmd, run)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    epoch, batch, step = _checkpoint_position(run)
    assert 0 < step < STEPS and batch > 0, (epoch, batch, step)  # killed mid-epoch, with work left to do
    assert json.loads((run / "status.json").read_text())["status"] == "running"  # nothing could record the kill
    assert not (run / "scores.safetensors").exists()
    done = _resume(run)
    assert done.returncode == 0, done.stderr
    assert f"resumed {run} at epoch {epoch + 1}, batch {batch + 1} (step {step})" in done.stderr
    assert (run / "scores.safetensors").read_bytes() == ref_scores
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_sigterm_stops_cleanly_with_143_then_resume_is_bit_identical(setup) -> None:
    base, cmd, ref_scores = setup
    run = base / "terminated"
    proc = _start_and_wait_for_checkpoint(cmd, run)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM  # 143: a clean stop, not a crash
    stderr = proc.stderr.read().decode()
    assert "stopped by SIGTERM at step" in stderr and f"selfmask adapt --resume {run}" in stderr
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "interrupted"
    assert _checkpoint_position(run)[2] == status["step"] < STEPS  # the checkpoint is the stop point
    done = _resume(run)
    assert done.returncode == 0, done.stderr
    assert (run / "scores.safetensors").read_bytes() == ref_scores


def test_resume_refusals_are_one_clear_line(setup, tmp_path, capsys) -> None:
    base, _cmd, _ref = setup
    ref = base / "reference"
    assert main(["adapt", "--resume", str(ref), "--no-progress"]) == 2
    assert "already holds a finished run (finished); nothing to resume" in capsys.readouterr().err
    assert main(["adapt", "--resume", str(ref), "--epochs", "5", "--lr", "1"]) == 2
    assert "drop --epochs, --lr" in capsys.readouterr().err
    # a zero is a value the user gave, and the crop flags shape training too
    assert main(["adapt", "--resume", str(ref), "--seed", "0", "--large-crop-scale", "0.5", "1", "--no-color"]) == 2
    assert "drop --seed, --large-crop-scale, --no-color" in capsys.readouterr().err
    assert main(["adapt", "--resume", str(tmp_path / "nothing")]) == 2
    assert "is not a run folder: config.json is missing" in capsys.readouterr().err
    assert main(["adapt", "--data", "embedded-tiny"]) == 2
    assert "--out RUN_DIR is required" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    cfg = json.loads((ref / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "run" / "status.json").write_text(json.dumps({"status": "running"}))
    assert main(["adapt", "--resume", str(tmp_path / "run"), "--no-progress", "--cache-dir", str(base / "cache")]) == 2
    assert "checkpoint.pt does not exist (the run wrote no checkpoint yet)" in capsys.readouterr().err


def test_disk_full_during_training_keeps_the_checkpoint_and_resumes(setup, monkeypatch, capsys) -> None:
    """ENOSPC while writing a checkpoint: one clear line (exit 2), the previous checkpoint intact, resume works."""
    base, cmd, ref_scores = setup
    run = base / "disk-full"
    argv = [*cmd[3:], "--out", str(run)]  # the same command, in-process
    real_write = loop.atomic_write_bytes
    calls = {"n": 0}

    def write_until_full(path, data):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_write(path, data)

    monkeypatch.setattr(loop, "atomic_write_bytes", write_until_full)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses (OMP_NUM_THREADS=1): float sums depend on the split
    try:
        _disk_full_then_resume(run, argv, base, ref_scores, capsys, monkeypatch, real_write)
    finally:
        torch.set_num_threads(threads)


def _disk_full_then_resume(run, argv, base, ref_scores, capsys, monkeypatch, real_write) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"writing {run / 'checkpoint.pt'} failed during training: No space left on device" in err
    assert f"continue with: selfmask adapt --resume {run}" in err
    assert _checkpoint_position(run)[2] == 3  # the third step's checkpoint, whole
    monkeypatch.setattr(loop, "atomic_write_bytes", real_write)
    assert main(["adapt", "--resume", str(run), "--cache-dir", str(base / "cache"), "--no-eval", "--no-progress"]) == 0
    assert (run / "scores.safetensors").read_bytes() == ref_scores
