"""The training engine's contract: any Objective trains, checkpoints and resumes bit-identically.

The objective here is defined in the test itself (rotation prediction, a small self-supervised
task: which of 4 rotations was applied), so the engine is shown to run an objective it has never
seen, through the public seam only (objectives/base.py's protocol).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import selfmask.training.loop as loop
from conftest import make_stripes
from selfmask.backbones import backbone_info, build_backbone
from selfmask.errors import SelfmaskError
from selfmask.masking import mask_scores
from selfmask.objectives import SwAVConfig
from selfmask.objectives.base import Objective
from selfmask.objectives.registry import (
    ObjectiveInputs,
    create_objective,
    objective_names,
    objective_settings,
    register_objective,
)
from selfmask.training.config import TrainConfig
from selfmask.training.engine import prepare_training, train
from selfmask.training.run_folder import RunFolder

INFO = backbone_info("resnet_tiny")
DATA = make_stripes(48, seed=0, size=16)
CFG = TrainConfig(method="mask", epochs=2, batch_size=12, seed=4, checkpoint_every=2, lr=5.0)
TIMING = ("seconds", "images_per_second")


class RotationObjective(nn.Module):
    """Predict which multiple of 90 degrees each image was rotated by (RotNet), from the backbone."""

    name: ClassVar[str] = "rotation"
    needs_labels: ClassVar[bool] = False
    find_unused_parameters = False

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.head = nn.Linear(embed_dim, 4)
        self.steps_taken = torch.zeros((), dtype=torch.long)  # not a buffer: kept through extra_state()

    def views(self, images: torch.Tensor, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float() / 255.0 - 0.5
        k = torch.randint(0, 4, (x.shape[0],), generator=generator)
        rotated = torch.stack([torch.rot90(x, r, (2, 3)) for r in range(4)])[k, torch.arange(x.shape[0])]
        return rotated, k.to(x.device)

    def step(self, backbone: nn.Module, views: Any, labels: torch.Tensor | None, *, epoch: int, step: int):
        assert labels is None  # needs_labels is false: the engine must not read labels
        x, k = views
        logits = self.head(backbone(x))
        loss = F.cross_entropy(logits, k)
        n = x.shape[0]
        return loss, {"loss": float(loss.detach()) * n, "seen": n, "correct": float((logits.argmax(1) == k).sum())}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return [{"params": list(self.head.parameters()), "lr": 0.1, "weight_decay": 0.0}]

    def after_optimizer_step(self, backbone: nn.Module, *, step: int) -> None:
        self.steps_taken += 1

    def epoch_metrics(self, sums: dict[str, float]) -> dict[str, Any]:
        return {"loss": sums["loss"] / sums["seen"], "rotation_accuracy": sums["correct"] / sums["seen"]}

    def checkpoint_modules(self) -> dict[str, nn.Module]:
        return {"objective": self}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"steps_taken": self.steps_taken}

    def config_dict(self) -> dict[str, Any]:
        return {"rotations": 4}


def _setup():
    torch.manual_seed(0)
    backbone = build_backbone("resnet_tiny")
    return prepare_training(backbone, INFO, CFG, lambda: RotationObjective(INFO.embed_dim))


def _train(run=None, resume=False, **kw):
    backbone, objective, _mcfg, groups = _setup()
    history, steps = train(backbone, objective, DATA, CFG, param_groups=groups,
                           run=run, resume=resume, progress=False, fingerprint={"train": CFG.to_dict()}, **kw)
    return backbone, objective, history, steps


def _state(backbone, objective):
    return {**{f"s.{k}": v.detach().clone() for k, v in mask_scores(backbone).items()},
            **{f"o.{k}": v.detach().clone() for k, v in objective.state_dict().items()},
            "steps_taken": objective.steps_taken.clone()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = RunFolder(tmp_path_factory.mktemp("ref") / "run").prepare()
    backbone, objective, history, steps = _train(run=run)
    return _state(backbone, objective), history, steps, run.path


def test_a_custom_objective_trains_through_the_engine(reference) -> None:
    state, history, steps, run_dir = reference
    assert isinstance(RotationObjective(8), Objective)
    assert steps == 2 * (48 // 12) and int(state["steps_taken"]) == steps  # after_optimizer_step ran each step
    assert [r["epoch"] for r in history] == [1, 2]
    assert {"loss", "rotation_accuracy", "fraction_active", "lr", "step"} <= set(history[0])
    fresh = _setup()[0]
    moved = [k for k, v in mask_scores(fresh).items() if not torch.equal(v, state[f"s.{k}"])]
    assert moved, "training changed no score"
    assert (run_dir / "checkpoint.pt").is_file() and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2


class _Killed(Exception):
    pass


def test_killed_and_resumed_run_is_bit_identical(tmp_path, monkeypatch, reference) -> None:
    ref_state, ref_history, ref_steps, _ = reference
    real_save = loop.save_checkpoint

    def save_then_die(path, spec, epoch, batch, step, *a, **k):
        real_save(path, spec, epoch, batch, step, *a, **k)
        if step == 6:  # mid-epoch 2
            raise _Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        _train(run=RunFolder(tmp_path / "run").prepare())
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    backbone, objective, history, steps = _train(run=RunFolder(tmp_path / "run"), resume=True)
    assert steps == ref_steps
    assert _same(_state(backbone, objective), ref_state)
    assert _rows(history) == _rows(ref_history)


def test_custom_order_and_short_last_batch_resume_bit_identically(tmp_path, monkeypatch) -> None:
    """A data order drawn from the augmentation generator (as pretraining's) survives a mid-epoch resume."""

    def run(path, resume=False):
        gen = torch.Generator().manual_seed(9)
        backbone, objective, _m, groups = _setup()
        cfg = TrainConfig(epochs=2, batch_size=20, seed=9, checkpoint_every=1, lr=5.0)
        history, steps = train(backbone, objective, DATA, cfg, param_groups=groups, run=path, resume=resume,
                               drop_last=False,  # 48 images = 20 + 20 + 8
                               progress=False, order=lambda _e: torch.randperm(len(DATA), generator=gen),
                               generator=gen)
        return _state(backbone, objective), history, steps

    ref_state, ref_history, ref_steps = run(RunFolder(tmp_path / "ref").prepare())
    assert ref_steps == 6
    real_save = loop.save_checkpoint

    def save_then_die(path, spec, epoch, batch, step, *a, **k):
        real_save(path, spec, epoch, batch, step, *a, **k)
        if step == 4:
            raise _Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run(RunFolder(tmp_path / "cut").prepare())
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    state, history, _steps = run(RunFolder(tmp_path / "cut"), resume=True)
    assert _same(state, ref_state)
    assert _rows(history) == _rows(ref_history)


def test_resume_with_other_objective_settings_is_refused(tmp_path, reference) -> None:
    run = RunFolder(tmp_path / "run").prepare()
    _train(run=run)
    backbone, objective, _m, groups = _setup()
    with pytest.raises(SelfmaskError, match="different settings"):
        train(backbone, objective, DATA, CFG, param_groups=groups,
              run=RunFolder(tmp_path / "run"), resume=True, progress=False,
              fingerprint={"train": CFG.to_dict(), "rotation": {"rotations": 3}})


def test_progress_off_a_terminal_is_one_line_per_epoch(capsys) -> None:
    logging.getLogger("selfmask.train").setLevel(logging.WARNING)  # no log line to the console either
    backbone, objective, _m, groups = _setup()
    train(backbone, objective, DATA, CFG, param_groups=groups, progress=True,
          desc="rotation")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("rotation epoch")]
    assert len(lines) == 2 and "\r" not in err, err
    assert lines[0].startswith("rotation epoch 1/2: loss ") and "img/s" in lines[0]


