"""The paper's experiments as named recipes, and a report of our numbers beside the paper's.

``selfmask reproduce EXPERIMENT`` (:mod:`selfmask.cli.reproduce`) runs a :class:`Plan`: a list
of :class:`Step` s, each one ``selfmask`` command (``eval``, ``adapt``, ``lowshot``, ``cascade``)
with the paper's recipe for the backbone as flags, writing into its own folder under ``OUT``
(``adapt`` steps are ordinary run folders, so a killed step resumes with ``adapt --resume``).
This module only plans and reports; it runs nothing.

Experiments (METHOD.md section 6, the numbers in ``paper_results.json`` beside this file):

* ``table1``: k-NN of the pretrained backbone, full fine-tuning (FFT) and supervised masking
  on one dataset (ResNet-18 supervised, ResNet-50 SwAV, CLIP ViT-B/32).
* ``smn``: the self-supervised SMN (SwAV masks): k-NN, linear probe, active weights (ResNet-50 SwAV).
* ``lowshot``: linear probe, SMN + linear probe, FFT and supervised masking over the paper's
  label fractions (ResNet-50 SwAV; CIFAR-10, CIFAR-100).
* ``cascade``: a single SMN, conditional and unconditional cascades (ResNet-50 SwAV; CIFAR-100, iNat500).

Recipes (METHOD.md sections 1-4; where the sources leave a detail open, the choice is written here):

* masks: SGD lr 50 (CLIP: 10), momentum 0.9, no weight decay, batch 64, cosine; supervised 150
  epochs with 40 warm-up epochs (CLIP: 32 epochs, warm-up scaled to the same fraction, 8.5);
  self-supervised 150 epochs, no warm-up. BatchNorm: supervised runs keep updating running
  statistics (the authors' code, ``--bn train``); the SMN keeps them frozen (``--bn eval``), the
  setting whose ablation numbers are the published ones.
* FFT: SGD lr 0.001, momentum 0.9, weight decay 5e-4, batch 64, cosine, 150 epochs; ResNet-50
  SwAV: lr 0.15, weight decay 1e-6. CLIP uses the general FFT recipe.
* SwAV: 500 prototypes, queue 512 from epoch 30, prototypes frozen 313 steps, 2 large + 6 small
  crops, temperature 0.1, Sinkhorn epsilon 0.05 with 3 iterations (``SwAVConfig`` defaults);
  on a training set of fewer than 512 images the queue holds them all.
* low-shot: one seed; the sweep's trained methods use ``selfmask lowshot``'s step budget.
* cascade: 5 experts, the authors' Gaussian-mixture router on a whitened 20-d PCA.

Scaling down: ``epochs`` sets every training step's epochs, ``budget`` multiplies the recipe's;
warm-up, queue start, prototype freezing and low-shot step budgets scale with them. A small
backbone may stand in for a paper backbone (``scale_down``); the report says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from selfmask.errors import SelfmaskError

#: The experiments and the paper backbones with a recipe for each.
EXPERIMENTS: dict[str, tuple[str, ...]] = {
    "table1": ("resnet18", "resnet50", "vit_b_32_clip"),
    "smn": ("resnet50",),
    "lowshot": ("resnet50",),
    "cascade": ("resnet50",),
}

#: Small backbones that may stand in for a paper backbone of the same family (``--scale-down``).
STAND_INS: dict[str, tuple[str, ...]] = {
    "resnet18": ("resnet_tiny", "resnet_small"),
    "resnet50": ("resnet_tiny", "resnet_small"),
    "vit_b_32_clip": ("vit_tiny_clip",),
}

BATCH = 64
FULL_EPOCHS = 150


@dataclass(frozen=True)
class TrainRecipe:
    """One training run of a recipe, in ``selfmask adapt`` settings."""

    method: str
    epochs: int
    lr: float
    weight_decay: float = 0.0
    warmup_epochs: float = 0.0
    objective: str = "supervised"
    bn: str = "train"


#: (paper backbone, step) -> recipe.
RECIPES: dict[tuple[str, str], TrainRecipe] = {
    ("resnet18", "fft"): TrainRecipe("fft", FULL_EPOCHS, 0.001, 5e-4),
    ("resnet18", "mask"): TrainRecipe("mask", FULL_EPOCHS, 50.0, 0.0, 40.0),
    ("resnet50", "fft"): TrainRecipe("fft", FULL_EPOCHS, 0.15, 1e-6),
    ("resnet50", "mask"): TrainRecipe("mask", FULL_EPOCHS, 50.0, 0.0, 40.0),
    ("resnet50", "smn"): TrainRecipe("mask", FULL_EPOCHS, 50.0, 0.0, 0.0, "swav", "eval"),
    ("vit_b_32_clip", "fft"): TrainRecipe("fft", FULL_EPOCHS, 0.001, 5e-4),
    ("vit_b_32_clip", "mask"): TrainRecipe("mask", 32, 10.0, 0.0, 40.0 * 32 / FULL_EPOCHS),
}

#: The paper's SwAV settings, scaled with the epochs where they count epochs or steps.
SWAV_PROTOTYPES = 500
SWAV_QUEUE = 512
SWAV_QUEUE_START_EPOCH = 30
SWAV_FREEZE_PROTOTYPES_ITERS = 313
#: ``selfmask lowshot`` step budget at 100 % labels and its minimum, scaled like the epochs.
LOWSHOT_STEPS_FULL = 600
LOWSHOT_MIN_STEPS = 120
CASCADE_EXPERTS = 5


@lru_cache(maxsize=1)
def paper_results() -> dict[str, Any]:
    """The published numbers (``paper_results.json``, METHOD.md section 6)."""
    text = resources.files("selfmask.experiments").joinpath("paper_results.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class Step:
    """One ``selfmask`` command of a plan, writing into ``OUT/<name>``.

    ``kind`` says how its state is read: ``"run"`` (an ``adapt`` run folder: finished, resumable,
    or new), ``"file"`` (done when ``OUT/<name>/results.json`` exists; otherwise redone).
    """

    name: str
    kind: str
    argv: tuple[str, ...]


@dataclass
class Plan:
    experiment: str
    dataset: str
    backbone: str
    paper_backbone: str
    steps: list[Step] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def check_request(experiment: str, backbone: str, scale_down: str | None, dataset: str | None) -> tuple[str, str]:
    """``(paper backbone, dataset)`` of a request, or a SelfmaskError naming what is wrong (before any work)."""
    if experiment not in EXPERIMENTS:
        raise SelfmaskError(f"unknown experiment {experiment!r}; expected one of: {', '.join(EXPERIMENTS)}")
    allowed = EXPERIMENTS[experiment]
    if scale_down is None:
        paper_backbone = backbone
        if backbone not in allowed:
            raise SelfmaskError(
                f"experiment {experiment!r} has no paper recipe for backbone {backbone!r}; recipes exist for: "
                f"{', '.join(allowed)} (a small stand-in: --scale-down PAPER_BACKBONE)"
            )
    else:
        paper_backbone = scale_down
        if scale_down not in allowed:
            raise SelfmaskError(
                f"--scale-down {scale_down!r}: experiment {experiment!r} has paper recipes for: {', '.join(allowed)}"
            )
        if backbone != scale_down and backbone not in STAND_INS[scale_down]:
            raise SelfmaskError(
                f"--scale-down {scale_down!r}: backbone {backbone!r} is not a stand-in for it; "
                f"use one of: {', '.join(STAND_INS[scale_down])}"
            )
    if dataset is None:
        raise SelfmaskError("--dataset NAME is needed (the paper's column; cifar10:/cifar100: data say it themselves)")
    known = paper_datasets(experiment, paper_backbone)
    if dataset not in known:
        raise SelfmaskError(
            f"the paper reports no {experiment!r} numbers for dataset {dataset!r} with {paper_backbone}; "
            f"it does for: {', '.join(known)}"
        )
    return paper_backbone, dataset


def paper_datasets(experiment: str, paper_backbone: str) -> list[str]:
    """The datasets the paper reports for ``experiment`` and ``paper_backbone``."""
    block = paper_results()[experiment][paper_backbone]
    if experiment == "table1":
        return list(block["knn"])
    if experiment == "smn":
        return list(block["knn"])
    return [k for k in block if k != "fractions"]


def dataset_from_spec(spec: str) -> str | None:
    """The paper dataset a data specification names by itself (``cifar10:``, ``cifar100:``), else ``None``."""
    kind = spec.partition(":")[0]
    return kind if kind in ("cifar10", "cifar100") else None


def check_classes(dataset: str, num_classes: int, spec: str) -> None:
    """The data must have the class count of the paper's dataset."""
    expected = paper_results()["datasets"][dataset]
    if num_classes != expected:
        raise SelfmaskError(
            f"data {spec!r} has {num_classes} classes, but the paper's {dataset} has {expected}; "
            "pass the matching --dataset or the right data"
        )


