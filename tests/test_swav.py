"""SwAV loss, head, prototypes, queue, config and the objective a trainer uses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfmask.errors import SelfmaskError
from selfmask.objectives import (
    Prototypes,
    SwAVConfig,
    SwAVHead,
    SwAVLoss,
    SwAVObjective,
    SwAVQueue,
    assign_codes,
    collapse_warning,
    sinkhorn_knopp,
    swav_loss,
    validate_queue,
)


def _crops(n_crops: int, batch: int, dim: int, seed: int = 0, noise: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, dim, generator=g)
    return [base + noise * torch.randn(batch, dim, generator=g) for _ in range(n_crops)]


def _small_cfg(**overrides) -> SwAVConfig:
    values = {"num_prototypes": 10, "queue_length": 0, "freeze_prototypes_iters": 0, "projection_dim": 8}
    values.update(overrides)
    return SwAVConfig(**values)


# ---------------------------------------------------------------- loss


def test_perfect_prediction_beats_random_prediction() -> None:
    g = torch.Generator().manual_seed(0)
    k, b, t = 12, 16, 0.1
    q = sinkhorn_knopp(F.normalize(torch.randn(b, k, generator=g), dim=1))
    codes = [q, q]  # both large crops agree, so one prediction can match every code
    # log softmax(s / t) = log q  <=>  s = t * log q: every crop predicts the codes exactly
    perfect = [t * torch.log(q)] * 3
    random = [F.normalize(torch.randn(b, k, generator=g), dim=1) for _ in range(3)]
    loss_perfect = swav_loss(perfect, codes, temperature=t)
    loss_random = swav_loss(random, codes, temperature=t)
    entropy = -(q * torch.log(q)).sum(dim=1).mean()
    torch.testing.assert_close(loss_perfect, entropy)  # cross-entropy of a perfect prediction = entropy
    assert loss_perfect < loss_random


def test_uniform_prediction_costs_ln_k_and_warns() -> None:
    k = 25
    scores = [torch.zeros(8, k) for _ in range(4)]
    codes = [torch.softmax(torch.randn(8, k), dim=1) for _ in range(2)]
    loss = swav_loss(scores, codes)
    assert loss.item() == pytest.approx(math.log(k), abs=1e-5)
    assert "ln(25)" in collapse_warning(loss.item(), k, used_fraction=0.5)


def test_loss_matches_explicit_formula_and_uses_only_other_crops() -> None:
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(5, 7, generator=g) for _ in range(4)]
    codes = [torch.softmax(torch.randn(5, 7, generator=g), dim=1) for _ in range(2)]
    expected = 0.0
    for a, q in zip((0, 1), codes):
        sub = sum(-(q * F.log_softmax(scores[v] / 0.1, dim=1)).sum(dim=1).mean() for v in range(4) if v != a)
        expected += sub / 3
    torch.testing.assert_close(swav_loss(scores, codes), expected / 2)
    # a crop does not predict its own code: the scores of crop 0 do not enter the loss of code 0
    only_first = swav_loss(scores, codes[:1], crops_for_assign=(0,))
    changed = [scores[0] * 100] + scores[1:]
    torch.testing.assert_close(swav_loss(changed, codes[:1], crops_for_assign=(0,)), only_first)


def test_swav_loss_module_equals_pure_functions() -> None:
    scores = [F.normalize(t, dim=1) for t in _crops(4, 6, 9, seed=2)]
    codes = assign_codes(scores)
    torch.testing.assert_close(SwAVLoss()(scores), swav_loss(scores, codes))


@pytest.mark.parametrize(
    "scores, codes, kwargs, match",
    [
        ([torch.zeros(4, 5)], [torch.zeros(4, 5)] * 2, {}, "at least 2 crops"),
        ([torch.zeros(4, 5), torch.zeros(3, 5)], [torch.zeros(4, 5)] * 2, {}, "crop 1"),
        ([torch.zeros(4, 5)] * 3, [torch.zeros(4, 5)], {}, "code tensors"),
        ([torch.zeros(4, 5)] * 3, [torch.zeros(4, 5)] * 2, {"temperature": 0.0}, "temperature"),
        ([torch.zeros(4, 5)] * 3, [torch.zeros(4, 5)] * 2, {"crops_for_assign": (0, 5)}, "not a crop index"),
    ],
)
def test_loss_bad_input(scores, codes, kwargs, match) -> None:
    with pytest.raises(SelfmaskError, match=match):
        swav_loss(scores, codes, **kwargs)


# ---------------------------------------------------------------- collapse guard


def test_collapse_warning_cases() -> None:
    k = 500
    assert collapse_warning(5.0, k, 0.5) is None
    assert "ln(500)" in collapse_warning(math.log(k) + 0.01, k, 0.5)
    assert "prototypes receive" in collapse_warning(5.0, k, 0.05)
    assert "diverged" in collapse_warning(float("nan"), k, 0.5)
    # a small epoch (40 codes) cannot reach 10 % of 500 = 50 prototypes; judge it by what it could reach
    assert collapse_warning(5.0, k, 6 / k, assignments=40) is None
    assert collapse_warning(5.0, k, 3 / k, assignments=40) is not None


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_prototypes": 1}, "num_prototypes"),
        ({"num_prototypes": 0}, "num_prototypes"),
        ({"num_prototypes": True}, "num_prototypes"),
        ({"temperature": 0.0}, "temperature"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"sinkhorn_iterations": 0}, "sinkhorn_iterations"),
        ({"queue_length": -1}, "queue_length"),
        ({"crops_for_assign": (0, 0)}, "crops_for_assign"),
        ({"crops_for_assign": ()}, "crops_for_assign"),
        ({"projection_hidden_dim": 0}, "projection_hidden_dim"),
        ({"head_weight_decay": -1e-6}, "head_weight_decay"),
    ],
)
def test_config_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(SelfmaskError, match=match):
        SwAVConfig(**kwargs)


def test_config_defaults_are_the_paper_and_round_trip() -> None:
    cfg = SwAVConfig()
    assert (cfg.num_prototypes, cfg.temperature, cfg.epsilon, cfg.sinkhorn_iterations) == (500, 0.1, 0.05, 3)
    assert (cfg.queue_length, cfg.queue_start_epoch, cfg.head_lr, cfg.head_weight_decay) == (512, 30, 0.15, 1e-6)
    assert cfg.crops_for_assign == (0, 1) and cfg.projection_dim == 128 and cfg.projection_hidden_dim is None
    again = SwAVConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(SelfmaskError, match="unknown keys"):
        SwAVConfig.from_dict({"prototypes": 3})


def test_validate_queue() -> None:
    validate_queue(SwAVConfig(queue_length=512), dataset_size=1000, batch_size=64)
    with pytest.raises(SelfmaskError, match="queue_length 512 is longer than the dataset"):
        validate_queue(SwAVConfig(queue_length=512), dataset_size=300, batch_size=64)
    with pytest.raises(SelfmaskError, match="at least 2"):
        validate_queue(SwAVConfig(queue_length=0), dataset_size=300, batch_size=1)
    with pytest.raises(SelfmaskError, match="larger than the dataset"):
        validate_queue(SwAVConfig(queue_length=0), dataset_size=30, batch_size=64)


# ---------------------------------------------------------------- head, prototypes


@pytest.mark.parametrize("hidden", [None, 32])
def test_head_output_is_unit_norm(hidden: int | None) -> None:
    head = SwAVHead(20, 8, hidden)
    out = head(torch.randn(6, 20) * 50)
    assert out.shape == (6, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(6))
    assert isinstance(head.projection, nn.Linear) == (hidden is None)


def test_prototypes_unit_norm_after_optimizer_step() -> None:
    torch.manual_seed(0)
    obj = SwAVObjective(16, _small_cfg())
    opt = torch.optim.SGD(obj.param_groups())
    torch.testing.assert_close(obj.prototypes.weight.norm(dim=1), torch.ones(10))
    for g in opt.param_groups:
        g["lr"] = 5.0  # a large step, so the rows leave the sphere
    loss, _ = obj(_crops(4, 8, 16))
    loss.backward()
    opt.step()
    norms = obj.prototypes.weight.norm(dim=1)
    assert (norms - 1).abs().max() > 1e-3
    obj.after_optimizer_step()
    torch.testing.assert_close(obj.prototypes.weight.norm(dim=1), torch.ones(10))


def test_prototypes_frozen_for_the_first_iterations() -> None:
    obj = SwAVObjective(16, _small_cfg(freeze_prototypes_iters=3))
    crops = _crops(3, 8, 16)
    for iteration, frozen in ((0, True), (2, True), (3, False), (10, False)):
        obj.zero_grad(set_to_none=True)
        loss, stats = obj(crops, iteration=iteration)
        loss.backward()
        assert (obj.prototypes.weight.grad is None) == frozen
        assert stats["prototypes_frozen"] == float(frozen)
        assert obj.head.projection.weight.grad is not None  # the head always trains


def test_prototypes_reject_fewer_than_two() -> None:
    with pytest.raises(SelfmaskError):
        Prototypes(8, 1)


# ---------------------------------------------------------------- queue


def test_queue_activates_only_from_its_start_epoch() -> None:
    cfg = _small_cfg(queue_length=16, queue_start_epoch=2)
    obj = SwAVObjective(16, cfg)
    crops = _crops(3, 8, 16)
    used = []
    for epoch in range(4):
        for _step in range(3):
            _loss, stats = obj(crops, epoch=epoch)
            used.append((epoch, obj.queue.filled, stats["queue_used"]))
    # epochs 0-1: nothing stored or used; epoch 2: filled by 8 per step, used once full
    assert [u for u in used if u[0] < 2] == [(0, 0, 0.0)] * 3 + [(1, 0, 0.0)] * 3
    assert [u[1:] for u in used if u[0] == 2] == [(8, 0.0), (16, 0.0), (16, 1.0)]
    assert all(u[2] == 1.0 for u in used if u[0] == 3)


def test_queue_changes_the_codes_and_holds_the_newest_embeddings() -> None:
    cfg = _small_cfg(queue_length=8, queue_start_epoch=0)
    obj = SwAVObjective(16, cfg)
    obj(_crops(3, 8, 16, seed=1))  # fills the queue
    crops = _crops(3, 8, 16, seed=2)
    with torch.no_grad():
        z = obj.head(crops[0])
    before = obj.queue.embeddings.clone()
    loss_with_queue, stats = obj(crops)
    assert stats["queue_used"] == 1.0
    torch.testing.assert_close(obj.queue.embeddings[0], z)  # newest first
    obj.queue.embeddings.copy_(before)
    obj.queue.reset()
    loss_without, stats = obj(crops)
    assert stats["queue_used"] == 0.0
    assert not torch.allclose(loss_with_queue, loss_without)


def test_queue_not_filled_in_eval_mode_and_survives_state_dict() -> None:
    cfg = _small_cfg(queue_length=8, queue_start_epoch=0)
    obj = SwAVObjective(16, cfg).eval()
    obj(_crops(3, 4, 16))
    assert obj.queue.filled == 0
    obj.train()
    obj(_crops(3, 4, 16))
    other = SwAVObjective(16, cfg)
    other.load_state_dict(obj.state_dict())
    assert other.queue.filled == 4
    torch.testing.assert_close(other.queue.embeddings, obj.queue.embeddings)


def test_queue_push_shape_checked() -> None:
    q = SwAVQueue(4, 2, 3)
    with pytest.raises(SelfmaskError, match="shape"):
        q.push(torch.zeros(1, 2, 3))


# ---------------------------------------------------------------- objective


def test_objective_bad_crops() -> None:
    obj = SwAVObjective(16, _small_cfg())
    with pytest.raises(SelfmaskError, match="at least 2 crop"):
        obj([torch.zeros(4, 16)])
    with pytest.raises(SelfmaskError, match="crop 1"):
        obj([torch.zeros(4, 16), torch.zeros(3, 16)])
    with pytest.raises(SelfmaskError, match="crop 0"):
        obj([torch.zeros(4, 15), torch.zeros(4, 15)])
    with pytest.raises(SelfmaskError, match="at least 2"):
        obj([torch.zeros(1, 16)] * 3)  # one image: Sinkhorn cannot share prototypes


def test_param_groups_and_usage_stats() -> None:
    cfg = _small_cfg(head_lr=0.15, head_weight_decay=1e-6)
    obj = SwAVObjective(16, cfg)
    (group,) = obj.param_groups()
    assert group["lr"] == 0.15 and group["weight_decay"] == 1e-6
    assert {id(p) for p in group["params"]} == {id(p) for p in obj.parameters()}
    _loss, stats = obj(_crops(4, 8, 16))
    assert 0 < stats["prototypes_used"] <= stats["max_prototypes_used"] == 1.0
    usage = obj.prototype_usage()
    assert usage["assignments"] == 16 and usage["used_fraction"] == stats["prototypes_used"]
    assert obj.prototype_usage()["assignments"] == 0  # reset


def test_objective_learns_agreement_between_crops() -> None:
    torch.manual_seed(0)
    cfg = _small_cfg(num_prototypes=8, projection_dim=8)
    obj = SwAVObjective(12, cfg)
    g = torch.Generator().manual_seed(0)
    base = nn.Parameter(torch.randn(32, 12, generator=g))
    noise = [0.3 * torch.randn(32, 12, generator=g) for _ in range(4)]
    opt = torch.optim.SGD([{"params": [base], "lr": 0.5}, *obj.param_groups()], momentum=0.9)
    losses = []
    for step in range(25):
        loss, _ = obj([base + n for n in noise], iteration=step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_optimizer_step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1
