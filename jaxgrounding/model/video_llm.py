"""VideoLLM: the vision tower's embeddings scattered into the text sequence, then the decoder.

Two layers of API:
- `prepare_inputs(config, input_ids=..., pixel_values_videos=..., ...)` turns transformers-style
  processor outputs (numpy or jax) into a `ModelInputs` pytree on the host: M-RoPE positions,
  the vision tower's attention plan, and where each visual embedding goes. Everything
  data-dependent happens here, so what follows has static shapes and jits.
- `VideoLLM.forward(inputs, ...)` is pure array code, used inside jitted train and sampling
  steps; `VideoLLM.__call__(input_ids=..., ...)` does both with a cached jit, for notebooks,
  tests and the CLIs.

Decoding: `prefill` fills a preallocated `KVCache` from a prompt, `decode_step` appends one
token; both are jitted and donate the cache.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding.model.config import ModelConfig
from jaxgrounding.model.decoder import Decoder, KVCache
from jaxgrounding.model.positions import rope_positions
from jaxgrounding.model.vision import VisionTower, vision_plan


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelInputs:
    """One batch, ready for `VideoLLM.forward`.

    input_ids, attention_mask: [B, T]; positions: [3, B, T]; next_position: [B];
    pixel_values: [N, patch_dim] (images' rows then videos' rows) or None; vision: the tower's
    plan (see `VisionPlan.as_arrays`) or None; visual_slots: [N / m^2] flat index into B * T of
    the placeholder each visual embedding replaces, in the order the tower emits them.
    """

    input_ids: Any
    attention_mask: Any
    positions: Any
    next_position: Any
    pixel_values: Any = None
    vision: Any = None
    visual_slots: Any = None

    @classmethod
    def for_text(cls, input_ids, attention_mask=None) -> ModelInputs:
        """Inputs of a text-only batch (traceable: positions count the unmasked tokens)."""
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
        return cls(
            input_ids=input_ids,
            attention_mask=mask,
            positions=jnp.broadcast_to(positions, (3, *mask.shape)),
            next_position=jnp.sum(mask, axis=1).astype(jnp.int32),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array | None  # [B, T, V] float32 (None when not asked for)
    hidden_states: dict[int, jax.Array]  # requested residual-stream layers, [B, T, E] each
    last_hidden_state: jax.Array  # [B, T, E] after the final norm (what the LM head reads)


def _np(x):
    return None if x is None else np.asarray(x)


def prepare_inputs(
    config: ModelConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    position_ids=None,
) -> ModelInputs:
    """Host-side preparation of a batch in the HF processor layout (see module docstring)."""
    input_ids = np.asarray(input_ids, dtype=np.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    attention_mask = (
        np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    )
    image_grid_thw, video_grid_thw = _np(image_grid_thw), _np(video_grid_thw)
    if (pixel_values is None) != (image_grid_thw is None):
        raise ValueError("pixel_values and image_grid_thw must be given together")
    if (pixel_values_videos is None) != (video_grid_thw is None):
        raise ValueError("pixel_values_videos and video_grid_thw must be given together")

    if position_ids is None:
        positions, next_position = rope_positions(
            input_ids, config, attention_mask, image_grid_thw, video_grid_thw, _np(second_per_grid_ts)
        )
    else:
        positions = np.asarray(position_ids, dtype=np.int32)
        if positions.ndim == 2:
            positions = np.broadcast_to(positions[None], (3, *positions.shape))
        next_position = positions.max(axis=(0, 2)) + 1

    pixel_rows, grids, slots = [], [], []
    flat_ids = np.where(attention_mask, input_ids, -1).reshape(-1)
    m2 = config.vision.spatial_merge_size**2
    for pixels, grid, token, kind in (
        (pixel_values, image_grid_thw, config.image_token_id, "image"),
        (pixel_values_videos, video_grid_thw, config.video_token_id, "video"),
    ):
        if pixels is None:
            continue
        pixels = np.asarray(pixels)
        grid = np.asarray(grid, dtype=np.int64).reshape(-1, 3)
        n_patches = int(np.prod(grid, axis=1).sum())
        if pixels.shape != (n_patches, config.vision.patch_dim):
            raise ValueError(
                f"{kind} pixels have shape {pixels.shape}; grid_thw {grid.tolist()} needs "
                f"({n_patches}, {config.vision.patch_dim})"
            )
        token_slots = np.flatnonzero(flat_ids == token)
        if token_slots.shape[0] != n_patches // m2:
            raise ValueError(
                f"{kind} features and {kind} tokens do not match: {token_slots.shape[0]} "
                f"placeholder tokens, {n_patches // m2} features from grid_thw {grid.tolist()}"
            )
        pixel_rows.append(pixels)
        grids.append(grid)
        slots.append(token_slots)

    vision = pixels = visual_slots = None
    if pixel_rows:
        pixels = np.concatenate(pixel_rows)
        vision = vision_plan(np.concatenate(grids), config.vision).as_arrays()
        visual_slots = np.concatenate(slots).astype(np.int32)
    return ModelInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        positions=positions,
        next_position=next_position.astype(np.int32),
        pixel_values=pixels,
        vision=vision,
        visual_slots=visual_slots,
    )


class VideoLLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(param_dtype=config.param_dtype, compute_dtype=config.compute_dtype, rngs=rngs)
        self.visual = VisionTower(config.vision, attention_impl=config.attention, **kw)
        self.decoder = Decoder(config, rngs=rngs)

    def embed_inputs(self, inputs: ModelInputs) -> jax.Array:
        """Token embeddings with visual embeddings at their placeholders: [B, T, E]."""
        embeds = self.decoder.embed(jnp.asarray(inputs.input_ids))
        if inputs.pixel_values is None:
            return embeds
        visual = self.visual(jnp.asarray(inputs.pixel_values), inputs.vision).astype(embeds.dtype)
        b, t, e = embeds.shape
        # Slots past the end (b * t) are padding frames of a bucketed batch: dropped.
        return embeds.reshape(b * t, e).at[inputs.visual_slots].set(visual, mode="drop").reshape(b, t, e)

    def forward(self, inputs: ModelInputs, hidden_layers: Sequence[int] = (), *, logits: bool = True, dropout_key=None):
        """Full causal forward over the batch. Returns ModelOutput (logits None if not asked).
        `dropout_key` (training): LoRA input dropout, where adapters have a rate."""
        embeds = self.embed_inputs(inputs)
        mask = jnp.asarray(inputs.attention_mask)
        final, hidden, _ = self.decoder(
            embeds, jnp.asarray(inputs.positions), mask, None, hidden_layers, dropout_key=dropout_key
        )
        return ModelOutput(
            logits=self.decoder.logits(final) if logits else None, hidden_states=hidden, last_hidden_state=final
        )

    def prefill(self, inputs: ModelInputs, cache: KVCache, hidden_layers: Sequence[int] = (), start: int = 0):
        """Runs the prompt into the cache from slot `start` (static; 0 for an empty cache, the
        memory size for a cache that starts with a streamed video's memory, whose valid slots the
        prompt sees); prompts may be left- or right-padded.

        Returns (logits at each row's last real token [B, V], cache, {layer: hidden [B, T, E]}).
        Decoding continues at slot start + T for every row; a right-padded row's padding slots stay
        invisible (key_valid False) and its positions continue from its own last token.
        """
        embeds = self.embed_inputs(inputs)
        mask = jnp.asarray(inputs.attention_mask)
        t = mask.shape[1]
        earlier = cache.key_valid if start else jnp.zeros_like(cache.key_valid)
        key_valid = jax.lax.dynamic_update_slice(earlier, mask, (0, start))
        cache = dataclasses.replace(cache, key_valid=key_valid, length=jnp.asarray(start, jnp.int32))
        final, hidden, cache = self.decoder(
            embeds, jnp.asarray(inputs.positions), key_valid, cache, hidden_layers, causal_offset=start
        )
        cache = dataclasses.replace(
            cache, length=jnp.asarray(start + t, jnp.int32), next_position=jnp.asarray(inputs.next_position, jnp.int32)
        )
        last = jnp.max(jnp.where(mask, jnp.arange(t), -1), axis=1)
        return self.decoder.logits(final[jnp.arange(final.shape[0]), last]), cache, hidden

    def decode_step(self, tokens: jax.Array, cache: KVCache, hidden_layers: Sequence[int] = ()):
        """Appends tokens [B] at slot `cache.length`.

        Returns (logits [B, V], cache, {layer: hidden [B, E]}): the hidden states are those of
        the appended token, i.e. the states that predict the *next* token.
        """
        embeds = self.decoder.embed(tokens[:, None])
        positions = jnp.broadcast_to(cache.next_position[None, :, None], (3, tokens.shape[0], 1))
        key_valid = cache.key_valid.at[:, cache.length].set(True)
        cache = dataclasses.replace(cache, key_valid=key_valid)
        final, hidden, cache = self.decoder(
            embeds, positions, key_valid, cache, hidden_layers, causal_offset=cache.length, decode=True
        )
        cache = dataclasses.replace(cache, length=cache.length + 1, next_position=cache.next_position + 1)
        return self.decoder.logits(final[:, 0]), cache, {k: v[:, 0] for k, v in hidden.items()}

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        position_ids=None,
        hidden_layers: Sequence[int] = (),
    ) -> ModelOutput:
        """transformers-style call on processor outputs (numpy, jax or torch-converted arrays)."""
        inputs = prepare_inputs(
            self.config,
            input_ids,
            attention_mask,
            pixel_values,
            image_grid_thw,
            pixel_values_videos,
            video_grid_thw,
            second_per_grid_ts,
            position_ids,
        )
        graphdef, state = nnx.split(self)
        return _jitted_forward(graphdef, state, inputs, tuple(hidden_layers))


@functools.partial(jax.jit, static_argnames=("graphdef", "hidden_layers"))
def _jitted_forward(graphdef, state, inputs: ModelInputs, hidden_layers: tuple[int, ...]) -> ModelOutput:
    return nnx.merge(graphdef, state).forward(inputs, hidden_layers)


@functools.partial(jax.jit, static_argnames=("graphdef", "hidden_layers"), donate_argnames=("cache",))
def prefill(graphdef, state, inputs: ModelInputs, cache: KVCache, hidden_layers: tuple[int, ...] = ()):
    """Jitted `VideoLLM.prefill` over (graphdef, state) from `nnx.split(model)`."""
    return nnx.merge(graphdef, state).prefill(inputs, cache, hidden_layers)


@functools.partial(jax.jit, static_argnames=("graphdef", "hidden_layers"), donate_argnames=("cache",))
def decode_step(graphdef, state, tokens: jax.Array, cache: KVCache, hidden_layers: tuple[int, ...] = ()):
    """Jitted `VideoLLM.decode_step` over (graphdef, state) from `nnx.split(model)`."""
    return nnx.merge(graphdef, state).decode_step(tokens, cache, hidden_layers)
