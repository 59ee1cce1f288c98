"""Seeds table, a no-specialisation ablation and quiet inference timing for saved cascades (docs/cascade.md).

    PYTHONPATH=src python tools/cascade_report.py CASC_S0 CASC_S1 CASC_S2 [--ablation] [--time-repeats 9]

Each argument is a folder written by ``selfmask cascade`` (with its ``results.json``). Prints, as
Markdown, the mean and std over the folders of k-NN and linear-probe accuracy for the pretrained
backbone, the single SMN and both fusions, and the group purity (largest class share per
routed group). ``--ablation`` rebuilds each cascade with every expert replaced by the root
(the dispatcher) and refits the fusion on the training set: what routing + fusion give
without any specialisation (evaluated with the default k-NN k = 200, T = 0.1 and a linear probe,
the settings of the documented runs). ``--time-repeats N`` re-times inference on the reloaded cascade
(256 test images, interleaved, medians of N).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from selfmask.cascade import Cascade, evaluate_cascade, fit_fusion, time_inference
from selfmask.data.sources import load_data

ROWS = [("pretrained", "pretrained backbone (no masks)"), ("single_smn", "single SMN (the dispatcher)"),
        ("conditional", "cascade, conditional"), ("unconditional", "cascade, unconditional")]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(evals: list[dict], rows: list[tuple[str, str]]) -> None:
    print("| model | k-NN | linear probe | per seed (k-NN / LP) |\n|---|---|---|---|")
    for key, label in rows:
        knn = [e[key]["knn_accuracy"] for e in evals]
        lp = [e[key].get("linear_probe_accuracy", float("nan")) for e in evals]  # nan: built with --no-probe
        per = ", ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(knn, lp))
        print(f"| {label} | {mean_std(knn)} | {mean_std(lp)} | {per} |")


def purity(cascade: Cascade, train) -> list[float]:
    _, _, routes = cascade.embed_parts(train.images, "conditional")
    out = []
    for g in range(cascade.num_experts):
        labels = train.labels[routes == g]
        out.append(float(torch.bincount(labels).max()) / max(1, len(labels)) if len(labels) else 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--ablation", action="store_true")
    ap.add_argument("--time-repeats", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    results = [json.loads((f / "results.json").read_text()) for f in args.folders]
    print(f"folders: {', '.join(str(f) for f in args.folders)}\n")
    table([r["evaluation"] for r in results], ROWS)
    ablations, timings = [], []
    for folder, res in zip(args.folders, results):
        cascade = Cascade.load(folder)
        spec = res.get("data") or "embedded"
        train, test = load_data(spec, resolution=cascade.info.input_size, cache_dir=args.cache_dir)
        seed = int(res["build"]["cascade"]["seed"])
        print(f"\n{folder}: groups {res['build']['group_sizes']}, largest class share per group "
              f"{[round(p, 3) for p in purity(cascade, train)]}")
        if args.time_repeats:  # before the ablation, which reuses this cascade's backbone
            timings.append(time_inference(cascade, test.images[:256], repeats=args.time_repeats))
        if args.ablation:
            root = cascade.masks["root"]
            copy = Cascade(cascade.bank.deactivate(), cascade.info, root, [root] * cascade.num_experts, cascade.router)
            fit_fusion(copy, train, cascade.fusion["conditional"].dim)
            ablations.append(evaluate_cascade(copy, train, test, seed=seed))
    if ablations:
        print("\nAblation: every expert replaced by the root (no specialisation), fusion refitted\n")
        table(ablations, ROWS[1:])
    if timings:
        print(f"\nInference ({timings[0]['images']} images, {timings[0]['threads']} threads, medians of "
              f"{timings[0]['repeats']}):\n\n| | forward passes | ms / image | ratio to single SMN (per folder) |\n|---|---|---|---|")
        for key in ("single_smn", "conditional", "unconditional"):
            ms = [t[key]["ms_per_image"] for t in timings]
            ratios = [t[key]["ratio_to_single"] for t in timings]
            print(f"| {key} | {timings[0][key]['forward_passes']} | {mean_std(ms)} | "
                  f"{statistics.median(ratios):.2f}x median ({', '.join(f'{r:.2f}' for r in ratios)}) |")
        print(f"\nmask switch: {statistics.median(t['switch_ms'] for t in timings):.2f} ms (median)")


if __name__ == "__main__":
    main()
