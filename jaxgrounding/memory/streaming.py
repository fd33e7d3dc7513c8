"""Streaming prefill of long videos with TimeScope's two video representations.

A prompt is `[prefix][video][suffix]` (chat template: system turn and `<|vision_start|>`, then one
`<|video_pad|>` per visual token, then `<|vision_end|>`, the instruction and the response). The
video is cut into segments of `segment_frames` temporal grids (one grid = `temporal_patch_size`
sampled frames = `tokens_per_frame` visual tokens). Each segment runs through the vision tower and
the decoder attending to a fixed-size memory buffer

    [prefix | HVR slots: max_segments x pooled tokens | recent slots: recent_segments x segment tokens]

(`BufferLayout`): the prefix, the HVR of every earlier segment and, optionally, the full keys of
the last `recent_segments` segments (whose HVR is then hidden, so nothing is seen twice). After a
segment its keys and values are (a) returned whole, rotated at their own positions: the DVR, kept
aside by the caller (`DVRStore`), and (b) pooled by `memory.hvr` (keys pooled before RoPE and
rotated at the pooled position) into the segment's HVR slots. Positions stay absolute (M-RoPE
positions of the whole prompt, computed once on the host), so a key means the same time wherever
it is stored, and attention does not depend on where in the buffer a key sits: the answer memory
can append reloaded DVR after the HVR instead of splicing it in temporal order (the test checks
that the two orders agree).

Every shape is fixed by (`StreamingConfig`, batch, frame size), so one compiled segment step serves
any video up to `max_segments` segments, and device memory per step is bounded by the buffer.

`stream_forward` is the differentiable version (a `lax.scan` over segments) that training uses, so
what the model sees in SFT is exactly what it sees at inference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.memory.hvr import HVRConfig, hvr_downsample
from jaxgrounding.model.config import ModelConfig
from jaxgrounding.model.decoder import CACHE_AXES, Memory
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


# ------------------------------------------------------------------------------------------------
# Host side: cut a pipeline batch into prefix / segments / suffix
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Device side
# ------------------------------------------------------------------------------------------------


def _constrain(memory: Memory) -> Memory:
    return Memory(
        keys=parallel.constrain(memory.keys, CACHE_AXES),
        values=parallel.constrain(memory.values, CACHE_AXES),
        valid=parallel.constrain(memory.valid, ("batch", "cache_time")),
    )


def start_memory(llm, layout: BufferLayout, prefix_ids, prefix_positions, prefix_valid) -> Memory:
    """Runs the prefix and returns the buffer holding it (every other slot empty)."""
    config = llm.config
    t = config.text
    b = prefix_ids.shape[0]
    dtype = config.compute_dtype
    empty = Memory.empty(config, b)
    _, _, (keys, values, _) = llm.decoder.attend(llm.decoder.embed(prefix_ids), prefix_positions, prefix_valid, empty)
    shape = (t.num_layers, b, layout.size, t.num_kv_heads, t.head_dim)
    memory = Memory(
        keys=jnp.zeros(shape, dtype).at[:, :, : layout.prefix].set(keys.astype(dtype)),
        values=jnp.zeros(shape, dtype).at[:, :, : layout.prefix].set(values.astype(dtype)),
        valid=jnp.zeros((b, layout.size), bool).at[:, : layout.prefix].set(prefix_valid),
    )
    return _constrain(memory)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SegmentOutput:
    """frame_states: [B, S, E] float32, the last layer's output (before the final norm) averaged
    over each frame's tokens; frame_valid: [B, S]; dvr_keys (rotated), dvr_values: [L, B, S*P, Kh, D]."""

    frame_states: jax.Array
    frame_valid: jax.Array
    dvr_keys: jax.Array
    dvr_values: jax.Array


