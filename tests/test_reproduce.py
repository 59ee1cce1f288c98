"""`selfmask reproduce`: the paper's recipe as a named experiment, the report beside the paper's numbers, resume.

The data are CIFAR-10 python batches written by the test (tiny: a few images per class); the
backbone is resnet_tiny standing in for ResNet-18 (``--scale-down resnet18``), one epoch.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from selfmask.cli import main
from selfmask.experiments.reproduce import RECIPES, make_plan, paper_results

SRC = Path(__file__).resolve().parents[1] / "src"


def write_cifar10(root: Path, per_batch: int = 48, test: int = 40, classes: int = 10) -> Path:
    """The official ``cifar-10-batches-py`` layout (protocol 2, bytes keys) with class-dependent images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{c}".encode() for c in range(classes)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names, b"num_vis": 3072}, protocol=2))
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        n = test if fname == "test_batch" else per_batch
        labels = [int((i * n + j) % classes) for j in range(n)]
        base = np.array(labels, dtype=np.float64)[:, None] * (255.0 / classes)
        data = (base + rng.normal(0, 25, (n, 3072))).clip(0, 255).astype(np.uint8)
        batch = {b"batch_label": b"batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        (folder / fname).write_bytes(pickle.dumps(batch, protocol=2))
    return root


@pytest.fixture(scope="module")
def cifar(tmp_path_factory) -> Path:
    return write_cifar10(tmp_path_factory.mktemp("cifar"))


def _argv(cifar: Path, out: Path, *extra: str) -> list[str]:
    return ["reproduce", "table1", "--data", f"cifar10:{cifar}", "--backbone", "resnet_tiny", "--scale-down",
            "resnet18", "--epochs", "1", "--out", str(out), "--cache-dir", str(out.parent / "cache"), *extra]


def test_table1_writes_the_report_and_a_killed_run_resumes(cifar: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "repro"
    cmd = [sys.executable, "-m", "selfmask", *_argv(cifar, out, "--checkpoint-every", "1")]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "mask" / "checkpoint.pt").exists():  # the third step has checkpointed a step
        assert proc.poll() is None, "reproduce ended before the mask step checkpointed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.md").exists()
    fft_results = (out / "fft" / "results.json").read_bytes()
    assert json.loads((out / "mask" / "status.json").read_text())["status"] == "running"

    assert main(_argv(cifar, out)) == 0  # the same command continues
    printed = capsys.readouterr().out
    assert "step knn: done" in printed and "step fft: done" in printed and "step mask: resuming" in printed
    assert (out / "fft" / "results.json").read_bytes() == fft_results  # finished steps are not redone
    report = json.loads((out / "report.json").read_text())
    rows = {r["metric"]: r for r in report["rows"]}
    paper = paper_results()["table1"]["resnet18"]
    assert set(rows) == {"k-NN (pretrained)", "FFT", "supervised mask"}
    for metric, key in (("k-NN (pretrained)", "knn"), ("FFT", "fft"), ("supervised mask", "mask")):
        row = rows[metric]
        assert row["paper"] == paper[key]["cifar10"] and 0.0 <= row["ours"] <= 1.0
        assert row["difference"] == pytest.approx(row["ours"] - row["paper"])
    assert report["settings"]["scaled_down"] and report["settings"]["epochs"] == {"fft": 1, "mask": 1}
    text = (out / "report.md").read_text()
    assert "| supervised mask |" in text and f"{paper['mask']['cifar10']:.3f}" in text and "scaled down" in text
    mask_cfg = json.loads((out / "mask" / "config.json").read_text())["train"]
    recipe = RECIPES[("resnet18", "mask")]
    assert (mask_cfg["lr"], mask_cfg["batch_size"], mask_cfg["warmup_epochs"]) == (recipe.lr, 64, 40 / 150)
    assert main(_argv(cifar, out)) == 2  # finished: not redone without --overwrite
    assert "finished reproduction" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reproduce", "table2", "--backbone", "resnet50"], "unknown experiment 'table2'; expected one of: table1, smn"),
        (["reproduce", "smn", "--backbone", "resnet18"], "experiment 'smn' has no paper recipe for backbone 'resnet18'"),
        (["reproduce", "table1", "--backbone", "resnet_tiny"], "no paper recipe for backbone 'resnet_tiny'"),
        (["reproduce", "table1", "--backbone", "resnet50", "--dataset", "dtd"], "has 10 classes, but the paper's dtd has 47"),
        (["reproduce", "cascade", "--backbone", "resnet50"], "no 'cascade' numbers for dataset 'cifar10'"),
        (["reproduce", "table1", "--backbone", "vit_tiny_clip", "--scale-down", "resnet18"], "not a stand-in"),
    ],
)
def test_bad_requests_are_one_line_before_any_work(argv, message, cifar: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main([*argv, "--data", f"cifar10:{cifar}", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


def test_recipes_scale_with_epochs_and_budget(tmp_path: Path) -> None:
    plan = make_plan("smn", data="cifar10:/x", backbone="resnet50", weights="w.pth", out=tmp_path, budget=0.2)
    (step,) = plan.steps
    argv = list(step.argv)
    value = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
    assert (value["--epochs"], value["--lr"], value["--objective"], value["--bn"]) == ("30", "50.0", "swav", "eval")
    assert (value["--prototypes"], value["--queue-length"], value["--queue-start-epoch"]) == ("500", "512", "6")
    low = make_plan("lowshot", data="cifar100:/x", backbone="resnet50", weights=None, out=tmp_path, epochs=15)
    argv = list(low.steps[1].argv)
    assert argv[0] == "lowshot" and argv[argv.index("--fractions") + 1] == "0.0025"
    assert argv[argv.index("--steps-full") + 1] == "60"
    clip = make_plan("table1", data="cifar100:/x", backbone="vit_b_32_clip", weights=None, out=tmp_path)
    mask = list(clip.steps[2].argv)
    assert (mask[mask.index("--epochs") + 1], mask[mask.index("--lr") + 1]) == ("32", "10.0")
