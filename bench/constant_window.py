"""The best constant-window guess on an evaluation split: the baseline a grounding model must beat.

    python bench/constant_window.py runs/ts/eval/predictions.jsonl [--steps 41]

Reads the ground truth (`gt_windows`, `duration`) of every row of a predictions.jsonl written by
`jaxgrounding.train` / `evaluate`, tries every window [a, b] with a < b on a grid of fractions of
the video's duration, and prints one JSON line with the window that maximises R1@0.5 and its
R1@{0.3, 0.5, 0.7} and mIoU (percent, IoU >= m, scored by `jaxgrounding.metrics` exactly like
the model's predictions). A model that only learned where events usually are
scores about this; learning to look shows as the gap above it.
"""

import argparse
import json

import numpy as np

from jaxgrounding import metrics


def best_constant_window(rows: list[dict], steps: int) -> dict:
    grid = np.linspace(0.0, 1.0, steps)
    gt = [r["gt_windows"] for r in rows]
    best = None
    for a in grid:
        for b in grid[grid > a]:
            pred = [[[a * r["duration"], b * r["duration"]]] for r in rows]
            result = metrics.grounding_metrics(pred, gt, inclusive=True)
            if best is None or result["R1@0.5"] > best["R1@0.5"]:
                best = result | {"window_fraction": [round(float(a), 4), round(float(b), 4)]}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("predictions", help="a predictions.jsonl with gt_windows and duration per row")
    parser.add_argument("--steps", type=int, default=41, help="grid points over [0, 1] for each end")
    args = parser.parse_args()
    with open(args.predictions) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise SystemExit(f"{args.predictions}: no rows")
    print(json.dumps({"predictions": args.predictions, "samples": len(rows)} | best_constant_window(rows, args.steps)))


if __name__ == "__main__":
    main()
