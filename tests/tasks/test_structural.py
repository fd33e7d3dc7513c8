"""MeCo structural tokens: target texts, token windows, frame targets and inference windows, all hand-computed."""

import math

import numpy as np
import pytest

from jaxgrounding.tasks.structural import (
    ENT,
    TST,
    GroundedWindow,
    StructuralToken,
    assign_windows,
    sanitize_windows,
    structural_response,
    token_frame_targets,
)


def ent(start, end):
    return StructuralToken("ent", (start, end))


def tst(start, end):
    return StructuralToken("tst", (start, end))


def test_token_strings_match_the_tokenizer():
    from jaxgrounding.model.tokenizer import STRUCTURAL_TOKENS

    assert (ENT, TST) == STRUCTURAL_TOKENS


# ---------------------------------------------------------------- targets


def test_one_event_mid_video():
    text, tokens = structural_response([(10.0, 20.0)], ["a man opens the door"], 30.0)
    assert text == "<tst>\na man opens the door<ent>\n<tst>"
    assert tokens == [tst(0.0, 10.0), ent(10.0, 20.0), tst(20.0, 30.0)]


@pytest.mark.parametrize("start", [0.0, 0.5])
def test_event_starting_within_a_second_has_no_leading_transition(start):
    text, tokens = structural_response([(start, 5.0)], ["c"], 30.0)
    assert text == "c<ent>\n<tst>"
    assert tokens == [ent(start, 5.0), tst(5.0, 30.0)]


def test_leading_transition_from_exactly_one_second():
    text, tokens = structural_response([(1.0, 5.0)], ["c"], 30.0)
    assert text == "<tst>\nc<ent>\n<tst>"
    assert tokens[0] == tst(0.0, 1.0)


@pytest.mark.parametrize("end", [30.0, 28.5])
def test_event_ending_within_two_seconds_of_the_end_has_no_trailing_transition(end):
    text, tokens = structural_response([(10.0, end)], ["c"], 30.0)
    assert text == "<tst>\nc<ent>"
    assert tokens == [tst(0.0, 10.0), ent(10.0, end)]


def test_trailing_transition_from_exactly_two_seconds_before_the_end():
    text, tokens = structural_response([(10.0, 28.0)], ["c"], 30.0)
    assert text == "<tst>\nc<ent>\n<tst>"
    assert tokens[-1] == tst(28.0, 30.0)


def test_two_events_with_a_two_second_gap_get_a_transition_between():
    text, tokens = structural_response([(5.0, 10.0), (12.0, 20.0)], ["c1", "c2"], 30.0)
    assert text == "<tst>\nc1<ent>\n<tst>\nc2<ent>\n<tst>"
    assert tokens == [tst(0.0, 5.0), ent(5.0, 10.0), tst(10.0, 12.0), ent(12.0, 20.0), tst(20.0, 30.0)]


def test_two_events_closer_than_two_seconds_are_consecutive():
    text, tokens = structural_response([(5.0, 10.0), (11.5, 20.0)], ["c1", "c2"], 30.0)
    assert text == "<tst>\nc1<ent>\nc2<ent>\n<tst>"
    assert tokens == [tst(0.0, 5.0), ent(5.0, 10.0), ent(11.5, 20.0), tst(20.0, 30.0)]


def test_reversed_and_out_of_range_windows_are_sanitised_and_captions_follow_their_windows():
    # (25, 12) is swapped, (-3, 4) clamped to (0, 4); sorting puts "first" first.
    text, tokens = structural_response([(25.0, 12.0), (-3.0, 4.0)], ["second", "first"], 30.0)
    assert text == "first<ent>\n<tst>\nsecond<ent>\n<tst>"
    assert tokens == [ent(0.0, 4.0), tst(4.0, 12.0), ent(12.0, 25.0), tst(25.0, 30.0)]


def test_window_past_the_end_is_swapped_and_clamped():
    text, tokens = structural_response([(50.0, 35.0)], [" c "], 40.0)
    assert text == "<tst>\nc<ent>"
    assert tokens == [tst(0.0, 35.0), ent(35.0, 40.0)]


def test_sanitize_windows_widens_points_inside_the_video():
    windows = [(10.0, 10.0), (40.0, 45.0), (-2.0, -1.0), (3.0, 1.0)]
    # (10, 10) -> centred 1 s; (40, 45) -> clamped to the point 40 -> widened back inside to (39, 40);
    # (-2, -1) -> the point 0 -> (0, 1); (3, 1) -> swapped.
    assert sanitize_windows(windows, 40.0, 1.0) == [(0.0, 1.0), (1.0, 3.0), (9.5, 10.5), (39.0, 40.0)]
    # A video shorter than the minimum length becomes one whole-video window.
    assert sanitize_windows([(0.2, 0.3)], 0.5, 1.0) == [(0.0, 0.5)]
    with pytest.raises(ValueError):
        sanitize_windows([(0.0, 1.0)], 0.0, 1.0)


