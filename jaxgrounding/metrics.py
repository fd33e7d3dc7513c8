"""Temporal-grounding metrics: tIoU, R1@m, mIoU (Charades-STA) and E.T.Bench's TVG/EPM and TAL F1.

    tIoU(a, b) = inter / (len_a + len_b - inter)          (MeCo paper sec. 4.1; REFERENCE.md)

Windows are (start, end) pairs in seconds with start <= end; parsers sanitise model output
(swap reversed ends) before it gets here, and a reversed or non-finite window is an error. All
results are plain Python floats in PERCENT. Every sample counts in every denominator: a sample
whose prediction list is empty scores 0 (a miss), as in the reference evaluation scripts.

Threshold convention. Papers disagree on whether IoU exactly m counts as a hit at R1@m:
Invert4TVG, E.T.Chat / MeCo (`eval_grounding.py`) and E.T.Bench count IoU >= m; Time-R1 counts
IoU > m. `recall_at_1` therefore takes `inclusive` as a required keyword; `grounding_metrics`
defaults to >= (the MeCo / Invert4TVG tables) and E.T.Bench's metrics always use >=.
"""

from __future__ import annotations

import math
from typing import Sequence

Window = tuple[float, float]

ETBENCH_THRESHOLDS = (0.1, 0.3, 0.5, 0.7)


def tiou(a: Window, b: Window) -> float:
    """Temporal IoU of two windows; 0 when the union has zero length (two equal points)."""
    a0, a1 = _window(a)
    b0, b1 = _window(b)
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = (a1 - a0) + (b1 - b0) - inter
    return inter / union if union > 0 else 0.0


def recall_at_1(
    predictions: Sequence[Sequence[Window]],
    ground_truths: Sequence[Sequence[Window]],
    thresholds: Sequence[float] = (0.3, 0.5, 0.7),
    *,
    inclusive: bool,
) -> dict[str, float]:
    """R1@m: percent of samples whose top-1 window reaches tIoU m with its best ground truth.

    predictions[i]: ranked windows of sample i (top-1 first; may be empty = miss);
    ground_truths[i]: its non-empty list of ground-truth windows. A hit is best tIoU >= m with
    `inclusive=True` (Invert4TVG, E.T.Chat / MeCo), > m with `inclusive=False` (Time-R1).
    Keys "R1@0.3", "R1@0.5", ...
    """
    ious = _top1_best_ious(predictions, ground_truths)
    return {f"R1@{m:g}": _percent_hits(ious, m, inclusive) for m in thresholds}


def mean_iou(predictions: Sequence[Sequence[Window]], ground_truths: Sequence[Sequence[Window]]) -> float:
    """Percent mean over samples of the top-1 window's best tIoU (0 for an empty prediction)."""
    ious = _top1_best_ious(predictions, ground_truths)
    return 100.0 * sum(ious) / len(ious)


def grounding_metrics(
    predictions: Sequence[Sequence[Window]], ground_truths: Sequence[Sequence[Window]], *, inclusive: bool = True
) -> dict[str, float]:
    """Charades-STA style {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"} in percent.

    Defaults to hits at IoU >= m, the convention of the MeCo and Invert4TVG tables; pass
    `inclusive=False` to compare with Time-R1 (IoU > m).
    """
    out = recall_at_1(predictions, ground_truths, (0.3, 0.5, 0.7), inclusive=inclusive)
    out["mIoU"] = mean_iou(predictions, ground_truths)
    return out


def etbench_tvg_f1(predictions: Sequence[Sequence[Window]], ground_truths: Sequence[Sequence[Window]]) -> float:
    """E.T.Bench TVG / EPM "F1": the mean over m in {0.1, 0.3, 0.5, 0.7} of top-1 recall (IoU >= m).

    Despite its name no precision enters: E.T.Bench's `tvg_eval` scores only the first predicted
    window of each sample against the ground truth, counts hits at IoU >= m over all samples
    (unparseable outputs are misses), and averages the four recalls. Its samples have one
    ground-truth window; with several, the best one counts. Percent.
    """
    ious = _top1_best_ious(predictions, ground_truths)
    return sum(_percent_hits(ious, m, inclusive=True) for m in ETBENCH_THRESHOLDS) / len(ETBENCH_THRESHOLDS)


