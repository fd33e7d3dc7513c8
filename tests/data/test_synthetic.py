"""The synthetic set: idempotent, deterministic, decodable, and learnable only from frames."""

import dataclasses
import json
import os

import numpy as np
import pytest

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


def _windows_by_video(splits):
    by_video = {}
    for sample in splits["train"] + splits["val"]:
        by_video.setdefault(sample.video, []).append(sample.windows[0])
    return by_video


def _changed(a, b):
    """Pixels that differ by more than codec noise."""
    return int((np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1) > 20).sum())


def test_transient_events_are_visible_on_every_frame_of_their_windows(synthetic_small):
    """The default (transient) set: all frames outside the windows show the same resting scene,
    and every frame inside a window differs from it on its own, with no need to compare frames
    across time."""
    _, splits = synthetic_small
    for path, windows in _windows_by_video(splits).items():
        video = read_video(path, fps=None)
        frames, t = video.frames, video.timestamps
        inside = np.zeros(len(t), bool)
        for start, end in windows:
            inside |= (t >= start - 1e-6) & (t <= end + 1e-6)
        assert (~inside).any(), path
        rest = frames[np.flatnonzero(~inside)[0]]
        for k in np.flatnonzero(~inside):
            assert _changed(frames[k], rest) <= 8, (path, t[k])  # Codec noise only.
        for k in np.flatnonzero(inside):
            assert _changed(frames[k], rest) >= 20, (path, t[k])


def test_transient_text_says_the_object_returns():
    """Transient queries ask for a state ("bigger"), captions end with the return to rest."""
    rng = np.random.default_rng(0)
    cfg = scenes.SceneConfig()
    for _ in range(30):
        scene = scenes.sample_scene(rng, cfg)
        for event in scene.events:
            text = scenes.describe(scene, event, rng, cfg.task_phrasing)
            obj = scene.objects[event.obj]
            assert f"{obj.colour} {obj.shape}" in text.query and f"{obj.colour} {obj.shape}" in text.caption
            assert "then" in text.caption, text.caption


def test_event_kinds_restricts_the_events():
    cfg = scenes.SceneConfig(event_kinds=["grow", "appear"])  # A list, as from a JSON config.
    assert cfg.event_kinds == ("grow", "appear")
    rng = np.random.default_rng(0)
    kinds = {e.kind for _ in range(30) for e in scenes.sample_scene(rng, cfg).events}
    assert kinds == {"grow", "appear"}
    with pytest.raises(ValueError):
        scenes.SceneConfig(event_kinds=("spin",))  # Circles cannot spin.
    with pytest.raises(ValueError):
        scenes.SceneConfig(event_kinds=("explode",))
    with pytest.raises(ValueError):
        scenes.SceneConfig(grid=1, max_objects=2)  # Objects need distinct cells.


def test_manifest_records_the_scene_and_a_scene_change_regenerates(tmp_path):
    config = SyntheticConfig(splits=(("train", 2),))
    first = ensure_synthetic_dataset(tmp_path, config)
    with open(tmp_path / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["config"]["scene"] == json.loads(json.dumps(dataclasses.asdict(config.scene)))
    assert manifest["config"]["scene"]["task_phrasing"] == 0.5
    stamp = os.stat(first["train"][0].video).st_mtime_ns

    changed = dataclasses.replace(config, scene=dataclasses.replace(config.scene, task_phrasing=1.0))
    second = ensure_synthetic_dataset(tmp_path, changed)
    assert [s.query for s in second["train"]] != [s.query for s in first["train"]]
    assert os.stat(second["train"][0].video).st_mtime_ns != stamp
    with open(tmp_path / "manifest.json") as f:
        assert json.load(f)["config"]["scene"]["task_phrasing"] == 1.0


def test_manifest_from_an_older_generator_regenerates(tmp_path):
    """A set written before a scene knob existed has no such key in its manifest: it must not
    be taken for the current default."""
    config = SyntheticConfig(splits=(("train", 2),))
    first = ensure_synthetic_dataset(tmp_path, config)
    path = tmp_path / "manifest.json"
    with open(path) as f:
        manifest = json.load(f)
    del manifest["config"]["scene"]["clock"]
    manifest["config"]["version"] -= 1
    with open(path, "w") as f:
        json.dump(manifest, f)
    stamp = os.stat(first["train"][0].video).st_mtime_ns
    assert ensure_synthetic_dataset(tmp_path, config) == first
    assert os.stat(first["train"][0].video).st_mtime_ns != stamp
    with open(path) as f:
        assert json.load(f)["config"] == json.loads(json.dumps(config.to_json()))


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


def test_query_phrasing_names_the_template_family_that_wrote_a_query():
    from jaxgrounding.data import synthetic_scenes as scenes

    fields = {"obj": "red square", "direction": "left", "new_colour": "blue", "colour": "red"}
    for kind in scenes.EVENT_KINDS:
        assert scenes.query_phrasing(scenes._EXPLICIT[kind].format(**fields)) == "explicit"
        assert scenes.query_phrasing(scenes._TASK[kind].format(**fields)) == "task_oriented"
    assert scenes.query_phrasing("a person opens the door.") is None
    assert scenes.query_phrasing("when is the red square bigger? and more") is None


def test_clock_burns_each_frames_second_in_binary():
    cfg = scenes.SceneConfig(clock=True, min_duration=40.0, max_duration=40.0, size=56)
    scene = scenes.sample_scene(np.random.default_rng(0), cfg)
    frames = scenes.render(scene)
    block = 56 // scenes.TIMECODE_BITS
    strip = frames[:, -3, block // 2 :: block].mean(axis=-1)  # one pixel row through the middle of every block
    assert set(np.unique(strip)) == {0.0, 255.0}
    read = (strip > 127).astype(int) @ (1 << np.arange(scenes.TIMECODE_BITS))
    assert read.tolist() == list(range(scene.num_frames))
    # Without the clock the strip shows the scene.
    plain = scenes.render(dataclasses.replace(scene, clock=False))
    assert not np.array_equal(plain[:, -3], frames[:, -3])
