"""Grounding metrics on hand-computed cases (numbers worked out in the comments)."""

import numpy as np
import pytest

from jaxgrounding.metrics import etbench_tvg_f1, grounding_metrics, mean_iou, recall_at_1, tal_f1, tiou


@pytest.mark.parametrize(
    "a,b,want",
    [
        ((0, 1), (2, 3), 0.0),  # disjoint
        ((0, 10), (2, 4), 0.2),  # nested: inter 2, union 10 + 2 - 2 = 10
        ((1, 3), (1, 3), 1.0),  # identical
        ((0, 1), (1, 2), 0.0),  # touching: inter 0
        ((0, 4), (2, 6), 1 / 3),  # partial: inter 2, union 4 + 4 - 2 = 6
        ((2, 2), (0, 4), 0.0),  # zero-length inside: inter 0, union 4
        ((2, 2), (2, 2), 0.0),  # two equal points: union 0 -> 0 by definition
        ((0.5, 2.5), (1.5, 4.5), 0.25),  # inter 1, union 2 + 3 - 1 = 4
    ],
)
def test_tiou_hand_cases(a, b, want):
    assert tiou(a, b) == pytest.approx(want, abs=1e-12)
    assert tiou(b, a) == pytest.approx(want, abs=1e-12)


# Four samples; the top-1 window's best tIoU over the ground truths:
#   0: top-1 (0, 1) vs (0, 2): 1 / 2 = 0.5 exactly (the second, perfect window does not count)
#   1: top-1 (2, 6) vs (0, 4): 2 / 6 = 0.333; vs (3, 7): inter 3, union 4 + 4 - 3 = 5 -> 0.6 (best)
#   2: no prediction -> 0
#   3: identical -> 1.0
PREDS = [[(0, 1), (0, 2)], [(2, 6)], [], [(10, 20)]]
GTS = [[(0, 2)], [(0, 4), (3, 7)], [(0, 1)], [(10, 20)]]


def test_recall_inclusive_vs_exclusive_at_exact_boundary():
    # >= : 0.3 -> {0.5, 0.6, 1} = 3/4; 0.5 -> {0.5, 0.6, 1} = 3/4; 0.7 -> {1} = 1/4
    assert recall_at_1(PREDS, GTS, inclusive=True) == {"R1@0.3": 75.0, "R1@0.5": 75.0, "R1@0.7": 25.0}
    # > : sample 0's IoU of exactly 0.5 is no longer a hit at 0.5 -> {0.6, 1} = 2/4
    assert recall_at_1(PREDS, GTS, inclusive=False) == {"R1@0.3": 75.0, "R1@0.5": 50.0, "R1@0.7": 25.0}
    # (0, 3) vs (0, 10) is exactly 0.3: a hit at R1@0.3 only when inclusive.
    assert recall_at_1([[(0, 3)]], [[(0, 10)]], (0.3,), inclusive=True) == {"R1@0.3": 100.0}
    assert recall_at_1([[(0, 3)]], [[(0, 10)]], (0.3,), inclusive=False) == {"R1@0.3": 0.0}


def test_mean_iou_and_grounding_metrics():
    # (0.5 + 0.6 + 0 + 1) / 4 = 0.525
    assert mean_iou(PREDS, GTS) == pytest.approx(52.5)
    out = grounding_metrics(PREDS, GTS)
    assert out == pytest.approx({"R1@0.3": 75.0, "R1@0.5": 75.0, "R1@0.7": 25.0, "mIoU": 52.5})
    assert grounding_metrics(PREDS, GTS, inclusive=False)["R1@0.5"] == 50.0
    assert all(type(v) is float for v in out.values())


def test_best_ground_truth_counts():
    # top-1 (5, 9): vs (0, 2) 0; vs (4, 10): inter 4, union 4 + 6 - 4 = 6 -> 0.667: a hit at 0.5.
    assert recall_at_1([[(5, 9)]], [[(0, 2), (4, 10)]], (0.5,), inclusive=True) == {"R1@0.5": 100.0}
    assert mean_iou([[(5, 9)]], [[(0, 2), (4, 10)]]) == pytest.approx(200 / 3)


def test_etbench_tvg_f1():
    # Same samples, IoUs {0.5, 0.6, 0, 1}, hits at >= m: 0.1 -> 3, 0.3 -> 3, 0.5 -> 3, 0.7 -> 1
    # recalls 75, 75, 75, 25 -> mean 62.5
    assert etbench_tvg_f1(PREDS, GTS) == pytest.approx(62.5)
    # One sample at IoU exactly 0.1 ((0, 1) vs (0, 10)): a hit at 0.1 only -> (100 + 0 + 0 + 0) / 4
    assert etbench_tvg_f1([[(0, 1)]], [[(0, 10)]]) == pytest.approx(25.0)


