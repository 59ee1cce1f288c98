"""`adapt --embedding` / `eval --embedding`: the CLIP embedding is chosen by a flag and every result records it."""

from __future__ import annotations

import json

import pytest

from selfmask.cli import main


def test_adapt_and_eval_record_the_embedding(tmp_path) -> None:
    cache = tmp_path / "cache"
    common = ["--data", "embedded-tiny", "--cache-dir", str(cache), "--backbone", "vit_tiny_clip"]
    run = tmp_path / "run"
    assert main(["adapt", *common, "--embedding", "projected", "--epochs", "1", "--out", str(run), "--no-progress",
                 "--no-probe"]) == 0
    assert json.loads((run / "config.json").read_text())["embedding"] == "projected"
    assert json.loads((run / "results.json").read_text())["embedding"] == "projected"
    assert main(["eval", "--data", "embedded-tiny", "--cache-dir", str(cache), "--run", str(run), "--no-probe",
                 "--output", str(tmp_path / "run_eval.json")]) == 0
    assert json.loads((tmp_path / "run_eval.json").read_text())["embedding"] == "projected"
    assert main(["eval", *common, "--no-probe", "--output", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["embedding"] == "class_token"


@pytest.mark.parametrize("command", ["adapt", "eval"])
def test_an_embedding_the_backbone_does_not_offer_is_one_line(command: str, tmp_path, capsys) -> None:
    argv = [command, "--data", "embedded-tiny", "--backbone", "resnet_tiny", "--embedding", "projected"]
    assert main([*argv, "--out", str(tmp_path / "r")] if command == "adapt" else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backbone 'resnet_tiny' has no embedding 'projected'" in err[0]
    assert not (tmp_path / "r").exists()