def _scale(recipe_epochs: int, epochs: int | None, budget: float | None) -> int:
    if epochs is not None:
        return epochs
    return max(1, round(recipe_epochs * (budget if budget is not None else 1.0)))


def _adapt_argv(recipe: TrainRecipe, epochs: int, common: list[str], out: Path, queue: int) -> list[str]:
    ratio = epochs / recipe.epochs
    argv = [
        "adapt", *common, "--out", str(out), "--method", recipe.method, "--objective", recipe.objective,
        "--epochs", str(epochs), "--batch-size", str(BATCH), "--lr", repr(recipe.lr),
        "--weight-decay", repr(recipe.weight_decay), "--momentum", "0.9",
        "--warmup-epochs", repr(recipe.warmup_epochs * ratio), "--bn", recipe.bn,
    ]
    if recipe.objective == "swav":
        argv += [
            "--prototypes", str(SWAV_PROTOTYPES), "--queue-length", str(queue),
            "--queue-start-epoch", str(int(SWAV_QUEUE_START_EPOCH * ratio)),
            "--freeze-prototypes-iters", str(round(SWAV_FREEZE_PROTOTYPES_ITERS * ratio)),
        ]
    return argv


def make_plan(
    experiment: str,
    *,
    data: str,
    backbone: str,
    weights: str | None,
    out: Path,
    dataset: str | None = None,
    scale_down: str | None = None,
    epochs: int | None = None,
    budget: float | None = None,
    device: str = "cpu",
    cache_dir: str | None = None,
    checkpoint_every: int = 0,
    progress: bool = False,
    train_images: int | None = None,
) -> Plan:
    """The steps of ``experiment`` for ``backbone``, as ``selfmask`` argument lists.

    ``train_images``: the training set's size when known; a SwAV queue longer than it (tiny
    scaled-down data) is shortened to it.
    """
    if epochs is not None and epochs < 1:
        raise SelfmaskError(f"--epochs must be >= 1, got {epochs}")
    if budget is not None and not (0 < budget <= 1):
        raise SelfmaskError(f"--budget must be a fraction in (0, 1], got {budget}")
    if epochs is not None and budget is not None:
        raise SelfmaskError("give --epochs or --budget, not both")
    paper_backbone, dataset = check_request(experiment, backbone, scale_down, dataset or dataset_from_spec(data))
    source = ["--data", data, "--backbone", backbone, "--device", device]
    source += ["--weights", str(weights)] if weights else []
    source += ["--cache-dir", str(cache_dir)] if cache_dir else []
    train_flags = [*source, "--checkpoint-every", str(checkpoint_every)]
    train_flags += [] if progress else ["--no-progress"]
    plan = Plan(experiment, dataset, backbone, paper_backbone)
    epoch_of: dict[str, int] = {}
    queue = min(SWAV_QUEUE, train_images) if train_images else SWAV_QUEUE

    def train(step: str) -> Step:
        recipe = RECIPES[(paper_backbone, step)]
        n = epoch_of[step] = _scale(recipe.epochs, epochs, budget)
        argv = _adapt_argv(recipe, n, train_flags, out / step, queue)
        return Step(step, "run", tuple(argv + (["--no-probe"] if recipe.objective == "supervised" else [])))

    if experiment == "table1":
        knn = ["eval", *source, "--no-probe", "--output", str(out / "knn" / "results.json")]
        plan.steps = [Step("knn", "file", tuple(knn)), train("fft"), train("mask")]
    else:
        plan.steps = [train("smn")]
    if experiment == "lowshot":
        fractions = paper_results()["lowshot"][paper_backbone]["fractions"]
        factor = epoch_of["smn"] / RECIPES[(paper_backbone, "smn")].epochs
        argv = [
            "lowshot", *source, "--smn", str(out / "smn"), "--fractions", *map(str, fractions),
            "--seeds", "0", "--methods", *LOWSHOT_METHODS, "--out", str(out / "lowshot"), "--overwrite",
            "--steps-full", str(max(1, round(LOWSHOT_STEPS_FULL * factor))),
            "--min-steps", str(max(1, round(LOWSHOT_MIN_STEPS * factor))),
        ]
        plan.steps.append(Step("lowshot", "file", tuple(argv + ([] if progress else ["--no-progress"]))))
    if experiment == "cascade":
        argv = ["cascade", str(out / "smn"), "--out", str(out / "cascade"), "--overwrite", "--data", data,
                "--experts", str(CASCADE_EXPERTS), "--time-images", "0"]
        argv += ["--cache-dir", str(cache_dir)] if cache_dir else []
        plan.steps.append(Step("cascade", "file", tuple(argv + ([] if progress else ["--no-progress"]))))
    plan.settings = {
        "experiment": experiment, "dataset": dataset, "data": data, "backbone": backbone,
        "paper_backbone": paper_backbone, "weights": str(weights) if weights else None,
        "scaled_down": backbone != paper_backbone or epochs is not None or budget is not None,
        "epochs": epoch_of, "recipe_epochs": {s: RECIPES[(paper_backbone, s)].epochs for s in epoch_of},
        "budget": budget, "device": device,
    }
    if experiment != "table1":
        plan.settings["swav_queue"] = queue
    return plan


