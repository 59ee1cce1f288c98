"""The paper's claims, checked per seed and paired, from low-shot result files (docs/swav.md).

    PYTHONPATH=src python tools/smn_claims.py runs/demo/results.json runs/lowshot-s1/results.json ...

Each results file is a ``selfmask demo`` or ``selfmask lowshot`` results.json (rows with ``method_id``,
``label_fraction``, ``seed`` and ``accuracy``); rows of one seed may come from several files.
Prints one Markdown table: for every claim, the difference in each seed and its mean +- std.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

CLAIMS = [  # (label fraction, method, baseline)
    (1.0, "smn-knn", "knn"), (1.0, "smn-lp", "lp"),
    (0.01, "smn-lp", "lp"), (0.01, "smn-lp", "fft"), (0.01, "smn-lp", "mask"), (0.01, "semi", "mask"),
    (0.04, "smn-lp", "lp"), (0.04, "smn-lp", "fft"), (0.04, "smn-lp", "mask"),
    (0.01, "smn-knn", "knn"), (0.04, "smn-knn", "knn"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    args = ap.parse_args()
    acc: dict[tuple[float, str, int], float] = {}
    for path in args.results:
        for row in json.loads(path.read_text())["rows"]:
            acc[(round(row["label_fraction"], 4), row["method_id"], row["seed"])] = row["accuracy"]
    seeds = sorted({s for (_, _, s) in acc})
    print("| labels | claim | " + " | ".join(f"seed {s}" for s in seeds) + " | mean +- std | holds in every seed |")
    print("|---|---|" + "---|" * len(seeds) + "---|---|")

    def line(name: str, diffs: list[float]) -> None:
        sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
        cells = " | ".join(f"{d:+.3f}" for d in diffs)
        print(f"| {name} | {cells} | {statistics.mean(diffs):+.3f} +- {sd:.3f} | {'yes' if min(diffs) > 0 else 'no'} |")

    for frac, method, base in CLAIMS:
        diffs = [acc[(frac, method, s)] - acc[(frac, base, s)] for s in seeds
                 if (frac, method, s) in acc and (frac, base, s) in acc]
        if diffs:
            line(f"{frac:.0%} | {method} - {base}", diffs)


if __name__ == "__main__":
    main()
