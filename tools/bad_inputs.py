"""Run every bad input we know of through the real command line; print what the user sees.

    PYTHONPATH=src python tools/bad_inputs.py > table.md      (about 2-4 minutes on 2 cores)
    PYTHONPATH=src python tools/bad_inputs.py --only red-team --check   (issue 16's cases; CI runs these)

Builds its own small inputs in a temporary folder (an image folder, CIFAR batches, weights, mask
files, run folders), runs ``selfmask`` on each bad variant (in-process through
``selfmask.cli.main.main`` where that is the same thing, as a subprocess for signals and a full
disk) and prints a Markdown table: category, input, exit code, and the message the user sees (the
temporary folder shown as ``$TMP``). docs/reliability.md holds its output.

Every case says what it expects (an error: exit 2 with one clear line; or an exit code)
and which files must survive it. At the end the tool counts **tracebacks**, **silent
results** (exit 0, or no message, where an error was expected, or a check on the
output that failed) and **lost files** (a protected file changed, replaced or deleted);
``--check`` exits 1 unless all three are 0. ``tests/test_bad_inputs.py`` runs the
``red-team`` group (issue 16's cases) that way in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from selfmask.backbones import build_backbone  # noqa: E402
from selfmask.cli.main import main  # noqa: E402

Row = tuple[str, str, int, str]
#: an expected outcome: ``"error"`` (exit 2 and a message) or an exit code
Expect = str | int


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
    handler = logging.StreamHandler(err)  # warnings the command logs (a terminal shows them on stderr)
    handler.setLevel(logging.WARNING)
    logging.getLogger("selfmask").addHandler(handler)
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
        except Exception:  # noqa: BLE001 - what `python -m selfmask` would print: a traceback, exit 1
            err.write(traceback.format_exc())
            code = 1
        finally:
            logging.getLogger("selfmask").removeHandler(handler)
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


def snapshot(paths: list[Path]) -> dict[str, str]:
    """What each protected path is now: its kind and, for files, a hash of the bytes (folders: recursively)."""
    out: dict[str, str] = {}
    for root in paths:
        for p in [root, *(sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])]:
            try:
                st = p.lstat()
            except FileNotFoundError:
                out[str(p)] = "missing"
                continue
            if p.is_file() and not p.is_symlink():
                out[str(p)] = "file " + hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[str(p)] = f"mode {st.st_mode:o}"
    return out


class Ledger:
    """The table's rows, and the cases whose outcome was not what they expect."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.rows: list[Row] = []
        self.tracebacks: list[str] = []
        self.silent: list[str] = []
        self.lost: list[str] = []

    def run(self, category: str, what: str, call: Callable[[], tuple[int, str]] | tuple[int, str], *,
            expect: Expect = "error", protect: tuple[Path, ...] = (),
            check: Callable[[int, str], str | None] | None = None) -> int:
        """Run one case (``call``, or the result of one already run); ``protect``: paths that must be
        unchanged after it; ``check``: returns a problem with the output, if any."""
        before = snapshot(list(protect))
        code, err = call() if callable(call) else call
        message = user_lines(err)
        label = f"{category}: {what}"
        if message.startswith("TRACEBACK"):
            self.tracebacks.append(f"{label}: {message}")
        elif expect == "error" and (code != 2 or message == "(no message)"):
            self.silent.append(f"{label}: exit {code}, {message}")
        elif expect != "error" and code != expect:
            self.silent.append(f"{label}: exit {code} (expected {expect}), {message}")
        problem = check(code, err) if check is not None else None
        if problem:
            self.silent.append(f"{label}: {problem}")
        after = snapshot(list(protect))
        changed = [k for k in before if before[k] != after.get(k)] + [k for k in after if k not in before]
        if changed:
            self.lost.append(f"{label}: changed or removed: {', '.join(changed[:5])}")
        self.rows.append((category, what, code, message.replace(str(self.tmp), "$TMP")))
        print(f"  {label}: exit {code}", file=sys.stderr)
        return code

    def note(self, text: str) -> None:
        """Append to the last row's message."""
        self.rows[-1] = (*self.rows[-1][:3], self.rows[-1][3] + text.replace(str(self.tmp), "$TMP"))

    def summary(self) -> str:
        return f"{len(self.tracebacks)} tracebacks, {len(self.silent)} silent results, {len(self.lost)} lost files"


