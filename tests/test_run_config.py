"""The typed run configuration: config.json read and written in one place, flags from the dataclasses.

Runs written before issue 13 (``tests/fixtures/runs_v1``: config.json as main wrote it, and the
settings its checkpoint recorded) still resume, to the same bytes main's uninterrupted run wrote;
a newer format, an unknown key, an unknown objective: one line, exit 2, nothing deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

import selfmask.training.loop as loop
from selfmask.cli.main import main
from selfmask.errors import SelfmaskError
from selfmask.masking import MaskConfig, mask_scores
from selfmask.training.config import RUN_FORMAT_VERSION, RunConfig, TrainConfig

FIXTURES = Path(__file__).parent / "fixtures" / "runs_v1"
COMMON = ["--data", "embedded-tiny", "--backbone", "resnet_tiny", "--batch-size", "8", "--no-progress", "--no-eval",
          "--threads", "1"]
#: The argv tests/fixtures/runs_v1/make_fixtures.py ran (on commit 6cf9efa) for each fixture.
ARGV = {
    "mask": ["adapt", *COMMON, "--per-class", "4", "--epochs", "2", "--threshold", "0.5", "--init-score", "1.5",
             "--head", "masked-random", "--checkpoint-every", "2"],
    "swav": ["adapt", *COMMON, "--objective", "swav", "--epochs", "2", "--prototypes", "8", "--queue-length", "0",
             "--freeze-prototypes-iters", "1", "--small-crops", "2", "--checkpoint-every", "2"],
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stopped_at_first_checkpoint(argv: list[str], out: Path, monkeypatch) -> None:
    real = loop.save_checkpoint

    def stop_after_first(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("stopped by the test")

    monkeypatch.setattr(loop, "save_checkpoint", stop_after_first)
    assert main([*argv, "--out", str(out)]) == 130
    monkeypatch.setattr(loop, "save_checkpoint", real)


def _as_written_before(run: Path, name: str) -> None:
    """Put the format-1 config.json and checkpoint settings of fixture ``name`` in place."""
    shutil.copy(FIXTURES / name / "config.json", run / "config.json")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["config"] = json.loads((FIXTURES / name / "checkpoint_config.json").read_text())
    torch.save(state, run / "checkpoint.pt")


@pytest.fixture(scope="module")
def resumed_v1(tmp_path_factory) -> dict[str, Path]:
    """Each fixture's run trained to its first checkpoint, given main's config.json and checkpoint settings,
    then resumed by this code."""
    mp = pytest.MonkeyPatch()
    out = {}
    try:
        for name, argv in ARGV.items():
            run = tmp_path_factory.mktemp("v1") / name
            _stopped_at_first_checkpoint(argv, run, mp)
            _as_written_before(run, name)
            assert main(["adapt", "--resume", str(run), "--no-progress", "--no-eval", "--threads", "1"]) == 0
            out[name] = run
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("name", ["mask", "swav"])
def test_a_run_written_before_the_typed_config_resumes_to_the_bytes_main_wrote(resumed_v1, name) -> None:
    expected = json.loads((FIXTURES / "finished_sha256.json").read_text())[name]
    files = {k: v for k, v in expected.items() if k.endswith(".safetensors")}
    assert files and {f: _sha(resumed_v1[name] / f) for f in files} == files


def test_format_1_is_read_as_meant(resumed_v1) -> None:
    """The mask settings kept flat in "train" become train.mask; fields format 1 did not record take the
    top-level mask's values, and a pre-issue-17 mask without split_fused/topk_count its legacy meaning."""
    raw = json.loads((FIXTURES / "mask" / "config.json").read_text())
    cfg = RunConfig.from_json(raw, "fixture")
    assert cfg.format_version == 1 and cfg.train.mask.threshold == 0.5 and cfg.train.mask.init_score == 1.5
    assert cfg.train.mask_config("resnet") == cfg.mask and cfg.data_spec == "embedded-tiny"
    assert cfg.train.to_dict()["resolved_lr"] == 50.0
    old = {**raw, "mask": {k: v for k, v in raw["mask"].items() if k not in ("split_fused", "topk_count")}}
    legacy = RunConfig.from_json(old, "fixture")
    assert legacy.mask.split_fused is False and legacy.mask.topk_count == "round"
    assert legacy.train.mask.split_fused is False  # trains as the run did
    swav = RunConfig.from_json(json.loads((FIXTURES / "swav" / "config.json").read_text()), "fixture")
    assert swav.objective_config.num_prototypes == 8 and swav.crops.n_small == 2 and swav.crops.large_size == 32