# TAL, four samples; iou[g][p] and the E.T.Bench per-sample F1 at m = 0.1 / 0.3 / 0.5 / 0.7:
#   A: gts (0,10), (20,30); preds (0,10), (40,50), (21,29)
#      iou g0: [1, 0, 0]; g1: [0, 0, 8/10 = 0.8]; best per gt [1, 0.8], per pred [1, 0, 0.8]
#      every m: recall 2/2 = 1, precision 2/3 -> F1 = 2 * (2/3) / (5/3) = 0.8
#   B: gt (0,10); preds (0,4), (6,10): both 0.4. Coverage, not one-to-one: both preds count.
#      m 0.1, 0.3: recall 1, precision 2/2 -> 1;  m 0.5, 0.7: max 0.4 < m -> 0
#   C: no prediction -> 0 at every m
#   D: gts (0,10), (10,20); pred (0,20): 10/20 = 0.5 each
#      m 0.1, 0.3, 0.5 (inclusive): recall 1, precision 1 -> 1;  m 0.7 -> 0
# F1@0.1 = (0.8 + 1 + 0 + 1) / 4 = 0.7;  F1@0.3 = 0.7;  F1@0.5 = (0.8 + 0 + 0 + 1) / 4 = 0.45;
# F1@0.7 = 0.8 / 4 = 0.2;  mean = (0.7 + 0.7 + 0.45 + 0.2) / 4 = 0.5125
TAL_PREDS = [[(0, 10), (40, 50), (21, 29)], [(0, 4), (6, 10)], [], [(0, 20)]]
TAL_GTS = [[(0, 10), (20, 30)], [(0, 10)], [(3, 5)], [(0, 10), (10, 20)]]


def test_tal_f1_hand_case():
    assert tal_f1(TAL_PREDS, TAL_GTS) == pytest.approx(51.25)
    assert tal_f1(TAL_PREDS, TAL_GTS, thresholds=(0.5,)) == pytest.approx(45.0)
    assert tal_f1(TAL_PREDS, TAL_GTS, thresholds=(0.7,)) == pytest.approx(20.0)


def etbench_tal_eval(predictions, ground_truths):
    """E.T.Bench `tal_eval` transcribed with numpy matrices (iou: [G, P])."""
    thresholds = [0.1, 0.3, 0.5, 0.7]
    f1 = [0.0] * len(thresholds)
    for preds, gts in zip(predictions, ground_truths):
        if not len(preds):
            continue
        g, p = np.asarray(gts, float), np.asarray(preds, float)
        inter = np.clip(np.minimum(g[:, None, 1], p[None, :, 1]) - np.maximum(g[:, None, 0], p[None, :, 0]), 0, None)
        union = (g[:, 1] - g[:, 0])[:, None] + (p[:, 1] - p[:, 0])[None] - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
        for i, thr in enumerate(thresholds):
            if iou.max() < thr:
                continue
            rec = (iou.max(1) >= thr).mean()
            prc = (iou.max(0) >= thr).mean()
            f1[i] += 2 * prc * rec / (prc + rec)
    return 100 * sum(f / len(predictions) for f in f1) / len(f1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tal_f1_matches_etbench_transcription(seed):
    rng = np.random.default_rng(seed)

    def windows(n):
        starts = rng.uniform(0, 50, n).round(1)
        return [(s, s + d) for s, d in zip(starts, rng.uniform(1, 20, n).round(1))]

    preds = [windows(rng.integers(0, 5)) for _ in range(30)]
    gts = [windows(rng.integers(1, 4)) for _ in range(30)]
    assert tal_f1(preds, gts) == pytest.approx(etbench_tal_eval(preds, gts), abs=1e-9)
    assert 0 < tal_f1(preds, gts) < 100


@pytest.mark.parametrize(
    "fn", [lambda p, g: recall_at_1(p, g, inclusive=True), mean_iou, grounding_metrics, etbench_tvg_f1, tal_f1]
)
def test_validation_names_the_sample(fn):
    with pytest.raises(ValueError, match="sample 1: empty ground-truth"):
        fn([[(0, 1)], [(0, 1)]], [[(0, 1)], []])
    with pytest.raises(ValueError, match="sample 2 has no counterpart"):
        fn([[(0, 1)], [(0, 1)], [(0, 1)]], [[(0, 1)], [(0, 1)]])
    with pytest.raises(ValueError, match="sample 1: window .* ends before it starts"):
        fn([[(0, 1)], [(3, 2)]], [[(0, 1)], [(0, 1)]])


def test_recall_requires_explicit_convention():
    with pytest.raises(TypeError):
        recall_at_1(PREDS, GTS)