def cases(led: Ledger) -> None:  # noqa: PLR0915 - one flat list of cases reads best
    tmp = led.tmp
    rows = led.rows
    img = write_images(tmp / "img")
    common = ["--cache-dir", str(tmp / "cache"), "--no-progress", "--no-eval"]
    good = ["adapt", "--data", f"folder:{img}", "--epochs", "1", "--batch-size", "8", *common]

    def add(category: str, what: str, result: tuple[int, str], expect: Expect = "error") -> None:
        led.run(category, what, result, expect=expect)

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
    add("run folder", "a first run (for the next rows)", cli([*good, "--out", str(fin)]), expect=0)
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
            add("disk", "`--resume` after freeing the space", sub(["adapt", "--resume", str(mnt / "run"), *common]),
                expect=0)
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
            sub([*slow, "--out", str(run)], lambda p, _o, s=sig: p.send_signal(s), run),
            expect={signal.SIGINT: 130, signal.SIGTERM: 143}.get(sig, -9))
        status = json.loads((run / "status.json").read_text())
        rows[-1] = (*rows[-1][:3], rows[-1][3] + f"<br>status.json: `{json.dumps(status)}`")
        add("signals", f"`--resume` after {sig.name}", sub(["adapt", "--resume", str(run), *common]), expect=0)
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


def in_process(argv: list[str]) -> Callable[[], tuple[int, str]]:
    return lambda: cli(argv)


def python(code: str, *args: str) -> Callable[[], tuple[int, str]]:
    """A separate Python process running ``code`` (with ``sys.argv[1:] = args``): real signals, real locks."""
    def call() -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-c", code, *args], env=env(), capture_output=True, text=True,
                              timeout=600)
        return proc.returncode, proc.stderr
    return call


def while_writing(argv: list[str], action: Callable[[], None]) -> Callable[[], tuple[int, str]]:
    """The command (in this process), with ``action`` run as its output is flushed to disk.

    ``fail_with("ENOSPC")`` is a full disk at that moment, ``fail_with("EROFS")`` a read-only
    file system, ``sigterm_self`` a SIGTERM from a scheduler (``selfmask.cli.main`` handles it
    the same in this process as in its own).
    """
    def call() -> tuple[int, str]:
        real = os.fsync

        def fsync(fd: int) -> None:
            real(fd)
            action()

        os.fsync = fsync
        try:
            return cli(argv)
        finally:
            os.fsync = real
    return call


def fail_with(name: str) -> Callable[[], None]:
    """An action that fails as the file system would (``name``: ENOSPC, EROFS, ...)."""
    import errno

    def action() -> None:
        code = getattr(errno, name)
        raise OSError(code, os.strerror(code))
    return action


def sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler runs (and raises) before this returns


#: ``python -c`` code: hold the run folder sys.argv[1] as a running ``adapt`` would, then run sys.argv[2:]
SECOND_PROCESS = """
import subprocess, sys
from selfmask.training.ownership import claim
claim(sys.argv[1])
proc = subprocess.run([sys.executable, "-m", "selfmask", *sys.argv[2:]], capture_output=True, text=True)
sys.stderr.write(proc.stderr)
sys.exit(proc.returncode)
"""

def sigterm_in_evaluation(argv: list[str]) -> Callable[[], tuple[int, str]]:
    """``adapt`` stopped by SIGTERM as its final evaluation starts."""
    import selfmask.experiments.evaluate as evaluate

    def call() -> tuple[int, str]:
        real = evaluate.evaluate_features
        evaluate.evaluate_features = lambda *_a, **_k: sigterm_self()
        try:
            return cli(argv)
        finally:
            evaluate.evaluate_features = real
    return call


def leftovers(folder: Path, keep: set[str]) -> Callable[[int, str], str | None]:
    """A check: nothing but ``keep`` in ``folder`` (no output, no temporary file)."""
    def check(_code: int, _err: str) -> str | None:
        extra = sorted(p.name for p in folder.iterdir() if p.name not in keep)
        return f"left behind: {extra}" if extra else None
    return check


