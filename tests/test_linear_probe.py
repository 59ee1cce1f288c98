"""Linear probe: beats chance on separable data; C is chosen on train features only."""

from __future__ import annotations

import pytest
import torch

from selfmask.errors import SelfmaskError
from selfmask.evaluation import ProbeResult, linear_probe


def blobs(n: int, classes: int, dim: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.arange(n) % classes
    return centers[y] + torch.randn(n, dim, generator=g) * noise, y


def test_beats_chance_on_separable_data_and_records_settings() -> None:
    xtr, ytr = blobs(300, 5, 16, 1.0, 0)
    xte, yte = blobs(200, 5, 16, 1.0, 1)
    res = linear_probe(xtr, ytr, xte, yte, seed=0)
    assert isinstance(res, ProbeResult)
    assert res.accuracy > 0.9  # chance is 0.2
    assert res.C_selection == "validation" and res.C in res.C_grid
    assert set(res.val_accuracy) == {repr(c) for c in res.C_grid}
    d = res.to_dict()
    assert d["metric"] == "linear_probe" and d["num_train"] == 300 and d["num_test"] == 200 and d["seed"] == 0


def test_C_selection_never_touches_test_data() -> None:
    xtr, ytr = blobs(240, 4, 8, 3.0, 2)  # noisy, so C matters
    xte, yte = blobs(160, 4, 8, 3.0, 3)
    a = linear_probe(xtr, ytr, xte, yte, seed=5)
    shuffled = yte[torch.randperm(len(yte), generator=torch.Generator().manual_seed(0))]
    b = linear_probe(xtr, ytr, xte * -7.0 + 3.0, shuffled, seed=5)
    assert (a.C, a.val_accuracy) == (b.C, b.val_accuracy)
    assert a.train_accuracy == b.train_accuracy


def test_given_C_and_default_when_too_few_labels() -> None:
    xtr, ytr = blobs(40, 4, 8, 0.5, 4)
    xte, yte = blobs(40, 4, 8, 0.5, 5)
    given = linear_probe(xtr, ytr, xte, yte, C=0.5)
    assert given.C == 0.5 and given.C_selection == "given" and given.val_accuracy == {}
    one_shot = linear_probe(xtr[:4], ytr[:4], xte, yte)  # one example per class: no validation split
    assert one_shot.C_selection.startswith("default") and one_shot.accuracy > 0.5


@pytest.mark.parametrize("preprocess", ["l2", "standardize", "l2+standardize", "none"])
def test_preprocess_modes(preprocess: str) -> None:
    xtr, ytr = blobs(200, 3, 8, 0.5, 6)
    xte, yte = blobs(100, 3, 8, 0.5, 7)
    res = linear_probe(xtr, ytr, xte, yte, C=1.0, preprocess=preprocess)
    assert res.accuracy > 0.9 and res.preprocess == preprocess


def test_bad_inputs_raise() -> None:
    x, y = blobs(20, 2, 4, 0.5, 8)
    with pytest.raises(SelfmaskError, match="empty"):
        linear_probe(x[:0], y[:0], x, y)
    with pytest.raises(SelfmaskError, match="dimension"):
        linear_probe(x, y, x[:, :3], y)
    with pytest.raises(SelfmaskError, match="labels"):
        linear_probe(x, y[:5], x, y)
    with pytest.raises(SelfmaskError, match="at least 2"):
        linear_probe(x, torch.zeros(20, dtype=torch.long), x, y)
    with pytest.raises(SelfmaskError, match="C must"):
        linear_probe(x, y, x, y, C=0.0)
    with pytest.raises(SelfmaskError, match="preprocess"):
        linear_probe(x, y, x, y, C=1.0, preprocess="pca")
