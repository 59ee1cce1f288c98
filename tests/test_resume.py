"""Crash-safe training: checkpoints, kill-and-resume to bit-identical masks, clean SIGINT stops."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import selfmask.training.loop as loop
from conftest import make_stripes
from selfmask.backbones import backbone_info, build_backbone
from selfmask.errors import SelfmaskError
from selfmask.masking import mask_scores
from selfmask.training.config import TrainConfig
from selfmask.training.run_folder import RunFolder
from selfmask.training.trainer import adapt

INFO = backbone_info("resnet_tiny")
DATA = make_stripes(96, seed=0)
CFG = TrainConfig(epochs=2, batch_size=16, checkpoint_every=2, seed=1, warmup_epochs=0.5)


def _bb():
    torch.manual_seed(0)
    return build_backbone("resnet_tiny")


def _scores(result):
    return {k: v.detach().clone() for k, v in mask_scores(result.backbone).items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = RunFolder(tmp_path_factory.mktemp("ref") / "run").prepare()
    res = adapt(_bb(), INFO, DATA, CFG, run=run, progress=False)
    return _scores(res), res.history


class Killed(Exception):
    pass


def test_kill_after_checkpoint_and_resume_is_bit_identical(tmp_path, monkeypatch, reference) -> None:
    ref_scores, ref_hist = reference
    real_save = loop.save_checkpoint
    calls = {"n": 0}

    def save_then_die(path, spec, epoch, batch, step, *a, **k):
        real_save(path, spec, epoch, batch, step, *a, **k)
        calls["n"] += 1
        if step == 8:  # mid-epoch 2 (6 steps per epoch): everything after this is lost
            raise Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        adapt(_bb(), INFO, DATA, CFG, run=RunFolder(tmp_path / "run").prepare(), progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = adapt(_bb(), INFO, DATA, CFG, run=RunFolder(tmp_path / "run").prepare(), progress=False, resume=True)
    for k, v in ref_scores.items():
        assert torch.equal(v, _scores(resumed)[k]), k
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in ref_hist]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_sigint_stops_cleanly_then_resumes(tmp_path, reference) -> None:
    ref_scores, _ = reference
    bb = _bb()
    count = {"n": 0}

    def interrupt(*_a):
        count["n"] += 1
        if count["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    handle = bb.register_forward_hook(interrupt)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when started in the background (nohup ... &)
    with pytest.raises(KeyboardInterrupt):
        adapt(bb, INFO, DATA, CFG, run=RunFolder(tmp_path / "run").prepare(), progress=False)
    handle.remove()
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == 3
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # whatever handler was there is restored
    resumed = adapt(_bb(), INFO, DATA, CFG, run=RunFolder(tmp_path / "run").prepare(), progress=False, resume=True)
    for k, v in ref_scores.items():
        assert torch.equal(v, _scores(resumed)[k]), k


def test_sigint_handler_found_is_restored_even_sig_ign(tmp_path) -> None:
    """Started in the background (``nohup ... &``) SIGINT is ignored; training must leave it ignored."""
    bb = _bb()
    handle = bb.register_forward_hook(lambda *_a: os.kill(os.getpid(), signal.SIGINT))
    original = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt):  # training's own handler still stops the run cleanly
            adapt(bb, INFO, DATA, CFG, run=RunFolder(tmp_path / "run").prepare(), progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, original)
        handle.remove()
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "interrupted"


def test_resume_refuses_other_settings_or_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(SelfmaskError, match="does not exist"):
        adapt(_bb(), INFO, DATA, CFG, run=RunFolder(tmp_path / "a").prepare(), progress=False, resume=True)
    adapt(_bb(), INFO, DATA, TrainConfig(epochs=1, batch_size=16), run=RunFolder(tmp_path / "b").prepare(), progress=False)
    with pytest.raises(SelfmaskError, match="different settings"):
        adapt(_bb(), INFO, DATA, TrainConfig(epochs=1, batch_size=16, lr=1.0), run=RunFolder(tmp_path / "b", overwrite=False),
              progress=False, resume=True)
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(SelfmaskError, match="unreadable"):
        adapt(_bb(), INFO, DATA, TrainConfig(epochs=1, batch_size=16), run=RunFolder(tmp_path / "b"), progress=False,
              resume=True)
