"""DINO: loss, centre, momentum teacher, schedules, checkpoints and config (objectives/dino.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from selfmask.backbones import create_backbone
from selfmask.data.multicrop import MultiCrop
from selfmask.errors import SelfmaskError
from selfmask.masking import MaskConfig, mask_model, mask_scores
from selfmask.objectives.base import Objective
from selfmask.objectives.dino import (
    DINOConfig,
    DINOHead,
    DINOObjective,
    dino_loss,
    teacher_momentum,
    teacher_probabilities,
    teacher_temperature,
)


def _cfg(**overrides) -> DINOConfig:
    values = {"out_dim": 16, "hidden_dim": 12, "bottleneck_dim": 6, "freeze_last_layer_iters": 0}
    values.update(overrides)
    return DINOConfig(**values)


def _crops(seed: int = 0) -> MultiCrop:
    # 2 large 32-px + 2 small 16-px views, no colour (fast)
    return MultiCrop.for_input_size(32, seed=seed, n_small=2, small_size=16, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)


def _masked(bn: str = "eval") -> torch.nn.Module:
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny")
    mask_model(backbone, MaskConfig(bn=bn))
    return backbone


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _objective(backbone: torch.nn.Module, total_steps: int = 10, **overrides) -> DINOObjective:
    torch.manual_seed(1)
    return DINOObjective(128, _cfg(**overrides), crops=_crops(), total_steps=total_steps, backbone=backbone)


def _step(obj: DINOObjective, backbone: torch.nn.Module, images: torch.Tensor, step: int = 0, seed: int = 0):
    views = obj.views(images, generator=torch.Generator().manual_seed(seed))
    return obj.step(backbone, views, None, epoch=0, step=step)


# ---------------------------------------------------------------- the loss, by hand


def test_loss_equals_the_formula_recomputed_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, views, large = 5, 7, 4, 2
    tau_s, tau_t = 0.1, 0.04
    student = [torch.randn(b, k, generator=g, dtype=torch.float64) for _ in range(views)]
    teacher = torch.randn(large * b, k, generator=g, dtype=torch.float64)
    center = torch.randn(1, k, generator=g, dtype=torch.float64) * 0.1
    probs = teacher_probabilities(teacher.float(), center.float(), tau_t)
    got = dino_loss([s.float() for s in student], list(probs.split(b)), tau_s)

    total, terms = 0.0, 0
    for iq in range(large):
        for v in range(views):
            if v == iq:
                continue
            per_image = []
            for i in range(b):
                t_row = [(float(teacher[iq * b + i, j]) - float(center[0, j])) / tau_t for j in range(k)]
                t_max = max(t_row)
                t_z = sum(math.exp(x - t_max) for x in t_row)
                p = [math.exp(x - t_max) / t_z for x in t_row]
                s_row = [float(student[v][i, j]) / tau_s for j in range(k)]
                s_max = max(s_row)
                log_z = s_max + math.log(sum(math.exp(x - s_max) for x in s_row))
                per_image.append(-sum(p[j] * (s_row[j] - log_z) for j in range(k)))
            total += sum(per_image) / b
            terms += 1
    assert terms == large * (views - 1)
    assert abs(float(got) - total / terms) < 1e-6 * max(1.0, abs(total / terms))


def test_perfect_student_costs_the_teacher_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(6, 9, generator=g), dim=1)
    tau = 0.1
    student = [tau * torch.log(q)] * 3  # log softmax(s / tau) = log q for every view
    entropy = -(q * torch.log(q)).sum(dim=1).mean()
    torch.testing.assert_close(dino_loss(student, [q, q], tau), entropy)


def test_loss_refuses_too_few_views() -> None:
    with pytest.raises(SelfmaskError, match="at least 2 student views"):
        dino_loss([torch.zeros(2, 3)], [torch.zeros(2, 3)], 0.1)


# ---------------------------------------------------------------- schedules


def test_teacher_temperature_warms_up_linearly_then_stays() -> None:
    cfg = _cfg(warmup_teacher_temperature=0.04, teacher_temperature=0.07, warmup_teacher_temperature_iters=30)
    assert teacher_temperature(cfg, 0) == pytest.approx(0.04)
    assert teacher_temperature(cfg, 15) == pytest.approx(0.055)
    assert teacher_temperature(cfg, 30) == pytest.approx(0.07)
    assert teacher_temperature(cfg, 1000) == pytest.approx(0.07)
    assert teacher_temperature(_cfg(), 0) == pytest.approx(0.04)  # no warm-up


def test_teacher_momentum_is_a_cosine_from_0996_to_1() -> None:
    cfg = _cfg()
    assert teacher_momentum(cfg, 0, 100) == pytest.approx(0.996)
    assert teacher_momentum(cfg, 50, 100) == pytest.approx(0.998)
    assert teacher_momentum(cfg, 100, 100) == pytest.approx(1.0)
    values = [teacher_momentum(cfg, s, 100) for s in range(101)]
    assert values == sorted(values)


# ---------------------------------------------------------------- centre


def test_centre_is_a_running_mean_of_teacher_outputs_over_all_processes() -> None:
    obj = _objective(_masked(), out_dim=16)
    g = torch.Generator().manual_seed(2)
    first, other = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    obj.update_center(first)
    torch.testing.assert_close(obj.center, 0.1 * first.mean(dim=0, keepdim=True))
    # a second process holding `other`: the injected all-reduce adds its sums
    obj.all_reduce = lambda t, op: t + (other.sum(dim=0, keepdim=True) if t.shape[-1] == 16 else torch.tensor([8.0]))
    before = obj.center.clone()
    obj.update_center(first)
    torch.testing.assert_close(obj.center, 0.9 * before + 0.1 * torch.cat([first, other]).mean(dim=0, keepdim=True))


def test_step_updates_the_centre_in_training_mode_only() -> None:
    obj = _objective(_masked())
    g = torch.Generator().manual_seed(0)
    obj.eval()
    obj.step(_masked(), obj.views(_images(), generator=g), None, epoch=0, step=0)
    assert torch.count_nonzero(obj.center) == 0
    obj.train()
    obj.step(_masked(), obj.views(_images(), generator=g), None, epoch=0, step=0)
    assert torch.count_nonzero(obj.center) > 0


# ---------------------------------------------------------------- teacher


def test_teacher_gets_no_gradient_and_the_student_does() -> None:
    backbone = _masked()
    obj = _objective(backbone)
    loss, sums = _step(obj, backbone, _images(), step=0, seed=0)
    loss.backward()
    assert sums["seen"] == 4 and sums["loss"] == pytest.approx(4 * float(loss.detach()))
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher_backbone.parameters())
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher_head.parameters())
    assert all(s.grad is not None for s in mask_scores(backbone).values())
    assert all(p.grad is not None for p in obj.head.parameters())


def test_teacher_is_an_ema_of_the_student_scores_over_the_same_frozen_weights() -> None:
    backbone = _masked(bn="train")
    obj = _objective(backbone, total_steps=10)
    scores = mask_scores(backbone)
    opt = torch.optim.SGD([*scores.values(), *obj.head.parameters()], lr=0.5)
    old_t = {k: v.detach().clone() for k, v in mask_scores(obj.teacher_backbone).items()}
    old_head = [p.detach().clone() for p in obj.teacher_head.parameters()]
    loss, _ = _step(obj, backbone, _images(), step=3, seed=0)
    loss.backward()
    opt.step()
    obj.after_optimizer_step(backbone, step=3)
    m = teacher_momentum(obj.cfg, 3, 10)
    assert 0.996 < m < 1.0
    t_scores = mask_scores(obj.teacher_backbone)
    for name, s in scores.items():
        torch.testing.assert_close(t_scores[name], m * old_t[name] + (1 - m) * s.detach())
    moved = sum(int((t_scores[n] != old_t[n]).sum()) for n in scores)
    assert moved > 0
    for t, old, s in zip(obj.teacher_head.parameters(), old_head, obj.head.parameters()):
        torch.testing.assert_close(t, m * old + (1 - m) * s.detach())
    # frozen weights identical, BatchNorm statistics copied from the student
    student_state, teacher_state = backbone.state_dict(), obj.teacher_backbone.state_dict()
    for key, value in student_state.items():
        if key.endswith(".original") or key.endswith("running_mean") or key.endswith("running_var"):
            assert torch.equal(teacher_state[key], value), key


def test_full_fine_tuning_teacher_averages_the_weights() -> None:
    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny")
    for p in backbone.parameters():
        p.requires_grad_(True)
    obj = _objective(backbone, total_steps=4)
    old = {k: v.detach().clone() for k, v in obj.teacher_backbone.named_parameters()}
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(1.0)
    obj.after_optimizer_step(backbone, step=0)
    for k, v in obj.teacher_backbone.named_parameters():
        torch.testing.assert_close(v, 0.996 * old[k] + 0.004 * (old[k] + 1.0))


def test_head_warm_up_and_frozen_last_layer_keep_their_gradients_off() -> None:
    backbone = _masked()
    obj = _objective(backbone, freeze_backbone_iters=2, freeze_last_layer_iters=2)
    loss, _ = _step(obj, backbone, _images(), step=1, seed=0)
    loss.backward()
    assert all(s.grad is None for s in mask_scores(backbone).values())
    assert obj.head.last_layer.grad is None
    assert obj.head.mlp[0].weight.grad is not None
    obj.zero_grad()
    loss, _ = _step(obj, backbone, _images(), step=2, seed=0)
    loss.backward()
    assert obj.head.last_layer.grad is not None
    assert all(s.grad is not None for s in mask_scores(backbone).values())


def test_head_batchnorm_sits_after_each_hidden_linear() -> None:
    kinds = [type(m).__name__ for m in DINOHead(10, 20, 8, 4, num_layers=3, batchnorm=True).mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]


def test_head_last_layer_rows_are_unit_vectors() -> None:
    head = DINOHead(10, 20, hidden_dim=8, bottleneck_dim=4, num_layers=2)
    with torch.no_grad():
        head.last_layer.mul_(7.0)  # the norm of a row does not matter
    out = head(torch.randn(3, 10))
    assert out.shape == (3, 20) and float(out.detach().abs().max()) <= 1.0 + 1e-6


# ---------------------------------------------------------------- protocol, checkpoints


def test_satisfies_the_objective_protocol() -> None:
    obj = _objective(_masked())
    assert isinstance(obj, Objective)
    assert obj.name == "dino" and obj.needs_labels is False
    assert obj.config_dict() == obj.cfg.to_dict()
    (group,) = obj.param_groups(1.0)
    assert group["lr"] == obj.cfg.head_lr and len(group["params"]) == len(list(obj.head.parameters()))
    row = obj.epoch_metrics({"loss": 8.0, "seen": 4.0, "teacher_entropy": 4.0, "teacher_temperature": 0.16})
    assert row == {"loss": 2.0, "teacher_entropy": 1.0, "teacher_temperature": 0.04}


def test_state_dict_round_trip_gives_the_same_next_loss() -> None:
    backbone = _masked()
    obj = _objective(backbone)
    opt = torch.optim.SGD([*mask_scores(backbone).values(), *obj.head.parameters()], lr=0.5)
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        loss, _ = obj.step(backbone, obj.views(_images(seed=step), generator=g), None, epoch=0, step=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_optimizer_step(backbone, step=step)
    state, b_state = obj.state_dict(), backbone.state_dict()
    assert any(k.startswith("teacher_backbone.") for k in state) and "center" in state

    backbone2 = _masked()
    backbone2.load_state_dict(b_state)
    obj2 = DINOObjective(128, obj.cfg, crops=_crops(), total_steps=10)  # teacher made at its first step
    assert obj2.teacher_backbone is None
    obj2.load_state_dict(state)
    assert obj2.state_dict().keys() == state.keys()  # a restored teacher is saved again before its first step
    a, _ = _step(obj, backbone, _images(seed=9), step=2, seed=5)
    b, _ = _step(obj2, backbone2, _images(seed=9), step=2, seed=5)
    assert torch.equal(a, b)
    for (ka, va), (kb, vb) in zip(obj.state_dict().items(), obj2.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


class _Inner(torch.nn.Module):  # a wrapper like the engine's channels-last view
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_teacher_made_at_the_first_step_copies_the_wrapped_student() -> None:
    backbone = _masked()
    obj = DINOObjective(128, _cfg(), crops=_crops(), total_steps=10)
    loss, _ = _step(obj, _Inner(backbone), _images())
    assert obj.teacher_backbone is not None
    assert obj.teacher_backbone.state_dict().keys() == backbone.state_dict().keys()
    assert obj.teacher_backbone is not backbone and all(not p.requires_grad for p in obj.teacher_backbone.parameters())


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("out_dim", 1, "an integer >= 2"),
        ("out_dim", True, "an integer >= 2"),
        ("student_temperature", 0.0, "a finite number > 0"),
        ("teacher_temperature", float("nan"), "a finite number > 0"),
        ("center_momentum", 1.5, "a number in [0, 1]"),
        ("teacher_momentum", -0.1, "a number in [0, 1]"),
        ("freeze_last_layer_iters", -1, "an integer >= 0"),
        ("head_weight_decay", -1e-4, "a finite number >= 0"),
        ("hidden_dim", 0, "an integer >= 1"),
        ("head_batchnorm", "yes", "true or false"),
    ],
)
def test_config_errors_are_one_line_naming_the_field(field: str, value: object, expected: str) -> None:
    with pytest.raises(SelfmaskError) as err:
        DINOConfig(**{field: value})
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"DINOConfig.{field}: expected {expected}")


def test_config_round_trips_and_refuses_unknown_keys() -> None:
    cfg = _cfg(teacher_temperature=0.07, warmup_teacher_temperature_iters=5)
    assert DINOConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(SelfmaskError, match=r"DINOConfig: unknown keys \['temperature'\]"):
        DINOConfig.from_dict({"temperature": 0.1})


def test_objective_refuses_crops_without_two_views_and_bad_step_counts() -> None:
    one_view = MultiCrop.for_input_size(32, n_small=0, n_large=1)
    with pytest.raises(SelfmaskError, match="at least 2 views"):
        DINOObjective(128, _cfg(), crops=one_view, total_steps=5)
    with pytest.raises(SelfmaskError, match="total_steps must be an integer >= 1"):
        DINOObjective(128, _cfg(), crops=_crops(), total_steps=0)


# ---------------------------------------------------------------- through the engine


class _Killed(Exception):
    pass


def _adapt_dino(run, resume: bool = False):  # noqa: ANN001, ANN202
    from conftest import make_stripes

    from selfmask.backbones import backbone_info
    from selfmask.training.config import TrainConfig
    from selfmask.training.ssl import adapt_ssl

    cfg = TrainConfig(method="mask", objective="dino", epochs=2, batch_size=16, lr=5.0, seed=3,
                      checkpoint_every=1, flip=False)
    settings = _cfg(freeze_backbone_iters=1, freeze_last_layer_iters=1, head_batchnorm=True)
    torch.manual_seed(0)  # the random backbone
    return adapt_ssl(create_backbone("resnet_tiny"), backbone_info("resnet_tiny"), make_stripes(48, seed=0), cfg,
                     settings, crops=_crops(), run=run, resume=resume, progress=False)


def test_dino_trains_masks_through_the_engine_and_resumes_bit_identically(tmp_path, monkeypatch) -> None:
    from selfmask.training import loop
    from selfmask.training.run_folder import RunFolder

    ref = _adapt_dino(RunFolder(tmp_path / "ref").prepare())
    scores = mask_scores(ref.backbone)
    assert any(bool((s != 1.0).any()) for s in scores.values())  # the masks trained
    assert [h["epoch"] for h in ref.history] == [1, 2] and all("teacher_entropy" in h for h in ref.history)
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["train"]["objective"] == "dino" and config["dino"]["head_batchnorm"] is True
    assert (tmp_path / "ref" / "scores.safetensors").is_file()

    real_save = loop.save_checkpoint

    def save_then_die(path, spec, epoch, batch, step, *a, **k):  # noqa: ANN001, ANN202
        real_save(path, spec, epoch, batch, step, *a, **k)
        if step == 4:  # mid-epoch 2 (3 steps per epoch), after the head warm-up
            raise _Killed

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        _adapt_dino(RunFolder(tmp_path / "cut").prepare())
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = _adapt_dino(RunFolder(tmp_path / "cut"), resume=True)
    for name, s in mask_scores(resumed.backbone).items():
        assert torch.equal(s, scores[name]), name
    drop = ("seconds", "images_per_second")
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == [
        {k: v for k, v in h.items() if k not in drop} for h in ref.history
    ]


def test_dino_is_a_registered_objective_of_the_run_configuration() -> None:
    from selfmask.objectives.registry import objective_names
    from selfmask.training.config import TrainConfig

    assert "dino" in objective_names()
    assert TrainConfig(method="mask", objective="dino").objective == "dino"
    with pytest.raises(SelfmaskError, match="objective 'dino' trains masks or weights; method 'linear'"):
        TrainConfig(method="linear", objective="dino")


def test_dino_pretrains_all_weights_through_the_engine() -> None:
    """``method="fft"``: DINO pretraining of a random backbone (the teacher averages the weights)."""
    from conftest import make_stripes

    from selfmask.backbones import backbone_info
    from selfmask.training.config import TrainConfig
    from selfmask.training.ssl import adapt_ssl

    torch.manual_seed(0)
    backbone = create_backbone("resnet_tiny")
    before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    cfg = TrainConfig(method="fft", objective="dino", epochs=1, batch_size=16, lr=0.05, weight_decay=1e-4, flip=False)
    result = adapt_ssl(backbone, backbone_info("resnet_tiny"), make_stripes(32, seed=0), cfg,
                       _cfg(head_batchnorm=True), crops=_crops(), progress=False)
    assert math.isfinite(result.history[-1]["loss"]) and result.history[-1]["step"] == 2
    after = result.backbone.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if k.endswith("conv1.weight"))


def test_selfmask_adapt_objective_dino_trains_masks_on_embedded_data(tmp_path, capsys) -> None:
    from selfmask.cli.main import main
    from selfmask.training.run_folder import read_run_config

    out = tmp_path / "dino"
    args = ["adapt", "--data", "embedded-tiny", "--backbone", "resnet_tiny", "--method", "mask", "--objective", "dino",
            "--epochs", "1", "--lr", "1", "--head-batchnorm", "--out-dim", "32", "--freeze-last-layer-iters", "1",
            "--no-probe", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert "knn_accuracy" in json.loads((out / "results.json").read_text())
    saved = read_run_config(out)
    assert saved.train.objective == "dino" and saved.objective_config == _cfg(
        out_dim=32, hidden_dim=256, bottleneck_dim=64, freeze_last_layer_iters=1, head_batchnorm=True)
    assert (out / "scores.safetensors").is_file()
    capsys.readouterr()
    bad = args[:-1] + [str(tmp_path / "bad"), "--teacher-temperature", "0"]
    assert main(bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("DINOConfig.teacher_temperature: expected a finite number > 0, got 0.0")
    assert not (tmp_path / "bad").exists()
