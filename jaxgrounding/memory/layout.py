"""The geometry of TimeScope's streaming: settings, the fixed-size memory buffer, and the prompt cut into parts.

A prompt is `[prefix][video][suffix]` (chat template: system turn and `<|vision_start|>`, then one
`<|video_pad|>` per visual token, then `<|vision_end|>`, the instruction and the response). The
video is cut into segments of `segment_frames` temporal grids (one grid = `temporal_patch_size`
sampled frames = `tokens_per_frame` visual tokens). Each segment attends to a fixed-size buffer

    [prefix | HVR slots: max_segments x pooled tokens | recent slots: recent_segments x segment tokens]

(`BufferLayout`): the prefix, the HVR of every earlier segment and, optionally, the full keys of the
last `recent_segments` segments. Every shape is fixed by (`StreamingConfig`, batch, frame size), so one
compiled segment step (`memory.streaming`) serves any video up to `max_segments` segments.

`split_example` cuts one encoded prompt into the prefix / segments / suffix arrays the device steps take
(host side, numpy: in the pipeline's transform for training), `split_batch` every row of a padded prompt batch
(prompts built on the host).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxgrounding.data import padding, schema
from jaxgrounding.memory.hvr import HVRConfig
from jaxgrounding.model.config import ModelConfig
from jaxgrounding.model.vision import uniform_plan


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
    """segment_frames: temporal grids per segment (a multiple of hvr.temporal);
    hvr: the pooling of each segment into global memory; recent_segments: how many preceding
    segments a segment also sees in full (Video-XL-2 uses 3; 0 = HVR only);
    max_segments: capacity of the HVR buffer (longest video = max_segments * segment_frames
    grids); dvr_placement: where the DVR of past segments lives: "device", "pinned_host" (memory
    kinds, GPU/TPU), "host" (numpy) or "auto" (pinned_host where the backend has it, else host).
    Built from the config's `streaming` section (its values are the defaults: configs/meco.py)."""

    segment_frames: int
    hvr: HVRConfig
    recent_segments: int
    max_segments: int
    dvr_placement: str

    @classmethod
    def from_config(cls, config) -> StreamingConfig:
        """The buffer holds the longest video the data section allows: data.max_frames frames, two per
        temporal grid (Qwen-VL's temporal patch)."""
        s = config.streaming
        grids = -(-config.data.max_frames // 2)
        return cls(
            segment_frames=s.segment_frames,
            hvr=HVRConfig(temporal=s.hvr_temporal, spatial=s.hvr_spatial, impl=s.hvr_impl),
            recent_segments=s.recent_segments,
            max_segments=-(-grids // s.segment_frames),
            dvr_placement=s.dvr_placement,
        )

    def __post_init__(self):
        if self.segment_frames % self.hvr.temporal:
            raise ValueError(
                f"segment_frames={self.segment_frames} must be a multiple of hvr.temporal={self.hvr.temporal}"
            )
        if self.dvr_placement not in ("auto", "device", "pinned_host", "host"):
            raise ValueError(f"dvr_placement must be auto, device, pinned_host or host, got {self.dvr_placement!r}")


@dataclasses.dataclass(frozen=True)
class BufferLayout:
    """Static geometry of the memory buffer (hashable: a jit static argument)."""

    prefix: int  # prefix tokens
    tokens_per_frame: int  # visual tokens per temporal grid
    segment_frames: int
    pooled_per_segment: int  # HVR tokens of one segment
    max_segments: int
    recent_segments: int

    @property
    def segment_tokens(self) -> int:
        return self.segment_frames * self.tokens_per_frame

    @property
    def hvr_start(self) -> int:
        return self.prefix

    @property
    def recent_start(self) -> int:
        return self.prefix + self.max_segments * self.pooled_per_segment

    @property
    def size(self) -> int:
        return self.recent_start + self.recent_segments * self.segment_tokens

    def slot_segments(self) -> np.ndarray:
        """[size] int: the segment whose HVR a slot holds; -1 prefix, -2 the recent slots."""
        return np.concatenate(
            [
                np.full(self.prefix, -1),
                np.repeat(np.arange(self.max_segments), self.pooled_per_segment),
                np.full(self.recent_segments * self.segment_tokens, -2),
            ]
        ).astype(np.int32)

    @classmethod
    def build(cls, config: StreamingConfig, prefix: int, tokens_per_frame: int) -> BufferLayout:
        hvr = config.hvr
        if tokens_per_frame % hvr.spatial:
            raise ValueError(f"{tokens_per_frame} tokens per frame are not divisible by hvr.spatial={hvr.spatial}")
        pooled = (config.segment_frames // hvr.temporal) * (tokens_per_frame // hvr.spatial)
        return cls(prefix, tokens_per_frame, config.segment_frames, pooled, config.max_segments, config.recent_segments)


def tokens_per_frame(config: ModelConfig, frame_size) -> int:
    """Visual tokens of one temporal grid at `frame_size`."""
    p, m = config.vision.patch_size, config.vision.spatial_merge_size
    return (frame_size[0] // p) * (frame_size[1] // p) // (m * m)


def split_example(example: dict, config: ModelConfig, streaming: StreamingConfig, frame_size) -> dict[str, np.ndarray]:
    """One encoded example (`tasks.encoding`, numpy, unpadded) -> its streaming arrays (`data.schema.STREAMED`):
    prefix_ids, prefix_valid [Tp], prefix_positions [Tp, 3]; segment_pixels [N, S*h*w, patch_dim],
    segment_positions [N, 3, S*P], segment_valid [N, S*P]; frame_valid [N*S]; suffix_ids, suffix_valid [Ts],
    suffix_positions [Ts, 3]; suffix_start (index of the first suffix token in the prompt), with N = the segments
    the video's grids fill and Ts = the tokens after the video. Training examples also get suffix_loss_mask [Ts]
    and suffix_struct_positions [K] (the structural-token predictors, indexed in the suffix). Padding a batch of
    these (`data.padding`) gives the batch-first arrays the device steps take."""
    ids = np.asarray(example["input_ids"])
    positions = np.asarray(example["positions"])  # [T, 3]
    video = np.flatnonzero(ids == config.video_token_id)
    if video.size == 0:
        raise ValueError("streaming needs a video in every prompt; this one has none")
    prefix, n_visual = int(video[0]), video.size
    if video[-1] != prefix + n_visual - 1:
        raise ValueError("the video tokens of a streamed prompt must be contiguous")
    p = config.vision.patch_size
    hw = (frame_size[0] // p) * (frame_size[1] // p)
    per_frame = tokens_per_frame(config, frame_size)
    if n_visual % per_frame:
        raise ValueError(f"{n_visual} visual tokens are not whole frames of {per_frame}")
    grids, s = n_visual // per_frame, streaming.segment_frames
    n = -(-grids // s)
    if n > streaming.max_segments:
        raise ValueError(
            f"{grids} temporal grids need {n} segments of {s}; the buffer holds max_segments={streaming.max_segments}"
        )
    # Video: token j sits at index prefix + j; the last segment is padded with invalid tokens and zero patches.
    video_valid = np.arange(n * s * per_frame) < n_visual
    video_positions = np.zeros((n * s * per_frame, 3), positions.dtype)
    video_positions[:n_visual] = positions[prefix : prefix + n_visual]
    pixels = np.asarray(example["pixel_values"])
    padded = np.zeros((n * s * hw, pixels.shape[-1]), pixels.dtype)
    real = min(pixels.shape[0], grids * hw)
    padded[:real] = pixels[:real]
    start = prefix + n_visual
    out = {
        "prefix_ids": ids[:prefix],
        "prefix_positions": positions[:prefix],
        "prefix_valid": np.ones(prefix, bool),
        "segment_pixels": padded.reshape(n, s * hw, -1),
        "segment_positions": video_positions.reshape(n, s * per_frame, 3).transpose(0, 2, 1),
        "segment_valid": video_valid.reshape(n, s * per_frame),
        "frame_valid": np.arange(n * s) < grids,
        "suffix_ids": ids[start:],
        "suffix_positions": positions[start:],
        "suffix_valid": np.ones(ids.shape[0] - start, bool),
        "suffix_start": np.int32(start),
    }
    if "loss_mask" in example:
        out["suffix_loss_mask"] = np.asarray(example["loss_mask"])[start:]
    if "struct_positions" in example:
        out["suffix_struct_positions"] = np.maximum(np.asarray(example["struct_positions"]) - start, 0).astype(np.int32)
    return out


def split_batch(batch: dict, config: ModelConfig, streaming: StreamingConfig, frame_size) -> dict[str, np.ndarray]:
    """A padded prompt batch (`tasks.encoding` + `data.padding`, numpy) -> the batch-first streaming arrays of
    `split_example` for its valid rows (zeros for the others): N = the segments the batch's grid axis fills,
    suffixes padded to a multiple of 16. For prompts built on the host (GRPO rollouts, inference); training
    batches are cut per example in the pipeline."""
    valid = np.asarray(batch["valid"]) & np.asarray(batch["input_ids_mask"]).any(axis=1)
    rows = np.flatnonzero(valid)
    if rows.size == 0:
        raise ValueError("streaming needs a video in every prompt; this batch has none")
    examples = []
    for r in rows:
        length = int(np.sum(batch["input_ids_mask"][r]))
        example = {k: np.asarray(batch[k][r])[:length] for k in ("input_ids", "positions", "loss_mask") if k in batch}
        example["pixel_values"] = np.asarray(batch["pixel_values"][r])
        if "struct_positions" in batch:
            example["struct_positions"] = np.asarray(batch["struct_positions"][r])
        examples.append(split_example(example, config, streaming, frame_size))
    prefixes = {e["prefix_ids"].shape[0] for e in examples}
    if len(prefixes) > 1:
        raise ValueError(f"prompts place their video at different offsets {sorted(prefixes)}")
    s = streaming.segment_frames
    n = -(-np.shape(batch["grid_times"])[1] // s)
    if n > streaming.max_segments:
        raise ValueError(f"{n} segments of {s} grids exceed the buffer's max_segments={streaming.max_segments}")
    longest = max(e["suffix_ids"].shape[0] for e in examples)
    sizes = {"segments": (n,), "segment_grids": (n * s,), "suffix": (max(16, -(-longest // 16) * 16),)}
    buckets = {k: sizes[axis] for k, f in schema.STREAMED.items() if (axis := schema.variable_axis(f)) in sizes}
    stacked = padding.pad_and_stack(examples, rows.size, buckets)
    out = {}
    for key in examples[0]:
        value = stacked[key]
        out[key] = np.zeros((valid.shape[0], *value.shape[1:]), value.dtype)
        out[key][rows] = value
    return out


def plan_for(config: ModelConfig, streaming: StreamingConfig, frame_size, batch: int) -> dict:
    """The vision tower's plan for one segment of each of `batch` rows (the same for every segment)."""
    p = config.vision.patch_size
    return uniform_plan(batch, streaming.segment_frames, frame_size[0] // p, frame_size[1] // p, config.vision)