def embed_frames(llm, pixels: jax.Array, plan: dict) -> jax.Array:
    """The vision tower over whole segments: pixels [B, K*S*h*w, patch_dim] (K segments of every
    row; `plan` built for B*K segments) -> visual embeddings [B, K*S*P, E]. The tower attends
    within a temporal grid only, so segments can be embedded together or one at a time."""
    b = pixels.shape[0]
    embeds = llm.visual(pixels.reshape(-1, pixels.shape[-1]), plan).astype(llm.config.compute_dtype)
    return parallel.constrain(embeds.reshape(b, -1, embeds.shape[-1]), ("batch", None, "embed"))


def segment_step(
    llm, layout: BufferLayout, hvr: HVRConfig, memory: Memory, index, embeds, positions, valid, dropout_key=None
) -> tuple[Memory, SegmentOutput]:
    """Segment `index` (traced int) through the decoder over the memory.

    embeds: [B, S*P, E] (`embed_frames`); positions: [3, B, S*P]; valid: [B, S*P] (all tokens of a
    frame share one flag). Returns the memory with this segment's HVR (and recent slots) written,
    and the segment's frame states and DVR.
    """
    config = llm.config
    t = config.text
    b, s, p = valid.shape[0], layout.segment_frames, layout.tokens_per_frame
    slot_segment = jnp.asarray(layout.slot_segments())
    # HVR of the segments seen in full through the recent slots (and of this and later segments,
    # not written yet) stays hidden.
    hidden_hvr = (slot_segment >= 0) & (slot_segment >= index - layout.recent_segments)
    visible = Memory(memory.keys, memory.values, memory.valid & ~hidden_hvr[None])
    _, hidden, (keys, values, raw_keys) = llm.decoder.attend(
        embeds, positions, valid, visible, hidden_layers=(-1,), dropout_key=dropout_key
    )

    frame_valid = valid.reshape(b, s, p)[..., 0]
    frame_states = hidden[-1].astype(jnp.float32).reshape(b, s, p, -1).mean(axis=2)
    frame_states = frame_states * frame_valid[..., None]

    def grid(x):  # [L, B, S*P, Kh, D] -> [L, B, S, P, Kh, D]
        return x.reshape(t.num_layers, b, s, p, t.num_kv_heads, t.head_dim)

    pooled_k, pooled_v, _ = hvr_downsample(
        grid(raw_keys),
        grid(values),
        positions.reshape(3, b, s, p),
        config=hvr,
        head_dim=t.head_dim,
        rope_theta=t.rope_theta,
        mrope_section=t.mrope_section,
    )
    # A pooled group is kept only when all of its frames are real (the last, partial group of a
    # video is dropped from the HVR; its frames stay in the DVR).
    r, q = hvr.temporal, hvr.spatial
    pooled_valid = valid.reshape(b, s // r, r, p // q, q).all(axis=(2, 4)).reshape(b, -1)
    n_pooled = layout.pooled_per_segment
    at = layout.hvr_start + index * n_pooled
    dtype = memory.keys.dtype
    new_keys = jax.lax.dynamic_update_slice(
        memory.keys,
        pooled_k.reshape(t.num_layers, b, n_pooled, t.num_kv_heads, t.head_dim).astype(dtype),
        (0, 0, at, 0, 0),
    )
    new_values = jax.lax.dynamic_update_slice(
        memory.values,
        pooled_v.reshape(t.num_layers, b, n_pooled, t.num_kv_heads, t.head_dim).astype(dtype),
        (0, 0, at, 0, 0),
    )
    new_valid = jax.lax.dynamic_update_slice(memory.valid, pooled_valid, (0, at))
    dvr_keys = keys.astype(dtype)  # rotated by the attention that made them
    dvr_values = values.astype(dtype)
    if layout.recent_segments:
        at = layout.recent_start + (index % layout.recent_segments) * layout.segment_tokens
        new_keys = jax.lax.dynamic_update_slice(new_keys, dvr_keys, (0, 0, at, 0, 0))
        new_values = jax.lax.dynamic_update_slice(new_values, dvr_values, (0, 0, at, 0, 0))
        new_valid = jax.lax.dynamic_update_slice(new_valid, valid, (0, at))
    memory = _constrain(Memory(new_keys, new_values, new_valid))
    return memory, SegmentOutput(frame_states, frame_valid, dvr_keys, dvr_values)


def answer_memory(
    layout: BufferLayout, memory: Memory, dvr: Memory | None = None, dvr_segments: jax.Array | None = None
) -> Memory:
    """What the question and the answer attend to: the prefix, the HVR of every segment except
    the reloaded ones, and the reloaded segments' DVR (`dvr`: [L, B, R*S*P, ...], the rows of
    segment `dvr_segments[b, i]` at i*S*P; -1 = unused). Without `dvr`: the coarse stage's
    prefix + HVR. The recent slots are hidden: the answer sees the whole video at one resolution
    per segment."""
    if dvr is None:
        b = memory.valid.shape[0]
        dvr = Memory(memory.keys[:, :, :0], memory.values[:, :, :0], jnp.zeros((b, 0), bool))
        dvr_segments = -jnp.ones((b, 1), jnp.int32)
    slot_segment = jnp.asarray(layout.slot_segments())
    reloaded = jnp.any(
        (slot_segment[None, None, :] == dvr_segments[:, :, None]) & (dvr_segments[:, :, None] >= 0), axis=1
    )
    valid = memory.valid & ~reloaded & (slot_segment != -2)[None]
    return _constrain(
        Memory(
            keys=jnp.concatenate([memory.keys, dvr.keys.astype(memory.keys.dtype)], axis=2),
            values=jnp.concatenate([memory.values, dvr.values.astype(memory.values.dtype)], axis=2),
            valid=jnp.concatenate([valid, dvr.valid], axis=1),
        )
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StreamOutput:
    """final: [B, Ts, E] normed suffix states (what the LM head reads); hidden: {layer: [B, Ts, E]}
    of the suffix; frame_states: [B, N*S, E]; frame_valid: [B, N*S]."""

    final: jax.Array
    hidden: dict
    frame_states: jax.Array
    frame_valid: jax.Array


def stream_forward(
    llm,
    layout: BufferLayout,
    hvr: HVRConfig,
    arrays: dict,
    plan: dict,
    reloaded: jax.Array,
    hidden_layers=(),
    dropout_key=None,
) -> StreamOutput:
    """The whole streamed prompt in one differentiable function (training): prefix, a `lax.scan`
    over the segments (inside, the decoder layers are rematerialised by the model's remat policy;
    an outer checkpoint per segment measured 1.4x slower per step on the default config and saves
    only the per-layer residual stream of the video tokens), then the suffix over `answer_memory` with the DVR of the segments
    marked in `reloaded` [B, N] bool (all False: the coarse stage; some True: the fine stage).
    `plan`: the vision tower's plan for all B*N segments (`plan_for(..., batch=B*N)`): the
    frames are embedded in one batched call before the scan (the tower never looks across grids,
    so this equals embedding each segment in its step, and runs as a few large matmuls)."""
    config = llm.config
    t = config.text
    prefix_positions = jnp.moveaxis(arrays["prefix_positions"], 1, 0)
    memory = start_memory(llm, layout, arrays["prefix_ids"], prefix_positions, arrays["prefix_valid"])
    b, n = arrays["segment_valid"].shape[:2]

    def body(memory, xs):
        index, embeds, positions, valid = xs
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
        return segment_step(llm, layout, hvr, memory, index, embeds, positions, valid, key)

    pixels = arrays["segment_pixels"]
    embeds = embed_frames(llm, pixels.reshape(b, -1, pixels.shape[-1]), plan)
    xs = (
        jnp.arange(n, dtype=jnp.int32),
        jnp.moveaxis(embeds.reshape(b, n, layout.segment_tokens, -1), 1, 0),
        jnp.transpose(arrays["segment_positions"], (1, 2, 0, 3)),  # [N, 3, B, S*P]
        jnp.moveaxis(arrays["segment_valid"], 1, 0),
    )
    memory, out = jax.lax.scan(body, memory, xs)

    def stack(x):  # [N, L, B, S*P, Kh, D] -> [L, B, N*S*P, Kh, D]
        return jnp.moveaxis(x, 0, 2).reshape(t.num_layers, b, -1, t.num_kv_heads, t.head_dim)

    segment_valid = arrays["segment_valid"] & reloaded[:, :, None]
    dvr = Memory(stack(out.dvr_keys), stack(out.dvr_values), segment_valid.reshape(b, -1))
    dvr_segments = jnp.where(reloaded, jnp.arange(n)[None, :], -1)
    context = answer_memory(layout, memory, dvr, dvr_segments)
    embeds = llm.decoder.embed(arrays["suffix_ids"])
    suffix_positions = jnp.moveaxis(arrays["suffix_positions"], 1, 0)
    suffix_key = None if dropout_key is None else jax.random.fold_in(dropout_key, n)
    final, hidden, _ = llm.decoder.attend(
        embeds, suffix_positions, arrays["suffix_valid"], context, hidden_layers, dropout_key=suffix_key
    )
    frame_states = jnp.moveaxis(out.frame_states, 0, 1).reshape(b, n * layout.segment_frames, -1)
    frame_valid = jnp.moveaxis(out.frame_valid, 0, 1).reshape(b, -1)
    return StreamOutput(final, hidden, frame_states, frame_valid)


# ------------------------------------------------------------------------------------------------
# Inference: one jitted step per segment, DVR kept aside
# ------------------------------------------------------------------------------------------------


def resolve_placement(placement: str, backend: str | None = None) -> str:
    """ "auto" -> pinned host memory where the backend has memory kinds (GPU, TPU), else host numpy."""
    if placement != "auto":
        return placement
    return "host" if (backend or jax.default_backend()) == "cpu" else "pinned_host"


class DVRStore:
    """The full keys/values of every streamed segment, where `placement` says.

    "device" keeps them as device arrays, "pinned_host" moves them to pinned host memory (a
    `memory_kind` of the same sharding, so reloading is a DMA), "host" copies them to numpy.
    `gather` builds the fine stage's DVR memory for chosen segments per row."""

    def __init__(self, placement: str):
        self.placement = resolve_placement(placement)
        self.segments: list[tuple[Any, Any, Any]] = []

    def add(self, keys: jax.Array, values: jax.Array, valid: jax.Array) -> None:
        if self.placement == "host":
            keys, values, valid = jax.device_get((keys, values, valid))
        elif self.placement == "pinned_host":
            keys, values = (jax.device_put(x, x.sharding.with_memory_kind("pinned_host")) for x in (keys, values))
        self.segments.append((keys, values, valid))

    @property
    def nbytes(self) -> int:
        return sum(int(k.nbytes + v.nbytes) for k, v, _ in self.segments)

    def host_bytes(self) -> int:
        return self.nbytes if self.placement in ("host", "pinned_host") else 0

    def gather(self, segments_br: np.ndarray) -> Memory:
        """segments_br: [B, R] segment indices (-1 = unused slot) -> Memory [L, B, R*S*P, ...]."""
        segments_br = np.asarray(segments_br)
        b, r = segments_br.shape
        rows_k, rows_v, rows_valid = [], [], []
        for row in range(b):
            ks, vs, oks = [], [], []
            for i in range(r):
                seg = int(segments_br[row, i])
                keys, values, valid = self.segments[max(seg, 0)]
                if self.placement == "pinned_host":
                    keys, values = (jax.device_put(x, x.sharding.with_memory_kind("device")) for x in (keys, values))
                ks.append(keys[:, row])
                vs.append(values[:, row])
                oks.append(np.asarray(valid[row]) & (seg >= 0))
            rows_k.append(jnp.concatenate([jnp.asarray(x) for x in ks], axis=1))
            rows_v.append(jnp.concatenate([jnp.asarray(x) for x in vs], axis=1))
            rows_valid.append(np.concatenate(oks))
        return Memory(jnp.stack(rows_k, axis=1), jnp.stack(rows_v, axis=1), jnp.asarray(np.stack(rows_valid)))


@dataclasses.dataclass
class StreamedVideo:
    """What streaming leaves behind: the memory buffer (prefix + HVR + recent slots), the DVR of
    every segment, and the frame states [B, N*S, E] / frame_valid [B, N*S] (numpy)."""

    layout: BufferLayout
    memory: Memory
    dvr: DVRStore
    frame_states: np.ndarray
    frame_valid: np.ndarray


# The two compiled programs of streaming inference, over (graphdef, state) from `nnx.split(llm)`. keep_unused:
# parameters a step never reads (the LM head; the embedding table in the segment step) stay arguments, so the
# compiled step's memory analysis counts every parameter, as the device holds them all (bench/streaming.py).


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"), keep_unused=True)
def stream_start(graphdef, state, layout: BufferLayout, prefix_ids, prefix_positions, prefix_valid) -> Memory:
    """Jitted `start_memory`: prefix_ids, prefix_valid [B, Tp]; prefix_positions [3, B, Tp]."""
    return start_memory(nnx.merge(graphdef, state), layout, prefix_ids, prefix_positions, prefix_valid)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "layout", "hvr"), donate_argnames=("memory",), keep_unused=True
)
def stream_segment(
    graphdef, state, layout: BufferLayout, hvr: HVRConfig, memory: Memory, index, pixels, plan, positions, valid
) -> tuple[Memory, SegmentOutput]:
    """Jitted vision tower (`embed_frames`) + `segment_step` for one segment; the memory buffer is donated, so
    the running buffer exists once on device. pixels: [B, S*h*w, patch_dim]; positions: [3, B, S*P]; valid:
    [B, S*P]; plan: `plan_for(..., batch=B)`."""
    llm = nnx.merge(graphdef, state)
    embeds = embed_frames(llm, pixels, plan)
    return segment_step(llm, layout, hvr, memory, index, embeds, positions, valid)