def test_no_captions_gives_bare_tokens():
    text, tokens = structural_response([(10.0, 20.0)], None, 30.0)
    assert text == "<tst>\n<ent>\n<tst>"
    assert [t.kind for t in tokens] == ["tst", "ent", "tst"]


def test_overlapping_events_measure_gaps_from_the_furthest_end():
    # The second window is inside the first: no transition can lie between or inside them.
    text, tokens = structural_response([(0.0, 20.0), (5.0, 10.0)], ["a", "b"], 30.0)
    assert text == "a<ent>\nb<ent>\n<tst>"
    assert tokens == [ent(0.0, 20.0), ent(5.0, 10.0), tst(20.0, 30.0)]


def test_structural_response_rejects_bad_input():
    with pytest.raises(ValueError):
        structural_response([], None, 30.0)
    with pytest.raises(ValueError):
        structural_response([(1.0, 2.0)], ["a", "b"], 30.0)


# ---------------------------------------------------------------- frame targets


def test_frame_targets_share_boundary_frames():
    # 1 fps, 30 frames: transitions [0, 10] and [20, 30] share frames 10 and 20 with the event [10, 20].
    _, tokens = structural_response([(10.0, 20.0)], ["c"], 30.0)
    targets_kf = token_frame_targets(tokens, np.arange(30.0), 1.0)
    assert targets_kf.dtype == np.float32 and targets_kf.shape == (3, 30)
    expected = np.zeros((3, 30), np.float32)
    expected[0, 0:11] = 1 / 11
    expected[1, 10:21] = 1 / 11
    expected[2, 20:30] = 1 / 10
    np.testing.assert_allclose(targets_kf, expected, rtol=1e-6)


