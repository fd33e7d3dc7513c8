"""The geometry of TimeScope's streaming: settings, the fixed-size memory buffer, and the prompt cut into parts.

A prompt is `[prefix][video][suffix]` (chat template: system turn and `<|vision_start|>`, then one
`<|video_pad|>` per visual token, then `<|vision_end|>`, the instruction and the response). The
video is cut into segments of `segment_frames` temporal grids (one grid = `temporal_patch_size`
sampled frames = `tokens_per_frame` visual tokens). Each segment attends to a fixed-size buffer

    [prefix | HVR slots: max_segments x pooled tokens | recent slots: recent_segments x segment tokens]

(`BufferLayout`): the prefix, the HVR of every earlier segment and, optionally, the full keys of the
last `recent_segments` segments. Every shape is fixed by (`StreamingConfig`, batch, frame size), so one
compiled segment step (`memory.streaming`) serves any video up to `max_segments` segments.

`split_batch` cuts a pipeline batch into the prefix / segments / suffix arrays the device steps take
(host side, numpy).
"""

from __future__ import annotations

import dataclasses

import numpy as np

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


def split_batch(batch: dict, config: ModelConfig, streaming: StreamingConfig, frame_size) -> dict[str, np.ndarray]:
    """A pipeline batch (`tasks.encoding` + `data.padding`, numpy) -> the streaming arrays.

    Every array is batch-first (so micro-batching and data sharding split axis 0): prefix_ids,
    prefix_valid [B, Tp], prefix_positions [B, 3, Tp]; segment_pixels [B, N, S*h*w, patch_dim],
    segment_positions [B, N, 3, S*P], segment_valid [B, N, S*P]; suffix_ids, suffix_valid
    [B, Ts], suffix_positions [B, 3, Ts]; suffix_start [B] (index of the first suffix token in the
    flat sequence); frame_valid [B, N*S]. Training batches also get suffix_loss_mask [B, Ts] and
    suffix_struct_positions [B, K] (the structural-token predictors, indexed in the suffix).
    """
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch["input_ids_mask"]) & np.asarray(batch["valid"])[:, None]
    positions = np.asarray(batch["positions"])  # [B, T, 3]
    b, t = ids.shape
    is_video = (ids == config.video_token_id) & mask
    rows = np.flatnonzero(is_video.any(axis=1))
    if rows.size == 0:
        raise ValueError("streaming needs a video in every prompt; this batch has none")
    starts = is_video.argmax(axis=1)
    prefix = int(starts[rows[0]])
    if np.any(starts[rows] != prefix):
        raise ValueError(f"prompts place their video at different offsets {sorted(set(starts[rows].tolist()))}")
    p = config.vision.patch_size
    m = config.vision.spatial_merge_size
    hw = (frame_size[0] // p) * (frame_size[1] // p)
    tokens_per_frame = hw // (m * m)
    grids = np.shape(batch["grid_times"])[1]
    s = streaming.segment_frames
    n = -(-grids // s)
    if n > streaming.max_segments:
        raise ValueError(
            f"{grids} temporal grids need {n} segments of {s}; the buffer holds max_segments={streaming.max_segments}"
        )
    n_visual = is_video.sum(axis=1)
    if np.any(n_visual % tokens_per_frame):
        raise ValueError(f"visual token counts {n_visual.tolist()} are not whole frames of {tokens_per_frame}")

    # Video: token j of row r sits at flat index prefix + j (video tokens are contiguous).
    j = np.arange(n * s * tokens_per_frame)
    video_valid = (j[None, :] < n_visual[:, None]) & mask.any(axis=1)[:, None]
    video_index = np.minimum(prefix + j, t - 1)
    video_positions = np.where(video_valid[..., None], positions[:, video_index], 0)  # [B, N*S*P, 3]

    pixels = np.asarray(batch["pixel_values"])  # [B, G*hw, pd]
    padded = np.zeros((b, n * s * hw, pixels.shape[-1]), pixels.dtype)
    padded[:, : pixels.shape[1]] = pixels

    # Suffix: everything after the video, left-aligned, padded to a multiple of 16.
    suffix_start = prefix + n_visual
    lengths = mask.sum(axis=1) - suffix_start
    ts = max(16, -(-int(lengths.max()) // 16) * 16)
    k = np.arange(ts)
    suffix_index = np.minimum(suffix_start[:, None] + k[None, :], t - 1)
    suffix_valid = k[None, :] < lengths[:, None]
    take = np.take_along_axis
    out = {
        "prefix_ids": ids[:, :prefix],
        "prefix_positions": np.moveaxis(positions[:, :prefix], -1, 1),
        "prefix_valid": mask[:, :prefix],
        "segment_pixels": padded.reshape(b, n, s * hw, -1),
        "segment_positions": video_positions.reshape(b, n, s * tokens_per_frame, 3).transpose(0, 1, 3, 2),
        "segment_valid": video_valid.reshape(b, n, s * tokens_per_frame),
        "suffix_ids": np.where(suffix_valid, take(ids, suffix_index, 1), 0),
        "suffix_positions": np.moveaxis(take(positions, suffix_index[..., None], 1), -1, 1),
        "suffix_valid": suffix_valid,
        "suffix_start": suffix_start.astype(np.int32),
        "frame_valid": np.arange(n * s)[None, :] < (n_visual // tokens_per_frame)[:, None],
    }
    if "loss_mask" in batch:
        out["suffix_loss_mask"] = take(np.asarray(batch["loss_mask"]), suffix_index, 1) & suffix_valid
    if "struct_positions" in batch:
        out["suffix_struct_positions"] = np.maximum(np.asarray(batch["struct_positions"]) - suffix_start[:, None], 0)
    return out


def plan_for(config: ModelConfig, streaming: StreamingConfig, frame_size, batch: int) -> dict:
    """The vision tower's plan for one segment of each of `batch` rows (the same for every segment)."""
    p = config.vision.patch_size
    return uniform_plan(batch, streaming.segment_frames, frame_size[0] // p, frame_size[1] // p, config.vision)
