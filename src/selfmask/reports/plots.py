"""PNG plots: per-layer active fraction (the paper's sparsity figures), training loss, low-shot curve."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from selfmask.io import atomic_write_bytes  # noqa: E402


def _save(fig: Any, path: str | Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_sparsity(layers: Mapping[str, Sequence[tuple[str, float]]], path: str | Path, title: str = "") -> Path:
    """Fraction of weights kept active per masked tensor, one line per run (e.g. per method)."""
    fig, ax = plt.subplots(figsize=(10, 4))
    names: list[str] = []
    for label, rows in layers.items():
        names = [n for n, _ in rows] if len(rows) > len(names) else names
        ax.plot(range(len(rows)), [f for _, f in rows], marker="o", ms=3, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.removesuffix(".weight") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("fraction of weights active")
    ax.set_ylim(top=1.005)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Per-layer active fraction of the learned masks")
    return _save(fig, path)


def plot_training_loss(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Training loss per epoch, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, hist in histories.items():
        if hist:
            ax.plot([h["epoch"] for h in hist], [h["loss"] for h in hist], marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Training loss")
    return _save(fig, path)


def plot_lowshot(rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "accuracy") -> Path:
    """Accuracy vs % labels, one line per method (mean, with std error bars when several seeds)."""
    by_method: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        v = r.get(metric)
        if v is not None and r.get("label_fraction") is not None:
            by_method[r["method"]][float(r["label_fraction"])].append(float(v))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, pts in by_method.items():
        xs = sorted(pts)
        means = [sum(pts[x]) / len(pts[x]) for x in xs]
        stds = [
            (sum((v - m) ** 2 for v in pts[x]) / max(1, len(pts[x]) - 1)) ** 0.5 if len(pts[x]) > 1 else 0.0
            for x, m in zip(xs, means)
        ]
        ax.errorbar([100 * x for x in xs], means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("% of training labels")
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Low-shot accuracy")
    return _save(fig, path)
