"""Data layer: video decoding, annotations, the synthetic set and the grain pipeline.

read_video(path, fps, max_frames, ...) -> Video      (video.py)
load_annotations(path, format, ...) -> Annotations   (sources.py, sample.py)
ensure_synthetic_dataset(root, config) -> {split: [Sample]}   (synthetic.py)
make_pipeline(source, config, transform) -> grain.IterDataset (pipeline.py)
"""

from jaxgrounding.data.pipeline import DataFailureError, PipelineConfig, PipelineIterator, Transform, default_transform, make_pipeline
from jaxgrounding.data.sample import AnnotationError, LoadReport, Sample, Validation
from jaxgrounding.data.sources import FORMATS, Annotations, load_annotations
from jaxgrounding.data.synthetic import SyntheticConfig, ensure_synthetic_dataset, long_video_config
from jaxgrounding.data.video import Video, VideoDecodeError, read_video

__all__ = [
    "AnnotationError",
    "DataFailureError",
    "Annotations",
    "FORMATS",
    "LoadReport",
    "PipelineConfig",
    "PipelineIterator",
    "Sample",
    "SyntheticConfig",
    "Transform",
    "Validation",
    "Video",
    "VideoDecodeError",
    "default_transform",
    "ensure_synthetic_dataset",
    "load_annotations",
    "long_video_config",
    "make_pipeline",
    "read_video",
]
