"""MaskBank.run: batches whose samples belong to different tasks."""

from __future__ import annotations

import pytest
import torch

from selfmask.backbones import build_backbone
from selfmask.errors import SelfmaskError
from selfmask.masking import MaskConfig, mask_model, mask_scores
from selfmask.storage import MaskBank, merge_mask, save_mask


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone("resnet_tiny").eval()


@pytest.fixture(scope="module")
def eight_tasks(tmp_path_factory):
    """Eight masks of resnet_tiny at densities 0.55-0.9 (random scores), as files."""
    root = tmp_path_factory.mktemp("bank")
    paths = []
    for t in range(8):
        model = mask_model(_tiny(), MaskConfig.preset("resnet"))
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for s in mask_scores(model).values():
                s.copy_(torch.rand(s.shape, generator=g) - (0.45 - 0.05 * t))
        paths.append(root / f"task{t}.mask")
        save_mask(model, paths[-1])
    return paths


def test_mixed_batch_equals_each_tasks_merged_model(eight_tasks) -> None:
    bank = MaskBank(_tiny())
    for t, path in enumerate(eight_tasks):
        bank.add(f"task{t}", path)
    merged = [merge_mask(_tiny(), path).eval() for path in eight_tasks]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(37, 3, 32, 32, generator=g)
    ids = torch.randint(0, 8, (37,), generator=g)
    ids[:8] = torch.arange(8)  # every task present
    bank.activate("task3")
    with torch.no_grad():
        by_name = bank.run(x, [f"task{int(i)}" for i in ids])
        by_id = bank.run(x, ids)
        expected = torch.stack([merged[int(i)](x[n : n + 1])[0] for n, i in enumerate(ids)])
    assert by_name.shape == (37, 128)
    assert (by_name - expected).abs().max().item() < 1e-6
    assert torch.equal(by_name, by_id)
    assert bank.active == "task3"  # the task active before is active again
    bank.deactivate()
    with torch.no_grad():
        bank.run(x[:4], [0, 1, 0, 1])
    assert bank.active is None
    plain = _tiny()
    assert all(torch.equal(a, b) for a, b in zip(bank.model.state_dict().values(), plain.state_dict().values()))


def test_bad_task_ids_are_one_line(eight_tasks) -> None:
    bank = MaskBank(_tiny())
    bank.add("a", eight_tasks[0])
    x = torch.randn(3, 3, 32, 32)
    cases = [
        (["a", "b", "a"], "sample 1 has task 'b', which is not in the bank (tasks: ['a']; or integer ids 0-0)"),
        ([0, 1, 0], "sample 1 has task 1, which is not in the bank"),
        (["a", "a"], "2 task id(s) for a batch of 3 sample(s)"),
        ([0, -1, 0], "sample 1 has task -1"),
    ]
    for tasks, message in cases:
        with pytest.raises(SelfmaskError) as err:
            bank.run(x, tasks)
        assert message in str(err.value) and "\n" not in str(err.value)
    assert bank.active is None


def test_bench_mixed_batches_reports_equal_outputs_and_memory() -> None:
    from selfmask.bench import bank_mixed_throughput

    res = bank_mixed_throughput(batch=6, task_counts=(2, 3), repeats=1)
    assert [r["tasks"] for r in res["rows"]] == [2, 3]
    for r in res["rows"]:
        assert r["max_abs_diff"] < 1e-6 and r["mixed_images_per_s"] > 0 and r["merged_images_per_s"] > 0
        assert r["merged_copies_bytes"] == r["tasks"] * res["rows"][0]["merged_copies_bytes"] // 2
    # one more task costs one bit per masked weight (packed per tensor, so a few bytes of rounding)
    extra = res["rows"][1]["bank_bytes"] - res["rows"][0]["bank_bytes"]
    assert res["masked_weights"] / 8 <= extra < res["masked_weights"] / 8 + 64
