"""The grounding model and the adapter from a pipeline batch to its inputs.

`GroundingModel` is the video-LLM plus MeCo's projector heads: what every method trains and what
inference grounds with. A pipeline batch (see `tasks.encoding` and `data.padding`: right-padded,
fixed shapes per bucket) becomes `ModelInputs` with `batch_inputs` inside a jitted function; the
vision tower's attention plan comes from the batch's shapes on the host (`batch_plan`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding.model.config import ModelConfig
from jaxgrounding.model.video_llm import ModelInputs, VideoLLM
from jaxgrounding.model.vision import uniform_plan
from jaxgrounding.objectives.structural import StructuralHeads


class GroundingModel(nnx.Module):
    """The video-LLM plus MeCo's frame / structural-token projector heads and logit scale."""

    def __init__(self, llm: VideoLLM, *, rngs: nnx.Rngs):
        self.llm = llm
        self.heads = StructuralHeads(llm.config.text.hidden_size, rngs=rngs)


def batch_plan(batch: dict, config: ModelConfig, frame_size: tuple[int, int], batch_size: int | None = None) -> dict:
    """The vision tower's attention plan for a bucketed batch (host side, cached per shape):
    every example has `grid_times.shape[1]` temporal grids of frame_size / patch_size patches.
    `batch_size` overrides the batch's own (a micro-batch's plan under accumulation)."""
    b, grids = np.shape(batch["grid_times"])
    b = batch_size or b
    p = config.vision.patch_size
    return uniform_plan(b, grids, frame_size[0] // p, frame_size[1] // p, config.vision)


def batch_inputs(batch: dict, config: ModelConfig, plan: dict) -> ModelInputs:
    """Pipeline batch -> ModelInputs (traceable).

    The k-th visual embedding of example b goes to the k-th `<|video_pad|>` of its text;
    embeddings of padding frames (beyond the example's own frame count) find no placeholder
    and are dropped.
    """
    ids = batch["input_ids"]
    b, t = ids.shape
    mask = batch["input_ids_mask"] & batch["valid"][:, None]
    pixels = batch["pixel_values"]
    per_example = pixels.shape[1] // config.vision.spatial_merge_size**2
    is_video = (ids == config.video_token_id) & mask
    slots = jax.vmap(lambda row: jnp.nonzero(row, size=per_example, fill_value=t)[0])(is_video)
    flat_slots = jnp.where(slots < t, jnp.arange(b)[:, None] * t + slots, b * t).reshape(-1)
    positions = jnp.moveaxis(batch["positions"], -1, 0)
    return ModelInputs(
        input_ids=ids,
        attention_mask=mask,
        positions=positions,
        next_position=jnp.max(positions, axis=(0, 2)) + 1,
        pixel_values=pixels.reshape(-1, pixels.shape[-1]),
        vision=plan,
        visual_slots=flat_slots,
    )


def device_batch(batch: dict) -> dict:
    """Only numeric arrays go to the device (ids, strings and bookkeeping stay on the host)."""
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}
