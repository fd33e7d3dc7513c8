"""Segment selection for the fine stage and the temporal augmentation, on hand-computed cases."""

import numpy as np
import pytest

from jaxgrounding.tasks import coarse_to_fine as c2f


def test_segment_spans_cover_the_grids_and_mark_missing_segments():
    times = np.arange(10) * 2.0  # 10 grids of 2 s
    spans = c2f.segment_spans(times, 2.0, segment_frames=4, num_segments=4)
    np.testing.assert_allclose(spans[:3], [[0, 8], [8, 16], [16, 20]])
    assert np.isnan(spans[3]).all()


def test_segments_for_interval_adds_the_margin_and_keeps_the_nearest():
    spans = np.array([[0, 8], [8, 16], [16, 24], [24, 32], [np.nan, np.nan]])
    cfg = c2f.CoarseToFineConfig(margin=0.0, max_reload_segments=4, fine_fraction=0.5, jitter=0.5)
    np.testing.assert_array_equal(c2f.segments_for_interval((9, 15), spans, cfg), [1])
    np.testing.assert_array_equal(c2f.segments_for_interval((7, 17), spans, cfg), [0, 1, 2])
    wide = c2f.CoarseToFineConfig(margin=2.0, max_reload_segments=4, fine_fraction=0.5, jitter=0.5)
    np.testing.assert_array_equal(c2f.segments_for_interval((9, 15), spans, wide), [0, 1, 2])
    # Capped at two: the two segments whose centres are nearest the interval's centre (12.5).
    capped = c2f.CoarseToFineConfig(margin=0.0, max_reload_segments=2, fine_fraction=0.5, jitter=0.5)
    np.testing.assert_array_equal(c2f.segments_for_interval((7, 18), spans, capped), [1, 2])
    # An interval past the end still reloads the nearest segment.
    np.testing.assert_array_equal(c2f.segments_for_interval((40, 41), spans, cfg), [3])


def test_jitter_stays_near_the_window_inside_the_video():
    cfg = c2f.CoarseToFineConfig(jitter=0.5, margin=2.0, max_reload_segments=4, fine_fraction=0.5)
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = c2f.jitter_window((10.0, 20.0), 25.0, rng, cfg)
        assert 0.0 <= a < b <= 25.0
        assert 5.0 - 1e-9 <= a <= 15.0 + 1e-9 and 15.0 - 1e-9 <= b <= 25.0


@pytest.mark.parametrize("fraction, expected_rows", [(0.0, 0), (1.0, 2)])
def test_training_reloads_marks_segments_near_the_ground_truth(fraction, expected_rows):
    batch = {
        "valid": np.array([True, True, False]),
        "windows": np.array([[[10.0, 14.0]], [[30.0, 34.0]], [[0.0, 1.0]]]),
        "windows_mask": np.ones((3, 1), bool),
        "grid_times": np.tile(np.arange(20) * 2.0, (3, 1)),
        "grid_times_mask": np.ones((3, 20), bool),
        "grid_duration": np.full(3, 2.0),
        "duration": np.full(3, 40.0),
        "id": np.array(["a", "b", ""]),
    }
    cfg = c2f.CoarseToFineConfig(margin=0.0, fine_fraction=fraction, jitter=0.0, max_reload_segments=4)
    reloaded = c2f.training_reloads(batch, segment_frames=4, num_segments=5, config=cfg, seed=0, step=3)
    assert reloaded.shape == (3, 5)
    assert reloaded.any(axis=1).sum() == expected_rows
    assert not reloaded[2].any()  # padding rows never reload
    if expected_rows:
        # Jitter 0 leaves one second of slack: [9, 15] overlaps segments 1 ([8, 16]) only... and 0 ([0, 8])
        # only if the draw moves the start below 8, which a one-second slack cannot.
        assert reloaded[0, 1] and not reloaded[0, 0]
        assert reloaded[1, 3]  # [30, 34] lies in segment 3 ([24, 32]) and 4 ([32, 40])


def test_training_reloads_depend_on_the_sample_not_its_batch():
    """A sample draws the same whether it sits alone or in a batch with others (so processes that each hold part of
    a global batch agree with one process holding all of it), and differently at another step."""

    def batch(ids, windows):
        n = len(ids)
        return {
            "valid": np.ones(n, bool),
            "windows": np.asarray(windows, float).reshape(n, 1, 2),
            "windows_mask": np.ones((n, 1), bool),
            "grid_times": np.tile(np.arange(40) * 1.0, (n, 1)),
            "grid_duration": np.full(n, 1.0),
            "duration": np.full(n, 40.0),
            "id": np.asarray(ids),
        }

    cfg = c2f.CoarseToFineConfig(margin=0.0, fine_fraction=0.5, jitter=1.0, max_reload_segments=4)
    both = c2f.training_reloads(batch(["x", "y"], [[5, 9], [20, 26]]), 2, 20, cfg, seed=1, step=7)
    alone = c2f.training_reloads(batch(["y"], [[20, 26]]), 2, 20, cfg, seed=1, step=7)
    np.testing.assert_array_equal(both[1], alone[0])
    draws = [c2f.training_reloads(batch(["y"], [[20, 26]]), 2, 20, cfg, seed=1, step=s)[0] for s in range(12)]
    assert len({d.tobytes() for d in draws}) > 2  # fine or coarse, and where, change with the step