def red_team_cases(led: Ledger) -> None:  # noqa: PLR0915 - one flat list of cases reads best
    """Issue 16: the storage workflow on default runs, user files, resume and data loaders."""
    from safetensors.torch import load_file, save_file

    tmp = led.tmp / "rt"
    tmp.mkdir()
    img = write_images(tmp / "img")
    cache = ["--cache-dir", str(tmp / "cache"), "--no-progress"]
    common = [*cache, "--no-eval"]
    torch.manual_seed(5)
    base = tmp / "base.pt"
    torch.save(build_backbone("resnet_tiny").state_dict(), base)

    def adapt(data: str, out: Path, *extra: str) -> list[str]:
        return ["adapt", "--data", data, "--epochs", "1", "--batch-size", "8", *common, "--out", str(out), *extra]

    good = f"folder:{img}"
    run = tmp / "runs" / "default"
    r = led.run

    # ---------------------------------------------------------------- mask files of a default (--bn train) run
    r("storage", "a default (`--bn train`) run, with base weights", in_process(adapt(good, run, "--weights", str(base))),
      expect=0)
    mask = tmp / "t.mask"
    r("storage", "`pack` that run", in_process(["pack", str(run), "-o", str(mask)]), expect=0)

    def same_outputs(code: int, _err: str) -> str | None:
        if code != 0:
            return None
        from selfmask.training.run_folder import load_run

        masked, _head, _cfg = load_run(run)
        plain = build_backbone("resnet_tiny")
        plain.load_state_dict(load_file(str(tmp / "m.safetensors")))
        x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            diff = float((plain.eval()(x) - masked.eval()(x)).abs().max())
        led.note(f"<br>(max output difference to the masked model: {diff:.1e})")
        return None if diff <= 1e-6 else f"merged model differs from the masked model by {diff}"

    r("storage", "`apply` that mask file to the base weights (outputs must match the masked model to 1e-6)",
      in_process(["apply", str(mask), "--backbone", "resnet_tiny", "--weights", str(base), "-o",
                  str(tmp / "m.safetensors")]), expect=0, check=same_outputs)
    from selfmask.storage import load_run as rebuild, save_mask

    rebuilt = rebuild(run)
    old = tmp / "old.mask"
    save_mask(rebuilt.model, old, backbone="resnet_tiny", extra=rebuilt.extra, source=rebuilt.source)  # the old way
    r("storage", "`apply` a mask file of the old code (fingerprint taken with the trained statistics)",
      in_process(["apply", str(old), "--backbone", "resnet_tiny", "--weights", str(base), "-o",
                  str(tmp / "m2.safetensors")]), expect=0)
    led.note("<br>(stdout: selfmask apply: warning: apply_mask: note: this mask file was written by an older "
             "selfmask whose fingerprint included the trained BatchNorm statistics ...)")

    # ---------------------------------------------------------------- labels and data
    from PIL import Image

    def folder(root: Path, train: tuple[str, ...], test: tuple[str, ...]) -> Path:
        for split, classes in (("train", train), ("test", test)):
            for c in classes:
                (root / split / c).mkdir(parents=True, exist_ok=True)
                for i in range(4):
                    colour = (255, 0, 0) if c == "red" else (0, 0, 255) if c == "blue" else (0, 255, 0)
                    Image.new("RGB", (32, 32), colour).save(root / split / c / f"{i}.png")
        return root

    fewer = folder(tmp / "fewer", ("blue", "red"), ("red",))

    def perfect(code: int, _err: str) -> str | None:
        if code != 0:
            return None
        acc = json.loads((tmp / "runs" / "fewer" / "results.json").read_text())["knn_accuracy"]
        led.note(f"<br>(k-NN accuracy {acc:.3f}; test images are copies of training images)")
        return None if acc == 1.0 else f"k-NN accuracy {acc} on copies of training images (labels shifted?)"

    r("data", "`folder:` whose `test/` has fewer class folders than `train/`",
      in_process(["adapt", "--data", f"folder:{fewer}", "--epochs", "1", "--batch-size", "8", *cache, "--no-probe",
                  "--knn-k", "1", "--out", str(tmp / "runs" / "fewer")]), expect=0, check=perfect)
    other = folder(tmp / "other", ("blue", "red"), ("green", "red"))
    r("data", "`folder:` whose `test/` has a class with no training images",
      in_process(adapt(f"folder:{other}", tmp / "runs" / "d2")))
    images = tmp / "split-images"
    images.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (32, 32)).save(images / name)
    Image.new("RGB", (32, 32)).save(tmp / "secret.png")

    def split_spec(name: str, train: list) -> str:
        (tmp / name).write_text(json.dumps({"train": train, "val": [], "test": [["a.png", 0, "a"]]}))
        return f"split:{tmp / name}:{images}"

    r("data", "split-file label of 10**10", in_process(adapt(split_spec("s1.json", [["a.png", 0, "a"],
                                                                                  ["b.png", 10**10, "b"]]),
                                                               tmp / "runs" / "d3")))
    r("data", "split-file path with `..`", in_process(adapt(split_spec("s2.json", [["a.png", 0, "a"],
                                                                                 ["../secret.png", 1, "b"]]),
                                                              tmp / "runs" / "d4")))
    r("data", "split-file path that is absolute", in_process(adapt(split_spec("s3.json", [["a.png", 0, "a"],
                                                                                        [str(tmp / "secret.png"), 1,
                                                                                         "b"]]),
                                                                     tmp / "runs" / "d5")))
    links = tmp / "links"
    shutil.copytree(img, links)
    (links / "train" / "c0" / "gone.png").symlink_to(tmp / "nowhere.png")
    (links / "train" / "c1" / "x.png").symlink_to("y.png")
    (links / "train" / "c1" / "y.png").symlink_to("x.png")

    def reported(_code: int, err: str) -> str | None:
        line = next((ln for ln in err.splitlines() if "skipped" in ln), None)
        if line is None:
            return "the skipped images were not reported"
        led.note("<br>" + line.strip())
        return None

    r("data", "dangling and looping symlinked images", in_process(adapt(f"folder:{links}", tmp / "runs" / "d6")),
      expect=0, check=reported)

    # ---------------------------------------------------------------- user files and run folders
    mine = tmp / "mine"
    (mine / "plots").mkdir(parents=True)
    for name in ("config.json", "results.json", "log.txt", "plots/figure.png"):
        (mine / name).write_text("the user's own file\n")
    r("run folder", "`--out` a folder of the user's (config.json, results.json, log.txt, plots/) that holds no run",
      in_process(adapt(good, mine)), protect=(mine,))
    r("run folder", "the same with `--overwrite`", in_process(adapt(good, mine, "--overwrite")), protect=(mine,))
    finished = tmp / "runs" / "s"
    shutil.copytree(run, finished)
    r("run folder", "`--init-from S --out S --overwrite` (S a finished run)",
      in_process(adapt(good, finished, "--init-from", str(finished), "--overwrite")), protect=(finished,))
    busy = tmp / "runs" / "busy"
    busy.mkdir()
    (busy / ".selfmask-run").write_text('{"selfmask": "run folder"}\n')  # a run folder, held by another process
    r("run folder", "a second `adapt` process on a run folder another process holds",
      python(SECOND_PROCESS, str(busy), *adapt(good, busy)), protect=(busy,))
    before = mask.read_bytes()
    r("outputs", "`apply X.mask -o X.mask --overwrite`",
      in_process(["apply", str(mask), "--backbone", "resnet_tiny", "--weights", str(base), "-o", str(mask),
                  "--overwrite"]), protect=(mask,))
    r("outputs", "`pack RUN -o RUN/scores.safetensors --overwrite`",
      in_process(["pack", str(finished), "-o", str(finished / "scores.safetensors"), "--overwrite"]),
      protect=(finished,))
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    r("outputs", "`apply ... -o FIFO --overwrite`",
      in_process(["apply", str(mask), "--backbone", "resnet_tiny", "--weights", str(base), "-o", str(fifo),
                  "--overwrite"]), protect=(fifo,))
    if os.geteuid() == 0:
        dev = tmp / "null-device"
        os.mknod(dev, 0o020666, os.makedev(1, 3))  # a character device like /dev/null, inside the temporary folder
        r("outputs", "`pack ... -o CHARACTER_DEVICE --overwrite`",
          in_process(["pack", str(run), "-o", str(dev), "--overwrite"]), protect=(dev,))
    assert mask.read_bytes() == before

    # ---------------------------------------------------------------- resume
    def interrupted(name: str, **edits: object) -> Path:
        folder_ = tmp / "runs" / name
        shutil.copytree(run, folder_)
        (folder_ / "status.json").write_text(json.dumps({"status": "interrupted"}))
        cfg = json.loads((folder_ / "config.json").read_text())
        (folder_ / "config.json").write_text(json.dumps({**cfg, **edits}))
        return folder_

    def resume(folder_: Path) -> Callable[[], tuple[int, str]]:
        return in_process(["adapt", "--resume", str(folder_), *common])

    r("resume", "`--resume` after `config.json`'s `data_spec` was edited",
      resume(interrupted("e1", data_spec=f"folder:{fewer}")))
    torch.manual_seed(9)
    torch.save(build_backbone("resnet_tiny").state_dict(), tmp / "other.pt")
    r("resume", "`--resume` after `config.json`'s `weights` was edited",
      resume(interrupted("e2", weights=str(tmp / "other.pt"))))
    e3 = interrupted("e3")
    saved = base.read_bytes()
    shutil.copy(tmp / "other.pt", base)
    r("resume", "`--resume` after the weights file was replaced (same path, other numbers)", resume(e3))
    base.write_bytes(saved)
    for i, edit in enumerate(({"backbone": 5}, {"data_spec": 5}, {"weights": 5}, {"seed": "0"})):
        r("resume", f"`--resume` after `config.json` got `{json.dumps(edit)}`", resume(interrupted(f"t{i}", **edit)))
    r("resume", "`--resume` a stopped run whose `config.json` was not edited", resume(interrupted("e4")), expect=0)

    # ---------------------------------------------------------------- typed settings, numbers, weights
    for i, content in enumerate(({"weights": 5}, {"seed": "0"}, {"data": 5}, {"augment": "no"})):
        cfg_file = tmp / f"cfg{i}.json"
        cfg_file.write_text(json.dumps(content))
        r("config", f"`--config` file `{json.dumps(content)}`",
          in_process(adapt(good, tmp / "runs" / f"c{i}", "--config", str(cfg_file))))
    r("config", "`--seed 10**20`", in_process(adapt(good, tmp / "runs" / "n1", "--seed", str(10**20))))
    r("config", "`--epochs 10**20`", in_process(adapt(good, tmp / "runs" / "n2", "--epochs", str(10**20))))
    state = build_backbone("resnet_tiny").state_dict()
    for dtype in (torch.int64, torch.bool):
        path = tmp / f"w-{str(dtype).removeprefix('torch.')}.safetensors"
        save_file({k: (v * 10).to(dtype) if v.is_floating_point() else v for k, v in state.items()}, str(path))
        r("weights", f"`.safetensors` weights of dtype {str(dtype).removeprefix('torch.')}",
          in_process(adapt(good, tmp / "runs" / f"w{dtype}", "--weights", str(path))))

    # ---------------------------------------------------------------- writers, signals (separate processes)
    outs = tmp / "outs"
    outs.mkdir()
    for errno_ in ("ENOSPC", "EROFS"):
        what = {"ENOSPC": "a full disk", "EROFS": "a read-only file system"}[errno_]
        r("writers", f"`pack` onto {what}",
          while_writing(["pack", str(run), "-o", str(outs / "t.mask")], fail_with(errno_)), check=leftovers(outs, set()))
        r("writers", f"`apply` onto {what}",
          while_writing(["apply", str(mask), "--backbone", "resnet_tiny", "--weights", str(base), "-o",
                         str(outs / "m.safetensors")], fail_with(errno_)), check=leftovers(outs, set()))
    r("signals", "SIGTERM while `pack` writes its output",
      while_writing(["pack", str(run), "-o", str(outs / "t.mask")], sigterm_self), expect=143,
      check=leftovers(outs, set()))
    r("signals", "SIGTERM while `apply` writes its output",
      while_writing(["apply", str(mask), "--backbone", "resnet_tiny", "--weights", str(base), "-o",
                     str(outs / "m.safetensors")], sigterm_self), expect=143, check=leftovers(outs, set()))
    ev = tmp / "runs" / "eval"
    evaluated = ["adapt", "--data", good, "--epochs", "1", "--batch-size", "8", *cache, "--no-probe", "--out", str(ev)]
    r("signals", "SIGTERM during the final evaluation", sigterm_in_evaluation(evaluated), expect=143)
    led.note(f"<br>status.json: `{json.dumps(json.loads((ev / 'status.json').read_text()))}`")
    r("signals", "`--resume` after SIGTERM during the final evaluation",
      in_process(["adapt", "--resume", str(ev), *cache, "--no-probe"]), expect=0,
      check=lambda code, _e: None if (ev / "results.json").is_file() else "no results.json")


