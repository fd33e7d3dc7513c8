"""The shuffled-video control of answer evaluation: which video each question is asked over, and its figures."""

import pytest

from jaxgrounding.data.sample import Sample
from jaxgrounding.evaluation import shuffled_video_metrics, video_swaps


def _sample(id_, video, duration, window=(1.0, 3.0)):
    return Sample(id=id_, video=video, duration=duration, query=f"q {id_}", windows=(window,))


def test_swaps_pass_each_video_to_the_next_of_its_length():
    samples = [
        _sample("a0", "a.mp4", 20.0),
        _sample("a1", "a.mp4", 20.0, (5.0, 9.0)),  # a second question about the same video
        _sample("b0", "b.mp4", 20.2),
        _sample("c0", "c.mp4", 19.8),
        _sample("d0", "d.mp4", 31.0),  # alone at its length: no swap
    ]
    swaps = video_swaps(samples)
    assert set(swaps) == {"a0", "a1", "b0", "c0"}
    assert [swaps[i].video for i in ("a0", "a1", "b0", "c0")] == ["b.mp4", "b.mp4", "c.mp4", "a.mp4"]
    # The question and its true windows stay; the length is the shown video's (its windows clipped to it).
    assert swaps["a1"].query == "q a1" and swaps["a1"].windows == ((5.0, 9.0),)
    assert swaps["a0"].duration == 20.2
    assert all(swaps[s.id].video != s.video for s in samples if s.id in swaps)


def test_swapped_windows_are_clipped_to_the_shown_video():
    swaps = video_swaps([_sample("a", "a.mp4", 20.4, (18.0, 20.4)), _sample("b", "b.mp4", 20.0)])
    assert swaps["a"].windows == ((18.0, 20.0),)


def test_shuffled_video_metrics_by_hand():
    rows = [
        # Same answer over both videos, and right: a model that did not look.
        {"gt_windows": [[0.0, 10.0]], "pred_windows": [[0.0, 10.0]], "shuffled_video": {"pred_windows": [[0.0, 10.0]]}},
        # Moved to a wrong window (IoU 0).
        {"gt_windows": [[0.0, 10.0]], "pred_windows": [[0.0, 10.0]], "shuffled_video": {"pred_windows": [[20.0, 30.0]]}},
        # Unparsable over the other video: changed, scored 0.
        {"gt_windows": [[0.0, 10.0]], "pred_windows": [[0.0, 8.0]], "shuffled_video": {"pred_windows": []}},
        # No swap (alone at its length): not counted.
        {"gt_windows": [[0.0, 10.0]], "pred_windows": [[0.0, 10.0]]},
    ]
    found = shuffled_video_metrics(rows)
    assert found["shuffled_video_samples"] == 3
    assert found["answers_changed"] == pytest.approx(200 / 3)
    assert found["shuffled_video_R1@0.5"] == pytest.approx(100 / 3)
    assert found["shuffled_video_mIoU"] == pytest.approx(100 / 3)
    assert shuffled_video_metrics(rows[3:]) == {}
