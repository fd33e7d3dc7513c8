"""One TFDS builder for every annotation format, writing ArrayRecord files.

``build(format, annotations, data_dir, ...)`` parses the split files with
``load_annotations`` (from ``manual_dir``) and writes ``file_format="array_record"``,
which tfds writes and reads without TensorFlow. With ``frames_fps`` set, frames are
decoded once at build time and stored in the records, so training never decodes video
(broken videos are dropped at build time and counted in the log). ``data_source``
opens a split as a random-access grain source; ``record_to_item`` turns a record back
into a ``Sample`` (or ``(Sample, Video)`` with frames) for ``make_pipeline``.
"""

import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from jaxgrounding.data import sources
from jaxgrounding.data import video as video_lib
from jaxgrounding.data.sample import Sample


class GroundingBuilder(tfds.core.GeneratorBasedBuilder):
    """Builder configured at construction: format, split files, optional frames.

    ``manual_dir`` holds the annotation files (``splits`` maps split name -> file name)
    and the videos (``video_root`` relative to it, default: the same folder).
    """

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Put the annotation files and videos in manual_dir."

    def __init__(
        self,
        *,
        source_format: str,
        splits: dict[str, str],
        name_suffix: str = "",
        video_root: str = "",
        frames_fps: float | None = None,
        max_frames: int | None = None,
        frame_size: tuple[int, int] | None = None,
        durations: str | None = None,
        **kwargs,
    ):
        self._format, self._splits = source_format, dict(splits)
        self._video_root, self._durations = video_root, durations
        self._frames = frames_fps is not None
        self._video_options = {"fps": frames_fps, "max_frames": max_frames, "size": frame_size}
        # Distinct datasets get distinct names so their files never mix in one data_dir.
        self.name = f"grounding_{source_format}{name_suffix}"
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "id": tfds.features.Text(),
            "video": tfds.features.Text(),
            "duration": np.float32,
            "query": tfds.features.Text(),
            "windows": tfds.features.Tensor(shape=(None, 2), dtype=np.float32),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "verbs": tfds.features.Sequence(tfds.features.Text()),
            "task": tfds.features.Text(),
            "response": tfds.features.Text(),
        }
        if self._frames:
            # Frame sizes vary between videos; tfds stores such tensors as (zlib) bytes.
            features["frames"] = tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="zlib")
            features["timestamps"] = tfds.features.Tensor(shape=(None,), dtype=np.float64)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {
            split: self._generate_examples(os.path.join(root, name), os.path.join(root, self._video_root))
            for split, name in self._splits.items()
        }

    def _generate_examples(self, path: str, video_root: str):
        durations = None
        if self._durations:
            durations = os.path.join(os.path.dirname(path), self._durations)
        samples = sources.load_annotations(path, self._format, video_root=video_root, durations=durations).samples
        skipped = 0
        for sample in tqdm.tqdm(samples, desc=f"tfds {os.path.basename(path)}", leave=False):
            example = {
                "id": sample.id,
                "video": sample.video,
                "duration": sample.duration,
                "query": sample.query,
                "windows": np.asarray(sample.windows, np.float32).reshape(-1, 2),
                "captions": list(sample.captions or ()),
                "verbs": list(sample.verbs or ()),
                "task": sample.task,
                "response": sample.response or "",
            }
            if self._frames:
                try:
                    video = video_lib.read_video(sample.video, **self._video_options)
                except video_lib.VideoDecodeError as e:
                    skipped += 1
                    logging.warning("tfds build: skipping %s", e)
                    continue
                example["frames"], example["timestamps"] = video.frames, video.timestamps
            yield sample.id, example
        if skipped:
            logging.warning("tfds build: %d undecodable videos skipped in %s", skipped, path)


def build(
    source_format: str,
    splits: dict[str, str],
    *,
    manual_dir: str,
    data_dir: str,
    **builder_kwargs: Any,
) -> GroundingBuilder:
    """Builds (or reuses) the dataset as ArrayRecord under ``data_dir``."""
    builder = GroundingBuilder(source_format=source_format, splits=splits, data_dir=data_dir, **builder_kwargs)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
    )
    return builder


def data_source(builder: GroundingBuilder, split: str):
    """Random-access source of decoded records (a grain-compatible data source)."""
    return builder.as_data_source(split=split)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def record_to_item(record: dict[str, Any]) -> Sample | tuple[Sample, video_lib.Video]:
    """A record back to a ``Sample``; with stored frames, to ``(Sample, Video)``."""
    captions = tuple(_text(c) for c in record["captions"])
    verbs = tuple(_text(v) for v in record["verbs"])
    sample = Sample(
        id=_text(record["id"]),
        video=_text(record["video"]),
        duration=float(record["duration"]),
        query=_text(record["query"]),
        windows=tuple((float(s), float(e)) for s, e in np.asarray(record["windows"])),
        captions=captions or None,
        verbs=verbs or None,
        task=_text(record["task"]),
        response=_text(record["response"]) or None,
    )
    if "frames" not in record:
        return sample
    timestamps = np.asarray(record["timestamps"], np.float64)
    return sample, video_lib.Video(
        frames=np.asarray(record["frames"]),
        timestamps=timestamps,
        duration=sample.duration,
        fps=None,
        backend="tfds",
    )