def test_frame_targets_on_a_hand_made_grid():
    frame_times = np.arange(6.0)  # frames [0,1), [1,2), ..., [5,6)
    tokens = [tst(0.0, 1.0), ent(1.0, 3.0), ent(2.5, 2.7), tst(5.0, 6.0)]
    targets_kf = token_frame_targets(tokens, frame_times, 1.0)
    expected = np.array(
        [
            [0.5, 0.5, 0, 0, 0, 0],  # frame 1 starts at the window's end: counts
            [0, 1 / 3, 1 / 3, 1 / 3, 0, 0],  # frame 0 ends where the window starts: does not
            [0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        np.float32,
    )
    np.testing.assert_allclose(targets_kf, expected, rtol=1e-6)
    np.testing.assert_allclose(targets_kf.sum(axis=1), 1.0, rtol=1e-6)


def test_window_between_frames_goes_to_the_nearest_frame():
    frame_times = np.array([0.0, 2.0, 4.0])  # sparse: [0,1), [2,3), [4,5)
    tokens = [ent(1.2, 1.6), ent(3.5, 3.9), tst(5.5, 7.0), ent(1.25, 1.75)]
    targets_kf = token_frame_targets(tokens, frame_times, 1.0)
    # Gaps: (1.2, 1.6) is 0.2 s from frame 0 and 0.4 s from frame 1; (3.5, 3.9) is 0.1 s from
    # frame 2; (5.5, 7) lies past the last frame; (1.25, 1.75) is 0.25 s from both -> earlier.
    np.testing.assert_array_equal(targets_kf, np.array([[1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]], np.float32))


def test_frame_targets_tolerate_float_frame_times():
    frame_times = np.arange(10) * 0.1  # 0.1 * 3 == 0.30000000000000004
    targets_kf = token_frame_targets([ent(0.3, 0.5)], frame_times, 0.1)
    np.testing.assert_allclose(targets_kf[0], [0, 0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0, 0], rtol=1e-6)


def test_frame_targets_without_tokens():
    assert token_frame_targets([], np.arange(4.0), 1.0).shape == (0, 4)


# ---------------------------------------------------------------- inference


def blocks(num_frames, *rows):
    """[K, F] logits: row k is `value` on its frames and 0 elsewhere; rows are (frames, value)."""
    similarity_kf = np.zeros((len(rows), num_frames))
    for k, (frames, value) in enumerate(rows):
        similarity_kf[k, list(frames)] = value
    return similarity_kf


def windows_of(result):
    return [(w.start, w.end, w.token_index) for w in result]


def test_single_clean_event():
    similarity_kf = blocks(10, (range(0, 3), 10.0), (range(3, 7), 10.0), (range(7, 10), 10.0))
    kinds = ["tst", "ent", "tst"]
    frame_times = np.arange(10.0)
    # The event token owns frames 3..6; dilation by one frame gives 2..7 -> [2 s, 7 s + 1 s].
    result = assign_windows(similarity_kf, kinds, frame_times, 1.0, 10.0)
    assert windows_of(result) == [(2.0, 8.0, 1)]
    # Softmax over time of the event row: e^10 on 4 frames, e^0 on 6.
    assert result[0].score == pytest.approx(math.exp(10) / (4 * math.exp(10) + 6), rel=1e-9)
    assert windows_of(assign_windows(similarity_kf, kinds, frame_times, 1.0, 10.0, dilation=0)) == [(3.0, 7.0, 1)]


def test_allowed_frames_restrict_the_windows_without_renormalising():
    """The fine stage keeps frames 4..9 only. The leading <tst> owns frames 0..3 (outside); with
    full-video probabilities the event token still owns 4..6. Masking the logits instead would
    renormalise the <tst> row onto frames 4..9, where it would win frame 4 (the old bug)."""
    similarity_kf = blocks(10, (range(0, 4), 10.0), (range(4, 7), 6.0), (range(7, 10), 10.0))
    similarity_kf[0, 4] = 5.0  # the leading <tst> leans a little into the event's first frame
    kinds = ["tst", "ent", "tst"]
    allowed = np.arange(10) >= 4
    result = assign_windows(similarity_kf, kinds, np.arange(10.0), 1.0, 10.0, dilation=0, allowed=allowed)
    assert windows_of(result) == [(4.0, 7.0, 1)]
    masked = np.where(allowed[None], similarity_kf, -1e4)
    assert windows_of(assign_windows(masked, kinds, np.arange(10.0), 1.0, 10.0, dilation=0)) == [(5.0, 7.0, 1)]
    # Nothing allowed: nothing kept, the whole-video fallback.
    none = assign_windows(similarity_kf, kinds, np.arange(10.0), 1.0, 10.0, allowed=np.zeros(10, bool))
    assert windows_of(none) == [(0.0, 10.0, -1)]


def test_frames_are_assigned_by_softmax_over_time_not_over_tokens():
    # The transition row is flat at 5 (p = 1/10 everywhere); the event row is 3 on frame 4 only
    # (p = e^3 / (e^3 + 9) = 0.69 there). Over tokens the transition would win frame 4 (5 > 3).
    similarity_kf = np.full((2, 10), 5.0)
    similarity_kf[1] = 0.0
    similarity_kf[1, 4] = 3.0
    result = assign_windows(similarity_kf, ["tst", "ent"], np.arange(10.0), 1.0, 10.0, dilation=0)
    assert windows_of(result) == [(4.0, 5.0, 1)]
    assert result[0].score == pytest.approx(math.exp(3) / (math.exp(3) + 9))


def test_two_event_tokens_ranked_by_score():
    # The second event row peaks higher (6 on frame 8) so its window ranks first.
    similarity_kf = blocks(
        12, (range(0, 2), 10.0), (range(2, 5), 5.0), (range(5, 7), 10.0), ((), 0.0), (range(10, 12), 10.0)
    )
    similarity_kf[3, 7:10] = [5.0, 6.0, 5.0]
    kinds = ["tst", "ent", "tst", "ent", "tst"]
    result = assign_windows(similarity_kf, kinds, np.arange(12.0), 1.0, 12.0, dilation=0)
    assert windows_of(result) == [(7.0, 10.0, 3), (2.0, 5.0, 1)]
    e = math.exp
    assert result[0].score == pytest.approx(e(6) / (2 * e(5) + e(6) + 9))
    assert result[1].score == pytest.approx(e(5) / (3 * e(5) + 9))


def test_threshold_on_the_rescaled_similarity():
    similarity_kf = blocks(10, (range(0, 2), 10.0), ((), 0.0), (range(7, 10), 10.0))
    similarity_kf[1] = [0, 0, 2, 4, 8, 10, 6, 0, 0, 0]  # rescaled: 0 0 .2 .4 .8 1 .6 0 0 0
    kinds = ["tst", "ent", "tst"]

    def window(threshold):
        result = assign_windows(similarity_kf, kinds, np.arange(10.0), 1.0, 10.0, threshold=threshold, dilation=0)
        return windows_of(result)

    assert window(0.7) == [(4.0, 6.0, 1)]
    assert window(0.5) == [(4.0, 7.0, 1)]
    # Without a threshold the event keeps every frame it owns (2..6; the transitions own the rest).
    assert window(None) == [(2.0, 7.0, 1)]
    # Nothing exceeds 1.0: the whole-video fallback.
    assert assign_windows(similarity_kf, kinds, np.arange(10.0), 1.0, 10.0, threshold=1.0) == [
        GroundedWindow(0.0, 10.0, 0.0, -1)
    ]


def test_gaps_split_an_event_token_into_runs():
    similarity_kf = blocks(10, ({1, 2, 6, 7, 8}, 10.0), ({0, 3, 4, 5, 9}, 10.0))
    kinds = ["ent", "tst"]
    frame_times = np.arange(10.0)
    # Equal scores: the earlier run first.
    assert windows_of(assign_windows(similarity_kf, kinds, frame_times, 1.0, 10.0, dilation=0)) == [
        (1.0, 3.0, 0),
        (6.0, 9.0, 0),
    ]
    # Dilated by one frame the runs are still 1 frame apart (frame 4).
    assert windows_of(assign_windows(similarity_kf, kinds, frame_times, 1.0, 10.0, dilation=1)) == [
        (0.0, 4.0, 0),
        (5.0, 10.0, 0),
    ]


def test_dilation_before_splitting_merges_runs_two_frames_apart():
    similarity_kf = blocks(10, ({1, 2, 5, 6}, 10.0), ({0, 3, 4, 7, 8, 9}, 10.0))
    kinds = ["ent", "tst"]
    frame_times = np.arange(10.0)
    assert windows_of(assign_windows(similarity_kf, kinds, frame_times, 1.0, 10.0, dilation=0)) == [
        (1.0, 3.0, 0),
        (5.0, 7.0, 0),
    ]
    assert windows_of(assign_windows(similarity_kf, kinds, frame_times, 1.0, 10.0, dilation=1)) == [(0.0, 8.0, 0)]


def test_dilation_is_clipped_at_the_video_edges():
    similarity_kf = blocks(10, ({0, 1, 8, 9}, 10.0), (range(2, 8), 10.0))
    # Dilating by 2 would reach frames -2 and 11; the last frame ends at 10 s but the video at 9.5 s.
    result = assign_windows(similarity_kf, ["ent", "tst"], np.arange(10.0), 1.0, 9.5, dilation=2)
    assert windows_of(result) == [(0.0, 4.0, 0), (6.0, 9.5, 0)]


def test_nms_drops_windows_overlapping_a_better_one():
    # Event 0 owns frames 2..5 (p ~ 1/4), event 1 owns frame 6 (p ~ 1). Dilated: [1, 7] and [5, 8],
    # tIoU = 2 / (6 + 3 - 2) = 2/7.
    similarity_kf = blocks(10, (range(2, 6), 10.0), ({6}, 10.0), ({0, 1, 7, 8, 9}, 10.0))
    kinds = ["ent", "ent", "tst"]

    def run(nms_iou):
        return windows_of(assign_windows(similarity_kf, kinds, np.arange(10.0), 1.0, 10.0, nms_iou=nms_iou))

    assert run(0.7) == [(5.0, 8.0, 1), (1.0, 7.0, 0)]
    assert run(2 / 7) == [(5.0, 8.0, 1)]  # tIoU >= nms_iou is suppressed
    assert run(0.25) == [(5.0, 8.0, 1)]


def test_tied_event_tokens_both_own_the_frames_and_nms_keeps_the_first():
    similarity_kf = blocks(10, (range(3, 6), 10.0), (range(3, 6), 10.0), ({0, 1, 2, 6, 7, 8, 9}, 10.0))
    result = assign_windows(similarity_kf, ["ent", "ent", "tst"], np.arange(10.0), 1.0, 10.0, dilation=0)
    assert windows_of(result) == [(3.0, 6.0, 0)]


@pytest.mark.parametrize(
    "similarity_kf,kinds",
    [
        (np.zeros((0, 5)), []),  # nothing generated
        (np.ones((2, 5)), ["tst", "tst"]),  # no event token
        (np.ones((1, 5)), ["ent"]),  # a flat row: no frame above the threshold
    ],
)
def test_empty_output_falls_back_to_the_whole_video(similarity_kf, kinds):
    assert assign_windows(similarity_kf, kinds, np.arange(5.0), 1.0, 5.0) == [GroundedWindow(0.0, 5.0, 0.0, -1)]


def test_assign_windows_rejects_bad_input():
    with pytest.raises(ValueError):
        assign_windows(np.zeros((2, 5)), ["ent"], np.arange(5.0), 1.0, 5.0)
    with pytest.raises(ValueError):
        assign_windows(np.zeros((1, 5)), ["<ent>"], np.arange(5.0), 1.0, 5.0)
    with pytest.raises(ValueError):
        assign_windows(np.zeros((1, 5)), ["ent"], np.arange(5.0), 1.0, 5.0, dilation=-1)