#: ``selfmask lowshot`` methods with paper numbers, in the paper's order.
LOWSHOT_METHODS = ("lp", "smn-lp", "fft", "mask")


def _row(metric: str, ours: float | None, paper: float | None, **extra: Any) -> dict[str, Any]:
    diff = None if ours is None or paper is None or math.isnan(ours) else ours - paper
    return {"metric": metric, "ours": ours, "paper": paper, "difference": diff, **extra}


def report_rows(plan: Plan, results: dict[str, dict[str, Any]], percent_active: float | None = None) -> list[dict[str, Any]]:
    """Our numbers beside the paper's: one row per published number the plan measured.

    ``results`` maps each step name to what it wrote (``results.json``); ``percent_active`` is
    the SMN's active weights in percent (the ``smn`` experiment).
    """
    paper = paper_results()[plan.experiment][plan.paper_backbone]
    ds = plan.dataset
    rows: list[dict[str, Any]] = []
    if plan.experiment == "table1":
        rows.append(_row("k-NN (pretrained)", results["knn"].get("knn_accuracy"), paper["knn"][ds]))
        rows.append(_row("FFT", results["fft"].get("test_accuracy"), paper["fft"][ds]))
        rows.append(_row("supervised mask", results["mask"].get("test_accuracy"), paper["mask"][ds]))
    elif plan.experiment == "smn":
        rows.append(_row("SMN k-NN", results["smn"].get("knn_accuracy"), paper["knn"][ds]))
        rows.append(_row("SMN linear probe", results["smn"].get("linear_probe_accuracy"), paper["linear_probe"][ds]))
        rows.append(_row("SMN active weights (%)", percent_active, paper["percent_active"][ds]))
    elif plan.experiment == "lowshot":
        from selfmask.experiments.lowshot import METHOD_LABELS

        fractions = paper["fractions"]
        ours = {(r["method"], r["label_fraction"]): r["mean"] for r in results["lowshot"].get("summary", [])}
        for method in LOWSHOT_METHODS:
            for i, fraction in enumerate(fractions):
                label = METHOD_LABELS[method]
                rows.append(_row(f"{label} @ {fraction:.2%} labels", ours.get((label, fraction)), paper[ds][method][i]))
    elif plan.experiment == "cascade":
        evaluation = results["cascade"].get("evaluation", {})
        for name in ("single_smn", "conditional", "unconditional"):
            for metric, key in (("k-NN", "knn_accuracy"), ("linear probe", "linear_probe_accuracy")):
                value = evaluation.get(name, {}).get(key)
                rows.append(_row(f"{name} {metric}", value, paper[ds][name]["knn" if key == "knn_accuracy" else "linear_probe"]))
    return rows


