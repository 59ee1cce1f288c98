"""Linear probe: L2-regularised multinomial logistic regression on frozen features (METHOD.md section 3).

The regularisation strength ``C`` is either given or chosen on a validation split carved
from the *training* features only (stratified, seeded); the test features and labels are
used for nothing but the final accuracy. The chosen model is refit on all training features.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from selfmask.errors import SelfmaskError

DEFAULT_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
DEFAULT_C = 1.0  # used when C is None but too few labels exist for a validation split
PREPROCESS = ("l2", "standardize", "l2+standardize", "none")


@dataclass(frozen=True)
class ProbeResult:
    """A linear-probe accuracy with every setting that produced it."""

    accuracy: float
    train_accuracy: float
    C: float
    C_selection: str  # "given", "validation" or "default (<reason>)"
    C_grid: list[float]
    val_accuracy: dict[str, float]  # validation accuracy per C (empty unless C_selection == "validation")
    val_fraction: float
    preprocess: str
    num_train: int
    num_test: int
    num_classes: int
    seed: int
    max_iter: int
    converged: bool
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"metric": "linear_probe", **asdict(self)}


def _as_numpy(name: str, x: torch.Tensor | np.ndarray, dim: int) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != dim:
        raise SelfmaskError(f"linear probe: {name} must be {dim}-D, got shape {arr.shape}")
    return arr


class _Preprocessor:
    """L2 normalisation and/or standardisation with statistics fitted on training features only."""

    def __init__(self, mode: str) -> None:
        if mode not in PREPROCESS:
            raise SelfmaskError(f"linear probe: preprocess must be one of {PREPROCESS}, got {mode!r}")
        self.mode = mode
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    @staticmethod
    def _l2(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def fit(self, x: np.ndarray) -> _Preprocessor:
        if "l2" in self.mode:
            x = self._l2(x)
        if "standardize" in self.mode:
            self.mean = x.mean(0, keepdims=True)
            self.std = np.maximum(x.std(0, keepdims=True), 1e-6)
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if "l2" in self.mode:
            x = self._l2(x)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return x


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int, preprocess: str):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    prep = _Preprocessor(preprocess).fit(x)
    clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(prep(x), y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return prep, clf, converged


def linear_probe(
    train_features: torch.Tensor | np.ndarray,
    train_labels: torch.Tensor | np.ndarray,
    test_features: torch.Tensor | np.ndarray,
    test_labels: torch.Tensor | np.ndarray,
    C: float | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    C_grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = 0.2,
    preprocess: str = "l2+standardize",
) -> ProbeResult:
    """Fit a multinomial logistic regression on ``train_*`` and report accuracy on ``test_*``.

    Args:
        C: inverse L2 strength; ``None`` picks it from ``C_grid`` by accuracy on a stratified
            ``val_fraction`` split of the training features (ties -> the smaller C). With fewer
            than 2 training examples in some class there is no validation split and
            :data:`DEFAULT_C` is used (recorded in ``C_selection``).
        seed: seeds the validation split and the solver.
        preprocess: ``"l2"`` (unit-norm features), ``"standardize"`` (train mean/std), both, or ``"none"``.
    """
    xtr = _as_numpy("train features", train_features, 2).astype(np.float64)
    ytr = _as_numpy("train labels", train_labels, 1).astype(np.int64)
    xte = _as_numpy("test features", test_features, 2).astype(np.float64)
    yte = _as_numpy("test labels", test_labels, 1).astype(np.int64)
    if xtr.shape[0] != ytr.shape[0] or xte.shape[0] != yte.shape[0]:
        raise SelfmaskError(
            f"linear probe: {xtr.shape[0]} train features vs {ytr.shape[0]} labels, "
            f"{xte.shape[0]} test features vs {yte.shape[0]} labels"
        )
    if xtr.shape[0] == 0 or xte.shape[0] == 0:
        raise SelfmaskError(f"linear probe: empty split ({xtr.shape[0]} train, {xte.shape[0]} test examples)")
    if xtr.shape[1] != xte.shape[1]:
        raise SelfmaskError(f"linear probe: train features have dimension {xtr.shape[1]}, test {xte.shape[1]}")
    classes, counts = np.unique(ytr, return_counts=True)
    if len(classes) < 2:
        raise SelfmaskError(f"linear probe: the training labels hold {len(classes)} class(es); need at least 2")
    if C is not None and not C > 0:
        raise SelfmaskError(f"linear probe: C must be > 0, got {C}")
    if not 0 < val_fraction < 1:
        raise SelfmaskError(f"linear probe: val_fraction must be in (0, 1), got {val_fraction}")
    grid = [float(c) for c in C_grid]
    notes: list[str] = []
    val_acc: dict[str, float] = {}
    if C is not None:
        chosen, selection = float(C), "given"
    elif counts.min() < 2 or round(val_fraction * len(ytr)) < len(classes):
        chosen = DEFAULT_C
        selection = f"default (too few labels for a validation split: min {int(counts.min())} per class)"
    else:
        from sklearn.model_selection import train_test_split

        idx_fit, idx_val = train_test_split(
            np.arange(len(ytr)), test_size=val_fraction, random_state=seed, stratify=ytr
        )
        for c in grid:
            prep, clf, _ = _fit(xtr[idx_fit], ytr[idx_fit], c, max_iter, seed, preprocess)
            val_acc[repr(c)] = float((clf.predict(prep(xtr[idx_val])) == ytr[idx_val]).mean())
        chosen = max(grid, key=lambda c: (val_acc[repr(c)], -c))
        selection = "validation"
    prep, clf, converged = _fit(xtr, ytr, chosen, max_iter, seed, preprocess)
    if not converged:
        notes.append(f"lbfgs did not converge in {max_iter} iterations")
    missing = sorted(set(np.unique(yte).tolist()) - set(classes.tolist()))
    if missing:
        notes.append(f"test classes absent from the training labels (never predicted): {missing}")
    return ProbeResult(
        accuracy=float((clf.predict(prep(xte)) == yte).mean()),
        train_accuracy=float((clf.predict(prep(xtr)) == ytr).mean()),
        C=chosen,
        C_selection=selection,
        C_grid=grid,
        val_accuracy=val_acc,
        val_fraction=val_fraction,
        preprocess=preprocess,
        num_train=len(ytr),
        num_test=len(yte),
        num_classes=int(max(ytr.max(), yte.max()) + 1),
        seed=seed,
        max_iter=max_iter,
        converged=converged,
        notes=notes,
    )
