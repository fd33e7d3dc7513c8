"""What a config file's sections mean to the library: each settings object built from its section.

The config files (configs/*.py, ml_collections) hold the values; these functions turn their
sections into the dataclasses the library takes, for training, evaluation and grounding alike.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxgrounding import data as data_lib
from jaxgrounding import inference, sampling
from jaxgrounding.memory.hvr import HVRConfig
from jaxgrounding.memory.streaming import StreamingConfig
from jaxgrounding.tasks.coarse_to_fine import CoarseToFineConfig
from jaxgrounding.tasks.encoding import EncoderConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def encoder_config(config, *, train: bool) -> EncoderConfig:
    return EncoderConfig(
        task=config.encoder.task,
        frame_size=tuple(config.data.frame_size),
        max_tokens=config.encoder.max_tokens,
        random_instruction=train,
        seed=config.seed,
    )


def _ladder(limit: int, start: int) -> tuple[int, ...]:
    """Bucket sizes start, 1.5 * start, 2 * start, 3 * start, ... up to and including `limit`."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return tuple(sizes) + (limit,)


def pipeline_config(config, *, train: bool, batch_size: int) -> data_lib.PipelineConfig:
    """Buckets derived from the frame budget, so a config change never needs a bucket change."""
    h, w = config.data.frame_size
    patches_per_grid = (h // 14) * (w // 14)
    max_grids = -(-config.data.max_frames // 2)
    grids = _ladder(max_grids, min(8, max_grids))
    text = _ladder(config.encoder.max_tokens, min(128, config.encoder.max_tokens))
    structural = (4, 8, 16, 32, 64)
    buckets = {k: text for k in ("input_ids", "loss_mask", "positions", "frame_of_token")}
    buckets |= {"pixel_values": tuple(g * patches_per_grid for g in grids), "grid_times": grids}
    buckets |= {k: structural for k in ("struct_positions", "struct_kinds", "struct_ranges", "windows")}
    # Decoded frames (GRPO builds its prompts on the host, once the step's task is drawn).
    buckets |= {k: tuple(2 * g for g in grids) for k in ("frames", "timestamps")}
    return data_lib.PipelineConfig(
        batch_size=batch_size,
        seed=config.seed,
        num_epochs=None if train else 1,
        shuffle=train,
        worker_count=config.data.workers,
        buckets=buckets,
        video={"fps": config.data.fps, "max_frames": config.data.max_frames, "size": tuple(config.data.frame_size)},
    )


def prompt_buckets(config) -> dict[str, tuple[int, ...]]:
    """Bucket sizes of prompt arrays built on the host (GRPO rollouts, answer evaluation), as the
    pipeline's: a few shapes, so the jitted rollout and score functions compile a few times."""
    buckets = pipeline_config(config, train=True, batch_size=1).buckets
    return {k: buckets[k] for k in ("input_ids", "loss_mask", "positions", "frame_of_token", "pixel_values", "grid_times")}


def streaming_config(config):
    """The config's TimeScope streaming settings (`config.streaming`), or None without them."""
    if "streaming" not in config:
        return None
    s = config.streaming
    return StreamingConfig(
        segment_frames=s.segment_frames,
        hvr=HVRConfig(temporal=s.hvr_temporal, spatial=s.hvr_spatial, impl=s.hvr_impl),
        recent_segments=s.recent_segments,
        max_segments=s.max_segments,
        dvr_placement=s.dvr_placement,
    )


def video_first(config) -> bool:
    """Whether answer-format prompts put the video before the instruction: a streamed config's must (the video
    is streamed into memory first, then the question asks), Time-R1's put the query first."""
    return streaming_config(config) is not None


def inference_streaming_config(config):
    """Streaming settings for grounding with `config`: its own, or for a model trained without
    them (`ground --memory streaming` on a MeCo workdir) the defaults sized to data.max_frames."""
    streaming = streaming_config(config)
    if streaming is not None:
        return streaming
    segment_frames = StreamingConfig.segment_frames
    return StreamingConfig(max_segments=-(-config.data.max_frames // 2 // segment_frames))


def coarse_to_fine_config(config):
    if "coarse_to_fine" not in config:
        return CoarseToFineConfig()
    c = config.coarse_to_fine
    return CoarseToFineConfig(
        margin=c.margin, max_reload_segments=c.max_reload_segments, fine_fraction=c.fine_fraction, jitter=c.jitter
    )


def sampling_config(config) -> sampling.SamplingConfig:
    return sampling.SamplingConfig(
        max_new_tokens=config.sampling.max_new_tokens,
        temperature=config.sampling.temperature,
        top_p=config.sampling.top_p,
    )


def assignment_config(config) -> inference.AssignmentConfig:
    return inference.AssignmentConfig(
        threshold=config.assignment.threshold or None,
        dilation=config.assignment.dilation,
        nms_iou=config.assignment.nms_iou,
    )
