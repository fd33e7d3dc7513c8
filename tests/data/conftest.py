"""Shared fixtures: tiny real videos (see media.py) and a small synthetic set."""

import numpy as np
import pytest

from tests.data.media import SECONDS, VIDEO_SPECS, write_indexed_video


@pytest.fixture(scope="session")
def indexed_videos(tmp_path_factory):
    """{name: (path, fps)} for every spec in VIDEO_SPECS."""
    root = tmp_path_factory.mktemp("videos")
    videos = {}
    for name, codec, ext, fps, pix_fmt in VIDEO_SPECS:
        path = write_indexed_video(root / f"{name}.{ext}", codec, fps, int(round(SECONDS * fps)), pix_fmt)
        videos[name] = (path, fps)
    return videos


@pytest.fixture(scope="session")
def broken_videos(tmp_path_factory, indexed_videos):
    """{reason: path} of files that must not decode."""
    root = tmp_path_factory.mktemp("broken")
    good = open(indexed_videos["h264_30"][0], "rb").read()
    files = {
        "missing": root / "missing.mp4",
        "empty": root / "empty.mp4",
        "truncated": root / "truncated.mp4",
        "text": root / "text.mp4",
        "random_bytes": root / "random.mp4",
    }
    files["empty"].write_bytes(b"")
    # moov comes last in PyAV's mp4s, so cutting the file drops the index.
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["text"].write_text("this is not a video\n" * 50)
    files["random_bytes"].write_bytes(np.random.default_rng(0).bytes(4096))
    return {k: str(v) for k, v in files.items()}


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory):
    """A small synthetic set shared by the pipeline and tfds tests."""
    from jaxgrounding.data import synthetic  # pylint: disable=g-import-not-at-top

    config = synthetic.SyntheticConfig(splits=(("train", 12), ("val", 4)))
    root = tmp_path_factory.mktemp("synthetic")
    return root, synthetic.ensure_synthetic_dataset(root, config)
