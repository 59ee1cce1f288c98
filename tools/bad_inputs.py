"""Run every bad input we know of through the real command line; print what the user sees.

    PYTHONPATH=src python tools/bad_inputs.py > table.md      (about 2-4 minutes on 2 cores)

Builds its own small inputs in a temporary folder (an image folder, CIFAR batches, weights, mask
files, run folders), runs ``selfmask`` on each bad variant (in-process through
``selfmask.cli.main.main`` where that is the same thing, as a subprocess for signals and a full
disk) and prints a Markdown table: category, input, exit code, and the message the user sees (the
temporary folder shown as ``$TMP``). docs/reliability.md holds its output.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from selfmask.backbones import build_backbone  # noqa: E402
from selfmask.cli.main import main  # noqa: E402

Row = tuple[str, str, int, str]


class Payload:
    def __reduce__(self):  # noqa: ANN204
        return (os.system, ("touch /tmp/selfmask-PWNED",))


def user_lines(stderr: str) -> str:
    """The lines a user reads: selfmask's own messages (and a traceback's last line, if any)."""
    lines = stderr.splitlines()
    if any(ln.startswith("Traceback") for ln in lines):
        return "TRACEBACK: " + lines[-1]
    keep = [ln for ln in lines if ln.startswith(("selfmask", "  - "))]
    return "<br>".join(ln.strip() for ln in keep) or "(no message)"


def cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    return code, err.getvalue()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


def sub(argv: list[str], stop: Callable[[subprocess.Popen, Path], None] | None = None,
        out: Path | None = None) -> tuple[int, str]:
    proc = subprocess.Popen([sys.executable, "-m", "selfmask", *argv], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if stop is not None and out is not None:
        while not (out / "checkpoint.pt").is_file() and proc.poll() is None:
            time.sleep(0.01)
        stop(proc, out)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def write_images(root: Path, n: int = 16) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n // 2):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def write_cifar(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}, 2))
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch, 2))
    return root


def cases(tmp: Path) -> list[Row]:  # noqa: PLR0915 - one flat list of cases reads best
    rows: list[Row] = []
    img = write_images(tmp / "img")
    common = ["--cache-dir", str(tmp / "cache"), "--no-progress", "--no-eval"]
    good = ["adapt", "--data", f"folder:{img}", "--epochs", "1", "--batch-size", "8", *common]

    def add(category: str, what: str, result: tuple[int, str]) -> None:
        code, err = result
        rows.append((category, what, code, user_lines(err).replace(str(tmp), "$TMP")))
        print(f"  {category}: {what}: exit {code}", file=sys.stderr)

    def out(name: str) -> list[str]:
        return ["--out", str(tmp / "runs" / name)]

    # ---------------------------------------------------------------- data
    add("data", "unknown `--data` spec (`imagenet`)", cli(["adapt", "--data", "imagenet", *out("d1"), *common]))
    add("data", "`folder:` path that does not exist", cli(["adapt", "--data", f"folder:{tmp}/nope", *out("d2"), *common]))
    (tmp / "flat" / "train").mkdir(parents=True)
    (tmp / "flat" / "test").mkdir(parents=True)
    add("data", "image folder without class sub-folders",
        cli(["adapt", "--data", f"folder:{tmp}/flat", *out("d3"), *common]))
    (tmp / "noimg" / "train" / "cat").mkdir(parents=True)
    shutil.copytree(img / "test", tmp / "noimg" / "test")
    add("data", "class folder with no image file", cli(["adapt", "--data", f"folder:{tmp}/noimg", *out("d4"), *common]))
    bad_img = tmp / "badimg"
    shutil.copytree(img, bad_img)
    (bad_img / "train" / "c0" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    add("data", "an image file that is not an image",
        cli(["adapt", "--data", f"folder:{bad_img}", "--epochs", "1", *out("d5"), *common]))
    add("data", "`cifar10:` folder with no batches", cli(["adapt", "--data", f"cifar10:{img}", *out("d6"), *common]))
    cif = write_cifar(tmp / "cifar")
    batch = cif / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[:300])
    add("data", "truncated CIFAR batch", cli(["adapt", "--data", f"cifar10:{cif}", *out("d7"), *common]))
    cif2 = write_cifar(tmp / "cifar2")
    (cif2 / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload()}, 2))
    add("data", "CIFAR batch carrying a pickle payload (`os.system`)",
        cli(["adapt", "--data", f"cifar10:{cif2}", *out("d8"), *common]))

    # ---------------------------------------------------------------- weights
    state = build_backbone("resnet_tiny").state_dict()
    add("weights", "weights file that does not exist", cli([*good, "--weights", f"{tmp}/none.pt", *out("w1")]))
    (tmp / "w.npy").write_bytes(b"x")
    add("weights", "unsupported file type (`.npy`)", cli([*good, "--weights", f"{tmp}/w.npy", *out("w2")]))
    torch.save(state, tmp / "w.pt")
    (tmp / "cut.pt").write_bytes((tmp / "w.pt").read_bytes()[:5000])
    add("weights", "truncated `.pt` (zip archive)", cli([*good, "--weights", f"{tmp}/cut.pt", *out("w3")]))
    (tmp / "cut.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    add("weights", "corrupt `.safetensors`", cli([*good, "--weights", f"{tmp}/cut.safetensors", *out("w4")]))
    torch.save({"state_dict": state, "evil": Payload()}, tmp / "evil.pt")
    add("weights", "`.pt` carrying a pickle payload (`os.system`)", cli([*good, "--weights", f"{tmp}/evil.pt", *out("w5")]))
    torch.save(build_backbone("resnet_small").state_dict(), tmp / "small.pt")
    add("weights", "weights of another architecture (resnet_small into resnet_tiny)",
        cli([*good, "--weights", f"{tmp}/small.pt", *out("w6")]))

    # ---------------------------------------------------------------- configs
    add("config", "`--epochs 0`", cli([*good, "--epochs", "0", *out("c1")]))
    add("config", "`--lr -1`", cli([*good, "--lr", "-1", *out("c2")]))
    add("config", "`--method prune`", cli([*good, "--method", "prune", *out("c3")]))
    add("config", "`--backbone resnet_huge`", cli([*good, "--backbone", "resnet_huge", *out("c4")]))
    add("config", "`--device tpu`", cli([*good, "--device", "tpu", *out("c5")]))
    add("config", "`--device cuda` on a machine without CUDA", cli([*good, "--device", "cuda", *out("c6")]))
    (tmp / "bad.json").write_text("{epochs: 3")
    add("config", "`--config` file that is not JSON", cli([*good, "--config", f"{tmp}/bad.json", *out("c7")]))
    (tmp / "keys.json").write_text(json.dumps({"epochz": 3}))
    add("config", "`--config` file with an unknown key", cli([*good, "--config", f"{tmp}/keys.json", *out("c8")]))
    add("config", "several problems at once (epochs, weights, data, run folder)",
        cli(["adapt", "--data", f"folder:{tmp}/nope", "--epochs", "0", "--weights", f"{tmp}/none.pt",
             "--out", str(tmp / "w.pt"), *common]))
    add("config", "`--method fft --lr 1e30`: the loss becomes NaN/Inf",
        cli([*good, "--method", "fft", "--lr", "1e30", "--epochs", "2", *out("c10")]))

    # ---------------------------------------------------------------- run folder and disk
    add("run folder", "`--out` is an existing file", cli([*good, "--out", str(tmp / "w.pt")]))
    fin = tmp / "runs" / "finished"
    add("run folder", "a first run (for the next rows)", cli([*good, "--out", str(fin)]))
    add("run folder", "`--out` holds a finished run (no `--overwrite`)", cli([*good, "--out", str(fin)]))
    add("resume", "`--resume` a finished run", cli(["adapt", "--resume", str(fin), *common]))
    add("resume", "`--resume` with a training flag (`--epochs 5`)",
        cli(["adapt", "--resume", str(fin), "--epochs", "5", *common]))
    add("resume", "`--resume` a folder that is not a run", cli(["adapt", "--resume", str(img), *common]))
    for name, payload in (("garbage", b"garbage"), ("pickle payload (`os.system`)", None)):
        run = tmp / "runs" / f"resume-{len(rows)}"
        shutil.copytree(fin, run)
        (run / "status.json").write_text(json.dumps({"status": "interrupted"}))
        if payload is None:
            st = torch.load(run / "checkpoint.pt", weights_only=True)
            st["rng"]["evil"] = Payload()
            torch.save(st, run / "checkpoint.pt")
        else:
            (run / "checkpoint.pt").write_bytes(payload)
        add("resume", f"`--resume` with a checkpoint.pt that is {name}", cli(["adapt", "--resume", str(run), *common]))
    run = tmp / "runs" / "no-ckpt"
    shutil.copytree(fin, run)
    (run / "checkpoint.pt").unlink()
    (run / "status.json").write_text(json.dumps({"status": "interrupted"}))
    add("resume", "`--resume` a run that wrote no checkpoint", cli(["adapt", "--resume", str(run), *common]))

    mnt = tmp / "small-disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    try:
        if mounted:
            add("disk", "run folder on a 1 MiB file system (tmpfs)", cli([*good, "--out", str(mnt / "run")]))
            subprocess.run(["umount", str(mnt)], check=False)
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=90m", "tmpfs", str(mnt)], check=True)
            slow = ["adapt", "--data", f"folder:{img}", "--epochs", "3", "--batch-size", "2", "--checkpoint-every", "1",
                    *common, "--out", str(mnt / "run")]

            def fill(proc: subprocess.Popen, _out: Path) -> None:  # another process takes the rest of the disk
                subprocess.run(["dd", "if=/dev/zero", f"of={mnt}/filler", "bs=1M", "count=200"], capture_output=True)

            add("disk", "the disk fills up during training (90 MiB tmpfs, filled after the first checkpoint)",
                sub(slow, fill, mnt / "run"))
            (mnt / "filler").unlink()
            add("disk", "`--resume` after freeing the space", sub(["adapt", "--resume", str(mnt / "run"), *common]))
        else:
            rows.append(("disk", "small file system", -1, "(not run: mounting a tmpfs needs root)"))
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)

    # ---------------------------------------------------------------- signals (real subprocesses)
    slow = ["adapt", "--data", f"folder:{img}", "--epochs", "3", "--batch-size", "2", "--checkpoint-every", "1", *common]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        run = tmp / "runs" / sig.name
        add("signals", f"{sig.name} after the first checkpoint",
            sub([*slow, "--out", str(run)], lambda p, _o, s=sig: p.send_signal(s), run))
        status = json.loads((run / "status.json").read_text())
        rows[-1] = (*rows[-1][:3], rows[-1][3] + f"<br>status.json: `{json.dumps(status)}`")
        add("signals", f"`--resume` after {sig.name}", sub(["adapt", "--resume", str(run), *common]))
        if rows[-1][2] == 0:
            rows[-1] = (*rows[-1][:3], "(finished; scores identical to an uninterrupted run: see tests/test_cli_resume.py)")

    # ---------------------------------------------------------------- mask files (selfmask inspect)
    from selfmask.masking import MaskConfig, mask_model
    from selfmask.storage import save_mask

    model = build_backbone("resnet_tiny")
    mask_model(model, MaskConfig())
    good_mask = tmp / "m.mask"
    save_mask(model, good_mask)
    data = good_mask.read_bytes()
    variants = {
        "missing file": None,
        "empty file": b"",
        "truncated to half": data[: len(data) // 2],
        "one byte flipped in the payload": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
        "header length forged to 2^63": (2**63).to_bytes(8, "little") + data[8:],
        "a safetensors file that is not a mask file": (tmp / "w.safetensors").read_bytes()
        if (tmp / "w.safetensors").exists() else None,
        "a weights `.pt` given as a mask file": (tmp / "w.pt").read_bytes(),
    }
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp / "w.safetensors")
    variants["a safetensors file that is not a mask file"] = (tmp / "w.safetensors").read_bytes()
    for what, content in variants.items():
        path = tmp / f"bad-{len(rows)}.mask"
        if content is not None:
            path.write_bytes(content)
        add("mask files", f"`selfmask inspect`: {what}", cli(["inspect", str(path)]))
    return rows


def main_table() -> None:
    with tempfile.TemporaryDirectory(prefix="selfmask-bad-inputs-") as tmp:
        rows = cases(Path(tmp))
    print("| category | bad input | exit | what the user sees |")
    print("|---|---|---|---|")
    for category, what, code, message in rows:
        print(f"| {category} | {what} | {code} | {message.replace('|', '/')} |")
    if Path("/tmp/selfmask-PWNED").exists():
        print("\nWARNING: a pickle payload ran (/tmp/selfmask-PWNED exists)")


if __name__ == "__main__":
    main_table()
