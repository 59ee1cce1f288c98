"""The EfficientNet-Lite0 table of docs/backbones.md from the files the runs left behind.

Usage (after tools/lite0_embedded.sh OUT):

    PYTHONPATH=src python tools/lite0_table.py OUT

Reads OUT/eval32.json and OUT/eval64.json (`selfmask eval --output`, the pretrained backbone) and the
run folders OUT/mask64 and OUT/smn64 (`selfmask adapt`: results.json, metrics.jsonl), and prints one
markdown row per measurement plus the differences the docs discuss. Nothing is computed here that
the runs did not record; a missing file is named and its row left out.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        print(f"(missing: {path})", file=sys.stderr)
        return None
    return json.loads(path.read_text())


def _epochs(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(out: Path) -> int:
    rows: list[tuple[str, dict[str, Any]]] = []
    for px in (32, 64):
        ev = _json(out / f"eval{px}.json")
        if ev is not None:
            val = max(ev["linear_probe"]["val_accuracy"].values())
            rows.append((f"pretrained, {px} px (probe validation accuracy {val:.3f})", ev))
    for name, label in (("mask64", "supervised masking, 64 px, 3 epochs"),
                        ("mask64e9", "supervised masking, 64 px, 9 epochs"),
                        ("smn64", "SMN (SwAV, no labels), 64 px")):
        res = _json(out / name / "results.json")
        if res is not None:
            hist = _epochs(out / name)
            res["_train_s"] = sum(h.get("seconds", 0.0) for h in hist)
            res["_active"] = hist[-1].get("fraction_active") if hist else None
            res["_epochs"] = len(hist)
            rows.append((label, res))
    print("| features | k-NN | linear probe (C) | test accuracy of its head | weights active | training |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        probe = r.get("linear_probe") or {}
        lp = f"{_fmt(r.get('linear_probe_accuracy'))} ({probe.get('C', '-')})"
        active = "-" if r.get("_active") is None else f"{100 * r['_active']:.2f} %"
        train = "-" if "_train_s" not in r else f"{r['_epochs']} epochs, {r['_train_s'] / 60:.0f} min"
        print(f"| {label} | {_fmt(r.get('knn_accuracy'))} | {lp} | {_fmt(r.get('test_accuracy'))} | {active} | {train} |")
    by = dict(rows)
    base = next((r for k, r in by.items() if k.startswith("pretrained, 64")), None)
    if base is not None:
        for label, r in rows:
            if "64 px" in label and not label.startswith("pretrained"):
                print(f"{label}: k-NN {r['knn_accuracy'] - base['knn_accuracy']:+.3f}, "
                      f"linear probe {r['linear_probe_accuracy'] - base['linear_probe_accuracy']:+.3f} vs pretrained 64 px")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