def stream_prompt(llm, arrays: dict, config: StreamingConfig, frame_size, progress: bool = False) -> StreamedVideo:
    """Streams the prefix and every segment of `arrays` (from `split_batch`) through `llm`.

    One compiled step serves every segment (and every video with the same batch, frame size and
    config); the DVR of each segment leaves the device as soon as it is produced when
    `config.dvr_placement` says so, so device memory stays at one segment plus the buffer."""
    graphdef, state = nnx.split(llm)
    b, n = arrays["segment_valid"].shape[:2]
    layout = BufferLayout.build(
        config, arrays["prefix_ids"].shape[1], arrays["segment_valid"].shape[2] // config.segment_frames
    )
    plan = plan_for(llm.config, config, frame_size, b)
    memory = stream_start(
        graphdef,
        state,
        layout,
        jnp.asarray(arrays["prefix_ids"]),
        jnp.asarray(np.moveaxis(arrays["prefix_positions"], 1, 0)),
        jnp.asarray(arrays["prefix_valid"]),
    )
    dvr = DVRStore(config.dvr_placement)
    frame_states, frame_valid = [], []
    segments = range(n)
    if progress:
        from tqdm.auto import tqdm

        segments = tqdm(segments, desc="streaming segments", leave=False)
    for i in segments:
        memory, out = stream_segment(
            graphdef,
            state,
            layout,
            config.hvr,
            memory,
            jnp.asarray(i, jnp.int32),
            jnp.asarray(arrays["segment_pixels"][:, i]),
            plan,
            jnp.asarray(np.moveaxis(arrays["segment_positions"][:, i], 1, 0)),
            jnp.asarray(arrays["segment_valid"][:, i]),
        )
        dvr.add(out.dvr_keys, out.dvr_values, out.frame_valid.repeat(layout.tokens_per_frame, axis=1))
        frame_states.append(np.asarray(out.frame_states))
        frame_valid.append(np.asarray(out.frame_valid))
    return StreamedVideo(layout, memory, dvr, np.concatenate(frame_states, 1), np.concatenate(frame_valid, 1))
