"""TFDS builders: build a tiny set as ArrayRecord without TensorFlow, read it back."""

import sys

import grain
import numpy as np

from jaxgrounding.data import PipelineConfig, make_pipeline, read_video
from jaxgrounding.data import tfds as grounding_tfds


def test_tensorflow_is_not_needed():
    import tensorflow_datasets  # noqa: F401  (the import itself is under test)

    assert "tensorflow" not in sys.modules


def test_build_and_read_back_annotations(synthetic_small, tmp_path):
    root, splits = synthetic_small
    builder = grounding_tfds.build(
        "jsonl",
        {"train": "train.jsonl", "validation": "val.jsonl"},
        manual_dir=str(root),
        data_dir=str(tmp_path),
    )
    assert list((tmp_path).rglob("*.array_record*"))
    source = grounding_tfds.data_source(builder, "validation")
    assert len(source) == len(splits["val"])
    items = sorted((grounding_tfds.record_to_item(source[i]) for i in range(len(source))), key=lambda s: s.id)
    assert items == sorted(splits["val"], key=lambda s: s.id)
    # A tfds data source feeds the pipeline like a list of samples.
    ds = grain.MapDataset.source(source).map(grounding_tfds.record_to_item)
    batch = next(iter(make_pipeline(ds, PipelineConfig(batch_size=2, shard_index=0, shard_count=1))))
    assert batch["frames"].shape[0] == 2


def test_pre_extracted_frames(synthetic_small, tmp_path):
    root, splits = synthetic_small
    builder = grounding_tfds.build(
        "jsonl",
        {"validation": "val.jsonl"},
        manual_dir=str(root),
        data_dir=str(tmp_path),
        frames_fps=1.0,
        name_suffix="_frames",
    )
    source = grounding_tfds.data_source(builder, "validation")
    sample, video = grounding_tfds.record_to_item(source[0])
    direct = read_video(sample.video, fps=1.0)
    np.testing.assert_array_equal(video.frames, direct.frames)
    np.testing.assert_array_equal(video.timestamps, direct.timestamps)
    items = [grounding_tfds.record_to_item(source[i]) for i in range(len(source))]
    batch = next(iter(make_pipeline(items, PipelineConfig(batch_size=2, shard_index=0, shard_count=1))))
    assert batch["frames"].shape[0] == 2