def test_registry_builds_objectives_by_name_and_refuses_unknown_ones() -> None:
    assert {"supervised", "swav"} <= set(objective_names())
    inputs = ObjectiveInputs(INFO, DATA, CFG)
    assert isinstance(create_objective("supervised", inputs), Objective)
    recipe = {"num_prototypes": 8, "queue_length": 0, "projection_dim": 16}  # a config file's dict is accepted
    swav = create_objective("swav", ObjectiveInputs(INFO, DATA, CFG, recipe))
    assert isinstance(swav, Objective) and swav.config_dict()["num_prototypes"] == 8
    with pytest.raises(SelfmaskError, match="queue_length 512 is longer than the dataset"):  # the paper's queue
        create_objective("swav", inputs)
    assert objective_settings("swav") is SwAVConfig and objective_settings("supervised") is None
    with pytest.raises(SelfmaskError, match="unknown objective 'byol'"):
        objective_settings("byol")
    with pytest.raises(SelfmaskError, match=r"unknown objective 'byol'; known objectives: .*supervised.*swav"):
        create_objective("byol", inputs)
    with pytest.raises(SelfmaskError, match="registered twice"):
        register_objective("swav")(lambda i: RotationObjective(i.info.embed_dim))


def test_a_new_objective_is_one_registration(monkeypatch) -> None:
    import selfmask.objectives.registry as registry

    monkeypatch.setitem(registry._FACTORIES, "rotation", lambda i: RotationObjective(i.info.embed_dim))
    obj = create_objective("rotation", ObjectiveInputs(INFO, DATA, CFG))
    assert isinstance(obj, RotationObjective) and "rotation" in objective_names()


