"""Hostile files: pickle payloads in backbone weights, resume checkpoints and CIFAR batches never run.

Every crafted file carries an object whose ``__reduce__`` would create a marker file when
unpickled (through ``os.system``, ``exec`` or ``eval``). Each reader must refuse the file with a
:class:`SelfmaskError` naming it, and the marker must never appear.
"""

from __future__ import annotations

import argparse
import builtins
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from selfmask.backbones import backbone_info, build_backbone, create_backbone
from selfmask.cli.main import main
from selfmask.data.cifar import load_cifar
from selfmask.data.sources import load_data
from selfmask.errors import SelfmaskError
from selfmask.training.config import TrainConfig
from selfmask.training.run_folder import RunFolder
from selfmask.training.trainer import adapt


class Payload:
    """Unpickling this object runs ``how`` on a command that creates ``marker``."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):  # noqa: ANN204
        m = str(self.marker)
        if self.how == "system":
            return (os.system, (f"touch '{m}'",))
        if self.how == "exec":
            return (builtins.exec, (f"open({m!r}, 'w').close()",))
        return (builtins.eval, (f"open({m!r}, 'w').close()",))


HOW = ("system", "exec", "eval")


def _armed(tmp_path: Path, how: str) -> tuple[Path, Payload]:
    marker = tmp_path / f"PWNED-{how}"
    payload = Payload(marker, how)
    # the payload is live: a plain pickle.loads would run it (checked on a copy, then removed)
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()
    marker.unlink()
    return marker, payload


def _tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_backbone("resnet_tiny").state_dict()


# --------------------------------------------------------------------------- backbone weights
def _weight_files(tmp_path: Path, payload: Payload) -> dict[str, Path]:
    state = _tiny_state()
    files = {
        "beside the tensors": ({**state, "evil": payload}, {}),
        "in a container": ({"state_dict": state, "epoch": 3, "opt": payload}, {}),
        "in argparse args": ({"model": state, "args": argparse.Namespace(lr=0.1, hook=payload)}, {}),
        "legacy format": ({**state, "evil": payload}, {"_use_new_zipfile_serialization": False}),
    }
    out = {}
    for i, (label, (obj, kw)) in enumerate(files.items()):
        path = tmp_path / f"weights{i}.pth"
        torch.save(obj, path, **kw)
        out[label] = path
    bare = tmp_path / "bare.pt"  # a plain pickle with a .pt name
    bare.write_bytes(pickle.dumps({"conv1.weight": payload}, protocol=2))
    out["bare pickle"] = bare
    return out


@pytest.mark.parametrize("how", HOW)
def test_backbone_weights_with_a_payload_are_refused(tmp_path, how) -> None:
    marker, payload = _armed(tmp_path, how)
    for label, path in _weight_files(tmp_path, payload).items():
        with pytest.raises(SelfmaskError) as err:
            create_backbone("resnet_tiny", weights=path)
        msg = str(err.value)
        assert msg.startswith(f"weights file {str(path)!r} holds Python objects other than tensors"), (label, msg)
        assert "not unpickled for safety" in msg and "save its state dict (tensors only) instead" in msg
        assert {"system": "posix.system", "exec": "exec", "eval": "eval"}[how] in msg  # names the culprit
        assert "safe_globals" not in msg and "weights_only" not in msg  # no advice to allowlist or unpickle it
        assert not marker.exists(), label


def test_the_same_files_without_payload_load(tmp_path) -> None:
    """Control: the containers used above are accepted when they hold only tensors and plain data."""
    state = _tiny_state()
    path = tmp_path / "ok.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1, arch="resnet_tiny")}, path)
    model = create_backbone("resnet_tiny", weights=path)
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])


def test_weights_payload_through_the_cli_exits_2_and_never_runs(tmp_path, capsys) -> None:
    marker, payload = _armed(tmp_path, "system")
    path = _weight_files(tmp_path, payload)["in a container"]
    img = tmp_path / "img"
    from test_cli_resume import write_image_folder

    write_image_folder(img, n_train=8, n_test=4)
    code = main(["adapt", "--data", f"folder:{img}", "--weights", str(path), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and "not unpickled for safety" in capsys.readouterr().err
    assert not marker.exists()


# --------------------------------------------------------------------------- resume checkpoints
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished one-epoch run folder whose config.json names a small image folder."""
    from test_cli_resume import write_image_folder

    base = tmp_path_factory.mktemp("hostile_run")
    img = write_image_folder(base / "img", n_train=16, n_test=4)
    run = RunFolder(base / "run").prepare()
    cfg = TrainConfig(epochs=1, batch_size=8, seed=0)
    torch.manual_seed(0)
    data = load_data(f"folder:{img}", resolution=32, cache_dir=base / "cache")[0]
    adapt(build_backbone("resnet_tiny"), backbone_info("resnet_tiny"), data, cfg, run=run, progress=False,
          run_meta={"weights": None, "data_spec": f"folder:{img}"})
    return base, cfg, data


