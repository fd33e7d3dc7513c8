"""read_video: exact frames, true timestamps, sampling options, broken files."""

import numpy as np
import pytest

from jaxgrounding.data import VideoDecodeError, read_video
from jaxgrounding.data import video as video_lib
from jaxgrounding.data.resize import smart_resize
from tests.data.media import SECONDS, VIDEO_SPECS, frame_index

BACKENDS = ["decord", "pyav"]
NAMES = [spec[0] for spec in VIDEO_SPECS]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_frames_match_their_timestamps(indexed_videos, name, backend):
    path, native_fps = indexed_videos[name]
    video = read_video(path, fps=2.0, backend=backend)
    assert video.backend == backend
    assert video.frames.dtype == np.uint8 and video.frames.shape[1:] == (48, 64, 3)
    indices = [frame_index(f) for f in video.frames]
    # The content of each returned frame is the frame shown at its timestamp.
    np.testing.assert_allclose(indices, video.timestamps * native_fps, atol=1e-3)
    # And those frames are the ones nearest to the 2 fps grid (ties may go either way).
    targets = np.arange(len(indices)) / 2.0
    assert np.all(np.abs(np.array(indices) / native_fps - targets) <= 0.5 / native_fps + 1e-6)
    assert len(indices) == SECONDS * 2
    assert video.duration == pytest.approx(SECONDS, abs=1.5 / native_fps)


@pytest.mark.parametrize("name", ["h264_30", "vp9_24"])
def test_backends_agree(indexed_videos, name):
    path, _ = indexed_videos[name]
    a = read_video(path, fps=3.0, backend="decord")
    b = read_video(path, fps=3.0, backend="pyav")
    np.testing.assert_array_equal(a.timestamps, b.timestamps)
    np.testing.assert_array_equal([frame_index(f) for f in a.frames], [frame_index(f) for f in b.frames])


def test_fps_above_native_returns_each_frame_once(indexed_videos):
    path, native_fps = indexed_videos["h264_mkv_25"]
    video = read_video(path, fps=100.0)
    assert len(video.frames) == SECONDS * native_fps
    assert np.all(np.diff(video.timestamps) > 0)


def test_all_frames_when_fps_is_none(indexed_videos):
    path, _ = indexed_videos["mjpeg_60"]
    video = read_video(path, fps=None)
    assert [frame_index(f) for f in video.frames] == list(range(180))


def test_max_frames_subsamples_uniformly_with_true_timestamps(indexed_videos):
    path, native_fps = indexed_videos["h264_30"]
    video = read_video(path, fps=10.0, max_frames=7)
    assert len(video.frames) == 7
    assert video.timestamps[0] == 0.0 and video.timestamps[-1] == pytest.approx(2.9)
    np.testing.assert_allclose([frame_index(f) for f in video.frames], video.timestamps * native_fps, atol=1e-3)


def test_even_frames(indexed_videos):
    path, _ = indexed_videos["h264_30"]
    odd = read_video(path, fps=2.0, clip=(0.0, 2.0))  # 0, 0.5, ..., 2.0: 5 frames
    assert len(odd.frames) == 5
    even = read_video(path, fps=2.0, clip=(0.0, 2.0), even_frames=True)
    assert len(even.frames) == 4
    np.testing.assert_array_equal(even.timestamps, odd.timestamps[:4])


def test_clip_reads_only_the_window(indexed_videos):
    path, native_fps = indexed_videos["h264_2997"]
    video = read_video(path, fps=4.0, clip=(1.0, 2.0), backend="pyav")
    assert video.timestamps[0] == pytest.approx(1.0, abs=0.5 / native_fps)
    assert video.timestamps[-1] <= 2.0 + 0.5 / native_fps
    assert len(video.frames) == 5
    np.testing.assert_allclose([frame_index(f) for f in video.frames], video.timestamps * native_fps, atol=1e-3)


def test_size_and_pixel_budget(indexed_videos):
    path, _ = indexed_videos["h264_30"]
    assert read_video(path, size=(32, 40)).frames.shape[1:3] == (32, 40)
    budget = read_video(path, min_pixels=56 * 56, max_pixels=100 * 28 * 28)
    assert budget.frames.shape[1:3] == smart_resize(48, 64, min_pixels=56 * 56)
    assert budget.frames.shape[1] % 28 == 0 and budget.frames.shape[2] % 28 == 0


def test_smart_resize_matches_hand_computed_cases():
    # 360x640: 12.86 -> 13 * 28, 22.86 -> 23 * 28, inside the budget.
    assert smart_resize(360, 640) == (364, 644)
    # 1080x1920 over 768*28*28: beta = sqrt(1080*1920/602112) = 1.8558;
    # floor(1080/1.8558/28) = 20, floor(1920/1.8558/28) = 36.
    assert smart_resize(1080, 1920, max_pixels=768 * 28 * 28) == (560, 1008)
    # 20x30 under 56*56: beta = sqrt(3136/600) = 2.286; ceil(1.63) = 2, ceil(2.45) = 3.
    assert smart_resize(20, 30) == (56, 84)
    with pytest.raises(ValueError):
        smart_resize(10, 5000)


def test_sample_indices_nearest_frame_and_ties():
    times = np.arange(10) * 0.4  # 2.5 fps
    # Targets 0, 1, 2, 3 s; 1.0 is nearest 1.2? no: 0.8 (0.2) vs 1.2 (0.2) tie -> earlier.
    np.testing.assert_array_equal(video_lib.sample_indices(times, fps=1.0), [0, 2, 5, 7])


@pytest.mark.parametrize("reason", ["missing", "empty", "truncated", "text", "random_bytes"])
@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_broken_files_raise_video_decode_error(broken_videos, reason, backend):
    path = broken_videos[reason]
    with pytest.raises(VideoDecodeError) as info:
        read_video(path, backend=backend)
    assert isinstance(info.value, ValueError)
    assert path in str(info.value) and info.value.path == path


def test_truncated_faststart_file_is_detected(tmp_path):
    """A file cut after a leading moov (its index promises frames it no longer holds): no hang, no crash,
    and not read as a shorter video."""
    from tests.data.media import write_indexed_video  # pylint: disable=g-import-not-at-top
    import av  # pylint: disable=g-import-not-at-top

    src = write_indexed_video(tmp_path / "a.mp4", "libx264", 30, 90)
    fast = tmp_path / "fast.mp4"
    with av.open(src) as inp, av.open(str(fast), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    data = fast.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(VideoDecodeError, match=r"truncated: its frames cover .* of the 3.00 s") as info:
        read_video(cut, fps=None)
    assert str(cut) in str(info.value)