def test_training_and_objectives_import_no_circle() -> None:
    """No module of selfmask.training / selfmask.objectives imports itself back, not even lazily."""
    import ast
    from pathlib import Path

    import selfmask

    root = Path(selfmask.__file__).parent
    graph: dict[str, set[str]] = {}
    for package in ("training", "objectives"):
        for path in (root / package).glob("*.py"):
            name = f"selfmask.{package}.{path.stem}"
            targets = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    targets.add(node.module)
                    targets.update(f"{node.module}.{a.name}" for a in node.names)
            graph[name] = {t for t in targets if t.startswith(("selfmask.training.", "selfmask.objectives."))}
    graph = {k: {t for t in v if t in graph and t != k and not t.endswith(".__init__")} for k, v in graph.items()}

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return [*trail, start]
                if nxt not in trail:
                    stack.append((nxt, [*trail, nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, " -> ".join(cycles[0])


def test_adapt_ssl_refuses_an_unknown_objective_before_any_set_up() -> None:
    from selfmask.training.ssl import adapt_ssl

    backbone = build_backbone("resnet_tiny")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with pytest.raises(SelfmaskError, match="unknown objective 'byol'; known objectives: "):
        adapt_ssl(backbone, INFO, DATA, CFG, objective="byol", progress=False)
    assert torch.equal(torch.rand(3), expected)  # the global generator was not reseeded or drawn from


def test_self_supervised_training_refuses_crops_a_vit_cannot_take_before_training(tmp_path) -> None:
    from selfmask.backbones import backbone_info, create_backbone
    from selfmask.data.base import ImageTensorDataset
    from selfmask.errors import SelfmaskError
    from selfmask.training.config import TrainConfig
    from selfmask.training.run_folder import RunFolder
    from selfmask.training.ssl import adapt_ssl

    info = backbone_info("vit_tiny_clip")
    data = ImageTensorDataset(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long),
                              ["a"], "zeros")
    run = RunFolder(tmp_path / "run").prepare()
    cfg = TrainConfig(method="mask", objective="swav", epochs=1, batch_size=4)
    with pytest.raises(SelfmaskError, match=r"takes only 32x32 images .* small crops are 14 px: pass --small-crop-size 32"):
        adapt_ssl(create_backbone("vit_tiny_clip"), info, data, cfg, run=run, progress=False)
    assert not (tmp_path / "run" / "config.json").exists()  # refused before the run was recorded
