"""The synthetic set: idempotent, deterministic, decodable, and learnable only from frames."""

import dataclasses
import os

import numpy as np

from jaxgrounding.data import SyntheticConfig, ensure_synthetic_dataset, read_video
from jaxgrounding.data import synthetic_scenes as scenes


def _iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def test_samples_are_well_formed(synthetic_small):
    _, splits = synthetic_small
    assert set(splits) == {"train", "val"}
    for sample in splits["train"]:
        ((start, end),) = sample.windows
        assert 0 <= start < end <= sample.duration
        assert 20 <= sample.duration <= 60
        assert len(sample.captions) == 1 and sample.verbs and sample.query.strip()
        assert os.path.exists(sample.video)
    assert len({s.id for s in splits["train"]}) == len(splits["train"])


def test_idempotent_and_regenerates_on_config_change(tmp_path):
    config = SyntheticConfig(splits=(("train", 3),))
    first = ensure_synthetic_dataset(tmp_path, config)
    video = first["train"][0].video
    stamp = os.stat(video).st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path, config) == first
    assert os.stat(video).st_mtime_ns == stamp  # Not rewritten.
    changed = ensure_synthetic_dataset(tmp_path, dataclasses.replace(config, seed=1))
    assert changed != first
    assert os.stat(video).st_mtime_ns != stamp


def test_deterministic_for_a_seed(tmp_path):
    config = SyntheticConfig(splits=(("val", 3),), seed=7)
    a = ensure_synthetic_dataset(tmp_path / "a", config)["val"]
    b = ensure_synthetic_dataset(tmp_path / "b", config)["val"]
    assert [dataclasses.replace(s, video="") for s in a] == [dataclasses.replace(s, video="") for s in b]
    np.testing.assert_array_equal(read_video(a[0].video, fps=None).frames, read_video(b[0].video, fps=None).frames)


def test_events_are_visible_only_inside_their_windows(synthetic_small):
    """Each event changes the picture; outside all events nothing changes."""
    _, splits = synthetic_small
    by_video = {}
    for sample in splits["train"] + splits["val"]:
        by_video.setdefault(sample.video, []).append(sample.windows[0])
    for path, windows in by_video.items():
        video = read_video(path, fps=None)
        frames = video.frames.astype(np.int16)
        t = video.timestamps

        def changed(a, b):  # Pixels that differ by more than codec noise.
            return int((np.abs(a - b).max(-1) > 20).sum())

        inside = np.zeros(len(t) - 1, bool)  # Step k goes from frame k to frame k+1.
        for start, end in windows:
            in_window = np.nonzero((t >= start) & (t <= end))[0]
            first = frames[in_window[0]]
            assert max(changed(frames[k], first) for k in in_window) >= 20, (path, start)
            inside |= (t[1:] > start) & (t[:-1] < end)
        for k in np.nonzero(~inside)[0]:
            assert changed(frames[k + 1], frames[k]) == 0, (path, t[k])


def test_best_constant_window_scores_low(synthetic_small):
    """No fixed (start, end) fraction reaches R1@0.5 above 0.3: the frames are needed."""
    config = SyntheticConfig(splits=(("val", 300),))
    samples = []
    for index in range(300):
        rng = np.random.default_rng([config.seed, 1, index])
        scene = scenes.sample_scene(rng, config.scene)
        samples += [(e.start / scene.duration, e.end / scene.duration) for e in scene.events]
    grid = np.linspace(0, 1, 41)
    best = max(np.mean([_iou((s, e), w) >= 0.5 for w in samples]) for s in grid for e in grid if e > s)
    print(f"best constant-window R1@0.5 = {best:.3f} over {len(samples)} events")
    assert best < 0.3


def test_long_video_mode_renders_hundreds_of_frames():
    from jaxgrounding.data import synthetic  # pylint: disable=g-import-not-at-top

    config = synthetic.long_video_config()
    scene = scenes.sample_scene(np.random.default_rng(0), config.scene)
    assert scene.num_frames >= 300
    assert scenes.render(scene).shape == (scene.num_frames, 64, 64, 3)