GROUPS = {"all": cases, "red-team": red_team_cases}


def main_table(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(GROUPS), default=None, help="run one group of cases")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless there are 0 tracebacks, 0 silent results and 0 lost files")
    args = parser.parse_args(argv)
    led = run_groups([args.only] if args.only else list(GROUPS))
    print("| category | bad input | exit | what the user sees |")
    print("|---|---|---|---|")
    for category, what, code, message in led.rows:
        print(f"| {category} | {what} | {code} | {message.replace('|', '/')} |")
    print(f"\n{len(led.rows)} cases: {led.summary()}")
    for line in led.tracebacks + led.silent + led.lost:
        print(f"  - {line}")
    if Path("/tmp/selfmask-PWNED").exists():
        print("\nWARNING: a pickle payload ran (/tmp/selfmask-PWNED exists)")
        return 1
    return 1 if args.check and (led.tracebacks or led.silent or led.lost) else 0


def run_groups(groups: list[str]) -> Ledger:
    """Run the named groups of cases in a temporary folder; the ledger of what happened."""
    with tempfile.TemporaryDirectory(prefix="selfmask-bad-inputs-") as tmp:
        led = Ledger(Path(tmp))
        for name in groups:
            GROUPS[name](led)
    return led


if __name__ == "__main__":
    sys.exit(main_table())