def test_written_config_round_trips_and_carries_the_version(tmp_path) -> None:
    run = tmp_path / "run"
    assert main([*ARGV["swav"][:-2], "--epochs", "1", "--no-color", "--swav-head-lr", "0.2", "--out", str(run)]) == 0
    raw = json.loads((run / "config.json").read_text())
    assert raw["format_version"] == RUN_FORMAT_VERSION and raw["written_by"].startswith("selfmask ")
    cfg = RunConfig.from_json(raw, "x")
    assert cfg.to_json() == raw
    assert cfg.objective_config.head_lr == 0.2 and cfg.crops.jitter_p == cfg.crops.grayscale_p == 0.0


def test_masked_random_head_reloads_with_the_runs_threshold(stripes_train, tmp_path) -> None:
    """Case: load_run rebuilt the masked-random head with mu=0, S0=1, so a --threshold 0.5 run reloaded with other
    masks (every score in (0, 0.5] switched back on)."""
    from selfmask.backbones import backbone_info, build_backbone
    from selfmask.training.run_folder import RunFolder, load_run
    from selfmask.training.trainer import adapt

    info = backbone_info("resnet_tiny")
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=2, batch_size=16, head="masked-random", mask={"threshold": 0.5, "init_score": 0.6})
    result = adapt(build_backbone("resnet_tiny"), info, stripes_train, cfg, run=RunFolder(tmp_path / "r").prepare(),
                   progress=False, run_meta={"weights": None})
    scores = mask_scores(result.head)["weight"]
    assert bool(((scores > 0) & (scores <= 0.5)).any())  # entries the old reload would have switched on
    _backbone, head, loaded = load_run(tmp_path / "r")
    x = torch.randn(4, info.embed_dim)
    result.head.eval()
    assert torch.equal(head.eval()(x), result.head(x)) and loaded.train.mask.threshold == 0.5


def test_trainable_fraction_from_the_command_line_trains_half_the_scores(tmp_path) -> None:
    from safetensors.torch import load_file

    from selfmask.masking.layer import selective_trainable_mask

    run = tmp_path / "run"
    assert main(["adapt", *COMMON, "--per-class", "4", "--epochs", "1", "--trainable-fraction", "0.5",
                 "--out", str(run)]) == 0
    raw = json.loads((run / "config.json").read_text())
    assert raw["train"]["mask"]["trainable_fraction"] == 0.5 and raw["mask"]["trainable_fraction"] == 0.5
    scores = load_file(str(run / "scores.safetensors"))
    trainable = changed = total = 0
    for name, s in scores.items():
        chosen = selective_trainable_mask(s.shape, 0.5, 0, name)
        assert torch.all(s[~chosen] == 1.0), name  # entries outside the chosen half never move
        trainable += int(chosen.sum())
        changed += int((s[chosen] != 1.0).sum())
        total += s.numel()
    assert abs(trainable / total - 0.5) < 1e-3 and changed > 0


def test_every_mask_field_is_reachable_from_flags_and_config_files(tmp_path) -> None:
    from selfmask.cli.adapt import _new_job
    from selfmask.cli.flags import options
    from selfmask.cli.main import build_parser

    mask_flags = {o.spec.name for o in options() if o.group == "mask"}
    derived = {"mode", "keep_ratio", "seed"}  # follow --method, --keep-ratio and --seed
    assert mask_flags == {f.name for f in dataclasses.fields(MaskConfig) if f.init} - derived
    flags = ["--no-rescale", "--init-noise", "0.01", "--bn", "eval", "--trainable-fraction", "0.25",
             "--no-split-fused", "--topk-count", "round", "--mask-targets", "layer1", "--threshold", "0.1",
             "--init-score", "0.7"]
    keys = {"rescale": False, "init_noise": 0.01, "bn": "eval", "trainable_fraction": 0.25, "split_fused": False,
            "topk_count": "round", "mask_targets": "layer1", "threshold": 0.1, "init_score": 0.7}
    (tmp_path / "c.json").write_text(json.dumps(keys))
    expected = MaskConfig(targets="layer1", rescale=False, init_noise=0.01, bn="eval", trainable_fraction=0.25,
                          split_fused=False, topk_count="round", threshold=0.1, init_score=0.7)
    for extra in (flags, ["--config", str(tmp_path / "c.json")]):
        args = build_parser().parse_args(["adapt", "--out", str(tmp_path / "o"), *extra])
        assert TrainConfig(**_new_job(args, {}).train).mask == expected


