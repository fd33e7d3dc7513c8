"""Streaming prefill of long videos with TimeScope's two video representations: the device steps.

Each segment of a prompt (`memory.layout`: prefix | segments | suffix, and the fixed-size buffer
`BufferLayout`) runs through the vision tower and the decoder attending to the memory buffer: the
prefix, the HVR of every earlier segment and, optionally, the full keys of the last `recent_segments`
segments (whose HVR is then hidden, so nothing is seen twice). After a segment its keys and values are
(a) returned whole, rotated at their own positions: the DVR, kept aside by the caller (`memory.dvr`),
and (b) pooled by `memory.hvr` (keys pooled before RoPE and rotated at the pooled position) into the
segment's HVR slots. Positions stay absolute (M-RoPE positions of the whole prompt, computed once on the
host), so a key means the same time wherever it is stored, and attention does not depend on where in
the buffer a key sits: the answer memory can append reloaded DVR after the HVR instead of splicing it in
temporal order (the test checks that the two orders agree).

One compiled segment step serves any video up to `max_segments` segments, and device memory per step is
bounded by the buffer. `stream_forward` is the differentiable version (a `lax.scan` over segments) that
training uses, so what the model sees in SFT is exactly what it sees at inference; `stream_prompt` is
the inference driver (one jitted step per segment).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.memory.dvr import DVRStore
from jaxgrounding.memory.hvr import HVRConfig, hvr_downsample
from jaxgrounding.memory.layout import BufferLayout, StreamingConfig, plan_for, split_batch, split_example
from jaxgrounding.model.decoder import CACHE_AXES, Memory
from jaxgrounding.model.video_llm import ModelInputs

# The settings, layout and DVR store live beside this module; callers reach them through it too.
__all__ = [
    "BufferLayout",
    "DVRStore",
    "SegmentOutput",
    "StreamOutput",
    "StreamedVideo",
    "StreamingConfig",
    "answer_memory",
    "embed_frames",
    "plan_for",
    "segment_step",
    "split_batch",
    "split_example",
    "start_memory",
    "stream_forward",
    "stream_prompt",
    "stream_segment",
    "stream_start",
]


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


def stream_context(
    llm,
    layout: BufferLayout,
    hvr: HVRConfig,
    arrays: dict,
    plan: dict,
    reloaded: jax.Array,
    dropout_key=None,
) -> tuple[Memory, jax.Array, jax.Array]:
    """The streamed video in one differentiable function (training): the prefix, then a `lax.scan` over the
    segments (inside, the decoder layers are rematerialised by the model's remat policy; an outer checkpoint per
    segment measured 1.4x slower per step on the default config and saves only the per-layer residual stream of
    the video tokens). Returns (what the question attends to: `answer_memory` with the DVR of the segments marked
    in `reloaded` [B, N] bool, all False for the coarse stage; frame_states [B, N*S, E]; frame_valid [B, N*S]).
    `plan`: the vision tower's plan for all B*N segments (`plan_for(..., batch=B*N)`): the frames are embedded in
    one batched call before the scan (the tower never looks across grids, so this equals embedding each segment
    in its step, and runs as a few large matmuls)."""
    t = llm.config.text
    prefix_positions = jnp.moveaxis(arrays["prefix_positions"], -1, 0)
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
    frame_states = jnp.moveaxis(out.frame_states, 0, 1).reshape(b, n * layout.segment_frames, -1)
    frame_valid = jnp.moveaxis(out.frame_valid, 0, 1).reshape(b, -1)
    return context, frame_states, frame_valid


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
    """The whole streamed prompt (training): `stream_context`, then the suffix (question and response) over it."""
    context, frame_states, frame_valid = stream_context(llm, layout, hvr, arrays, plan, reloaded, dropout_key)
    n = arrays["segment_valid"].shape[1]
    embeds = llm.decoder.embed(arrays["suffix_ids"])
    suffix_positions = jnp.moveaxis(arrays["suffix_positions"], -1, 0)
    suffix_key = None if dropout_key is None else jax.random.fold_in(dropout_key, n)
    final, hidden, _ = llm.decoder.attend(
        embeds, suffix_positions, arrays["suffix_valid"], context, hidden_layers, dropout_key=suffix_key
    )
    return StreamOutput(final, hidden, frame_states, frame_valid)


def suffix_inputs(arrays: dict) -> ModelInputs:
    """The question (and generation prompt) after the video of `split_batch` arrays, at its absolute positions:
    what generation continues a streamed video with."""
    positions = jnp.moveaxis(jnp.asarray(arrays["suffix_positions"]), -1, 0)
    valid = jnp.asarray(arrays["suffix_valid"])
    return ModelInputs(
        input_ids=jnp.asarray(arrays["suffix_ids"]),
        attention_mask=valid,
        positions=positions,
        next_position=jnp.max(jnp.where(valid[None], positions, -1), axis=(0, 2)) + 1,
    )


# ------------------------------------------------------------------------------------------------
# Inference: one jitted step per segment, DVR kept aside
# ------------------------------------------------------------------------------------------------


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
        jnp.asarray(np.moveaxis(arrays["prefix_positions"], -1, 0)),
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