def _plant(run_dir: Path, payload: Payload, tmp_path: Path) -> Path:
    """Copy the run folder, mark it interrupted and swap in a checkpoint carrying ``payload``."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run_dir, dst)
    (dst / "status.json").write_text(json.dumps({"status": "interrupted", "epoch": 0, "step": 1}))
    state = torch.load(dst / "checkpoint.pt", weights_only=True)
    state["rng"]["evil"] = payload  # deep inside an otherwise valid checkpoint
    torch.save(state, dst / "checkpoint.pt")
    return dst


@pytest.mark.parametrize("how", HOW)
def test_resume_checkpoint_with_a_payload_is_refused(tmp_path, trained_run, how) -> None:
    base, cfg, data = trained_run
    marker, payload = _armed(tmp_path, how)
    run = _plant(base / "run", payload, tmp_path)
    with pytest.raises(SelfmaskError, match=r"cannot resume: .*checkpoint\.pt is unreadable or not a selfmask "
                                            r"checkpoint \(UnpicklingError\)"):
        adapt(build_backbone("resnet_tiny"), backbone_info("resnet_tiny"), data, cfg, run=RunFolder(run),
              progress=False, resume=True)
    assert not marker.exists()


def test_resume_checkpoint_payload_through_the_cli(tmp_path, trained_run, capsys) -> None:
    base, _cfg, _data = trained_run
    marker, payload = _armed(tmp_path, "system")
    run = _plant(base / "run", payload, tmp_path)
    code = main(["adapt", "--resume", str(run), "--no-progress", "--no-eval", "--cache-dir", str(base / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot resume: {run / 'checkpoint.pt'} is unreadable or not a selfmask checkpoint" in err
    assert not marker.exists()


# --------------------------------------------------------------------------- CIFAR batches
def _cifar10(root: Path, poison: dict[str, object]) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in names]}, protocol=2))
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [0, 1]}
        batch.update(poison.get(name, {}))
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("where", ["beside the data", "inside an object array"])
def test_cifar_batch_with_a_payload_is_refused(tmp_path, how, where) -> None:
    marker, payload = _armed(tmp_path, how)
    evil = payload if where == "beside the data" else np.array([payload, 1], dtype=object)
    folder = _cifar10(tmp_path, {"data_batch_4": {b"x": evil}})
    for load in (lambda: load_cifar(tmp_path, "train"), lambda: load_data(f"cifar10:{tmp_path}")):
        with pytest.raises(SelfmaskError) as err:
            load()
        assert str(err.value).startswith(f"CIFAR file {str(folder / 'data_batch_4')!r} was refused: global ")
        assert "is not allowed in a CIFAR batch" in str(err.value)
    assert not marker.exists()
    assert len(load_cifar(tmp_path, "test")) == 2  # the clean files still load