def smn_percent_active(run_dir: Path) -> float:
    """Active weights of a mask run's masks, in percent (the paper's "fraction left active")."""
    from selfmask.masking import mask_summary
    from selfmask.storage.run import load_run

    return 100.0 * mask_summary(load_run(run_dir).model).fraction_active


def report_markdown(plan: Plan, rows: list[dict[str, Any]]) -> str:
    """The report as a Markdown table (ours, paper, difference)."""
    s = plan.settings
    scaled = " (scaled down: not the paper's setting)" if s.get("scaled_down") else ""
    lines = [
        f"# selfmask reproduce {plan.experiment}: {plan.dataset}, {plan.backbone}"
        + (f" standing in for {plan.paper_backbone}" if plan.backbone != plan.paper_backbone else ""),
        "",
        f"Recipe: {plan.paper_backbone}{scaled}; epochs {s.get('epochs')} of the recipe's {s.get('recipe_epochs')}; "
        f"data {s.get('data')}; weights {s.get('weights')}; device {s.get('device')}.",
        "Paper: Warmerdam, Caron, Asano, GCPR 2024 (selfmask/experiments/paper_results.json). "
        "Accuracy: the trained head's for FFT and masks; weighted k-NN with k=200, T=0.1.",
        "",
        "| metric | ours | paper | difference |",
        "|---|---|---|---|",
    ]

    def fmt(v: float | None, signed: bool = False) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return f"{v:+.3f}" if signed else f"{v:.3f}"

    for r in rows:
        lines.append(f"| {r['metric']} | {fmt(r['ours'])} | {fmt(r['paper'])} | {fmt(r['difference'], True)} |")
    return "\n".join(lines) + "\n"


__all__ = [
    "EXPERIMENTS",
    "RECIPES",
    "Plan",
    "Step",
    "TrainRecipe",
    "check_classes",
    "check_request",
    "make_plan",
    "paper_results",
    "report_markdown",
    "report_rows",
    "smn_percent_active",
]