def tal_f1(
    predictions: Sequence[Sequence[Window]],
    ground_truths: Sequence[Sequence[Window]],
    thresholds: Sequence[float] = ETBENCH_THRESHOLDS,
) -> float:
    """E.T.Bench TAL F1 (its `tal_eval`), in percent. Every predicted segment of a sample counts.

    For each sample and threshold m, with iou[g, p] the tIoU of ground truth g and prediction p:
      - 0 if the sample has no prediction, or if no pair reaches iou >= m;
      - otherwise recall = fraction of ground truths g with max_p iou[g, p] >= m,
        precision = fraction of predictions p with max_g iou[g, p] >= m,
        F1 = 2 * precision * recall / (precision + recall).
    F1@m = mean of the per-sample F1 over ALL samples; the result is the mean of F1@m over m.

    This is coverage, not one-to-one matching: one prediction may cover several ground truths and
    several predictions the same ground truth, and F1 is taken per sample, then averaged (not from
    counts summed over the set). We follow E.T.Bench exactly because the numbers to compare with
    (MeCo table 1) come from its script.
    """
    _check_pairs(predictions, ground_truths)
    # Per sample, iou[g][p]; None for a sample without predictions (it scores 0 at every m).
    iou_per_sample = []
    for i, (preds, gts) in enumerate(zip(predictions, ground_truths)):
        gt_windows = [_window(g, i) for g in gts]
        pred_windows = [_window(p, i) for p in preds]
        iou_per_sample.append([[tiou(p, g) for p in pred_windows] for g in gt_windows] if pred_windows else None)
    f1_at = []
    for m in thresholds:
        total = 0.0
        for iou in iou_per_sample:
            if iou is None:
                continue
            best_per_gt = [max(row) for row in iou]
            best_per_pred = [max(col) for col in zip(*iou)]
            if max(best_per_gt) < m:
                continue
            # Both fractions are > 0 here (the pair reaching m counts in each), so F1 is defined.
            recall = sum(v >= m for v in best_per_gt) / len(best_per_gt)
            precision = sum(v >= m for v in best_per_pred) / len(best_per_pred)
            total += 2 * precision * recall / (precision + recall)
        f1_at.append(total / len(iou_per_sample))
    return 100.0 * sum(f1_at) / len(f1_at)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _window(w, sample: int | None = None) -> Window:
    """(start, end) as floats; ValueError (naming the sample when known) if malformed."""
    where = "" if sample is None else f"sample {sample}: "
    try:
        start, end = (float(x) for x in w)
    except (TypeError, ValueError):
        raise ValueError(f"{where}window {w!r} is not a (start, end) pair of numbers") from None
    if not (math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"{where}window {w!r} is not finite")
    if end < start:
        raise ValueError(f"{where}window {w!r} ends before it starts")
    return start, end


def _check_pairs(predictions, ground_truths) -> None:
    if len(predictions) != len(ground_truths):
        first_unpaired = min(len(predictions), len(ground_truths))
        raise ValueError(
            f"{len(predictions)} predictions but {len(ground_truths)} ground truths: "
            f"sample {first_unpaired} has no counterpart"
        )
    if len(ground_truths) == 0:
        raise ValueError("no samples")
    for i, gts in enumerate(ground_truths):
        if len(gts) == 0:
            raise ValueError(f"sample {i}: empty ground-truth window list")


def _top1_best_ious(predictions, ground_truths) -> list[float]:
    """Per sample, the best tIoU of the top-1 prediction over the ground truths (0 if none)."""
    _check_pairs(predictions, ground_truths)
    ious = []
    for i, (preds, gts) in enumerate(zip(predictions, ground_truths)):
        gt_windows = [_window(g, i) for g in gts]
        if len(preds) == 0:
            ious.append(0.0)
            continue
        top1 = _window(preds[0], i)
        ious.append(max(tiou(top1, g) for g in gt_windows))
    return ious


def _percent_hits(ious: list[float], m: float, inclusive: bool) -> float:
    hits = sum((iou >= m) if inclusive else (iou > m) for iou in ious)
    return 100.0 * hits / len(ious)
