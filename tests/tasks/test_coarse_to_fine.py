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
    assert c2f.reload_segments((7, 18), spans, capped)[1] and not c2f.reload_segments((7, 17), spans, cfg)[1]
    # With the coarse stage's confidence per segment, the cap keeps the most confident segments instead.
    scores = np.array([0.9, 0.1, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(c2f.segments_for_interval((7, 18), spans, capped, scores), [0, 2])
    ties = np.array([0.5, 0.5, 0.5, 0.0, 0.0])  # equal scores: nearest the centre first, as without scores
    np.testing.assert_array_equal(c2f.segments_for_interval((7, 18), spans, capped, ties), [1, 2])
    # An interval past the end still reloads the nearest segment.
    np.testing.assert_array_equal(c2f.segments_for_interval((40, 41), spans, cfg), [3])


def test_jitter_stays_near_the_window_inside_the_video():
    cfg = c2f.CoarseToFineConfig(jitter=0.5, margin=2.0, max_reload_segments=4, fine_fraction=0.5)
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = c2f.jitter_window((10.0, 20.0), 25.0, rng, cfg)
        assert 0.0 <= a < b <= 25.0
        assert 5.0 - 1e-9 <= a <= 15.0 + 1e-9 and 15.0 - 1e-9 <= b <= 25.0


def _example(window, grids=20, grid_seconds=2.0):
    return {
        "windows": np.array([window], np.float32),
        "grid_times": np.arange(grids) * grid_seconds,
        "grid_duration": np.float32(grid_seconds),
        "duration": np.float32(grids * grid_seconds),
    }


@pytest.mark.parametrize("fraction, fine", [(0.0, False), (1.0, True)])
def test_training_reloads_marks_segments_near_the_ground_truth(fraction, fine):
    cfg = c2f.CoarseToFineConfig(margin=0.0, fine_fraction=fraction, jitter=0.0, max_reload_segments=4)
    first = c2f.training_reloads(_example((10.0, 14.0)), 4, cfg, c2f.sample_rng(0, 3, "a"))
    second = c2f.training_reloads(_example((30.0, 34.0)), 4, cfg, c2f.sample_rng(0, 3, "b"))
    assert first.shape == second.shape == (5,)  # 20 grids, segments of 4
    assert first.any() == second.any() == fine
    if fine:
        # Jitter 0 leaves one second of slack: [9, 15] overlaps segments 1 ([8, 16]) only... and 0 ([0, 8])
        # only if the draw moves the start below 8, which a one-second slack cannot.
        assert first[1] and not first[0]
        assert second[3]  # [30, 34] lies in segment 3 ([24, 32]) and 4 ([32, 40])
    no_window = dict(_example((0.0, 1.0)), windows=np.zeros((0, 2), np.float32))
    assert not c2f.training_reloads(no_window, 4, cfg, c2f.sample_rng(0, 3, "c")).any()


def test_training_reloads_are_a_function_of_seed_epoch_and_sample():
    """The draw of a sample depends on (seed, epoch, id) alone (so every process and data worker, and a resumed
    run, agree) and changes from epoch to epoch."""
    cfg = c2f.CoarseToFineConfig(margin=0.0, fine_fraction=0.5, jitter=1.0, max_reload_segments=4)
    example = _example((20.0, 26.0), grids=40, grid_seconds=1.0)

    def draw(seed, epoch, sample_id):
        return c2f.training_reloads(example, 2, cfg, c2f.sample_rng(seed, epoch, sample_id))

    np.testing.assert_array_equal(draw(1, 7, "y"), draw(1, 7, "y"))
    draws = [draw(1, e, "y") for e in range(12)]
    assert len({d.tobytes() for d in draws}) > 2  # fine or coarse, and where, change with the epoch


def test_segment_scores_take_each_segments_most_probable_frame():
    probabilities = np.array([0.1, 0.3, 0.05, 0.05, 0.4, 0.1])
    np.testing.assert_allclose(c2f.segment_scores(probabilities, 4, 3), [0.3, 0.4, 0.0])


def test_hvr_frames_pool_the_valid_grids_of_each_slot():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(2, 7, 3)).astype(np.float32)
    valid = np.array([[True] * 7, [True] * 5 + [False] * 2])
    times = np.tile(np.arange(7) * 2.0, (2, 1))
    pooled, slot_valid, slot_times, slot_duration = c2f.hvr_frames(states, valid, times, np.array([2.0, 2.0]), 2)
    assert pooled.shape == (2, 4, 3)
    np.testing.assert_array_equal(slot_valid, [[True] * 4, [True, True, True, False]])
    np.testing.assert_allclose(slot_times, [[0, 4, 8, 12]] * 2)
    np.testing.assert_allclose(slot_duration, [4.0, 4.0])
    for b in range(2):
        for s in range(4):
            grids = [f for f in (2 * s, 2 * s + 1) if f < 7 and valid[b, f]]
            if grids:
                np.testing.assert_allclose(pooled[b, s], states[b, grids].mean(axis=0), rtol=1e-6)