def test_an_objectives_config_dataclass_gets_its_flag_group_without_cli_edits(monkeypatch) -> None:
    """A new objective (DINO, say) is a dataclass in the objective list: its fields become options; a name
    the training, mask or crop settings use is prefixed with the objective's, a name another objective
    uses is one option for both."""
    import selfmask.cli.flags as flags
    import selfmask.training.config as config

    @dataclasses.dataclass(frozen=True)
    class ToyConfig:
        """Attributes:
        momentum: teacher momentum.
        toy_width: its width.
        """

        momentum: float = 0.996
        toy_width: int = 64
        freeze_backbone_iters: int = 0

    real = config.objective_configs
    monkeypatch.setattr(config, "objective_configs", lambda: {**real(), "toy": ToyConfig})
    flags.options.cache_clear()
    try:
        by = {o.flag: o for o in flags.options()}
        assert by["--toy-width"].group == "toy" and by["--toy-momentum"].spec.help == "teacher momentum."
        assert by["--momentum"].group == "train"
        shared = by["--freeze-backbone-iters"]  # SwAV's flag keeps its name and sets the run's objective's field
        assert shared.objectives == ("dino", "swav", "toy") and "--swav-freeze-backbone-iters" not in by
        assert flags.grouped({"freeze_backbone_iters": 5}, "toy") == {"toy": {"freeze_backbone_iters": 5}}
        with pytest.raises(SelfmaskError, match=r"--toy-width only apply to --objective toy"):
            from selfmask.cli.adapt import _new_job
            from selfmask.cli.main import build_parser

            _new_job(build_parser().parse_args(["adapt", "--out", "o", "--toy-width", "8"]), {})
    finally:
        flags.options.cache_clear()


# ---------------------------------------------------------------------------------------------- bad input


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): _sha(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture()
def interrupted(resumed_v1, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(resumed_v1["mask"], run)
    (run / "status.json").write_text(json.dumps({"status": "interrupted"}))
    return run


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: {**c, "bogus": 1}, "config.json: unknown key 'bogus'"),
    (lambda c: {**c, "train": {**c["train"], "epochz": 3}}, "config.json: 'train': unknown key 'epochz'"),
    (lambda c: {**c, "format_version": 99, "written_by": "selfmask 9.9"},
     "config.json: written by selfmask 9.9 in run config format 99; this selfmask reads formats up to 2"),
])
def test_bad_run_folders_are_one_line_exit_2_and_nothing_is_deleted(interrupted, capsys, edit, message) -> None:
    cfg = json.loads((interrupted / "config.json").read_text())
    (interrupted / "config.json").write_text(json.dumps(edit(cfg)))
    before = _tree(interrupted)
    for argv in (["adapt", "--resume", str(interrupted), "--no-progress"], ["pack", str(interrupted), "-o",
                                                                          str(interrupted.parent / "x.mask")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _tree(interrupted) == before


@pytest.mark.parametrize(("argv", "message"), [
    (["--objective", "byol"], "unknown objective 'byol'; expected one of ('supervised', "),
    (["--config", "{cfg}"], "unknown key 'epochz'"),
])
def test_bad_settings_are_one_line_exit_2_and_nothing_is_written(tmp_path, capsys, argv, message) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"epochz": 3}))
    out = tmp_path / "run"
    argv = [a.replace("{cfg}", str(tmp_path / "c.json")) for a in argv]
    assert main(["adapt", *COMMON, "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
