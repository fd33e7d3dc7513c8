"""Supervised fine-tuning with MeCo's objective: LM loss on the response + lambda * L_ST.

`GroundingModel` = the VideoLLM + MeCo's projector heads. A pipeline batch (see
`tasks.encoding` and `data.padding`: right-padded, fixed shapes per bucket) becomes
`ModelInputs` inside the jitted step (`batch_inputs`); the step computes

    loss = LM(response tokens) + st_weight * L_ST(structural tokens vs frames)

and applies one AdamW update to the trainable parameters (`optim.trainable_filter`), with
optional gradient accumulation over micro-batches (a `lax.scan`, so memory is one micro-batch).

With `SFTConfig.streaming` set (TimeScope), the prompt is not run as one sequence: the video is
streamed segment by segment into HVR memory (`memory.streaming.stream_forward`, the same attention
pattern as inference) and the question and response attend to that memory; a
`coarse_to_fine.fine_fraction` share of the samples reload the DVR of the segments around a
jittered ground-truth window (TimeScope's second SFT stage).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.memory import streaming as streaming_lib
from jaxgrounding.memory.hvr import HVRConfig
from jaxgrounding.model.config import ModelConfig
from jaxgrounding.model.video_llm import ModelInputs, VideoLLM
from jaxgrounding.model.vision import uniform_plan
from jaxgrounding.objectives.lm import next_token_loss
from jaxgrounding.objectives.structural import StructuralHeads, gather_states, pool_frame_states, structural_loss
from jaxgrounding.tasks import coarse_to_fine
from jaxgrounding.training import optim


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


def frame_targets(ranges_bk2: jax.Array, frame_valid_bf: jax.Array) -> jax.Array:
    """Uniform targets over each token's range of frames [first, last]: [B, K, F]."""
    f = jnp.arange(frame_valid_bf.shape[1])
    inside = (f >= ranges_bk2[..., :1]) & (f <= ranges_bk2[..., 1:]) & frame_valid_bf[:, None, :]
    inside = inside.astype(jnp.float32)
    return inside / jnp.maximum(jnp.sum(inside, axis=-1, keepdims=True), 1.0)


def _full_states(model: GroundingModel, batch: dict, plan: dict, dropout_key=None):
    """One causal pass over the whole prompt: (LM loss, tokens, structural-token states, frame
    states, frame validity)."""
    inputs = batch_inputs(batch, model.llm.config, plan)
    out = model.llm.forward(inputs, hidden_layers=(-2, -1), logits=False, dropout_key=dropout_key)
    mask = inputs.attention_mask
    lm, tokens = next_token_loss(model.llm, out.last_hidden_state, inputs.input_ids, batch["loss_mask"] & mask)
    frame_of_token = jnp.where(mask, batch["frame_of_token"], -1)
    frame_states, frame_valid = pool_frame_states(out.hidden_states[-1], frame_of_token, batch["grid_times"].shape[1])
    token_states = gather_states(out.hidden_states[-2], batch["struct_positions"])
    return lm, tokens, token_states, frame_states, frame_valid


def _streamed_states(model: GroundingModel, batch: dict, plan: dict, layout, hvr: HVRConfig, dropout_key=None):
    """The same quantities with the video streamed into memory (see module docstring); `batch`
    holds `memory.streaming.split_batch` arrays plus `reloaded` [B, N]."""
    out = streaming_lib.stream_forward(
        model.llm, layout, hvr, batch, plan, batch["reloaded"], hidden_layers=(-2,), dropout_key=dropout_key
    )
    lm, tokens = next_token_loss(model.llm, out.final, batch["suffix_ids"], batch["suffix_loss_mask"])
    token_states = gather_states(out.hidden[-2], batch["suffix_struct_positions"])
    return lm, tokens, token_states, out.frame_states, out.frame_valid


def sft_loss(model: GroundingModel, batch: dict, plan: dict, st_weight: float, streamed=None, dropout_key=None):
    """Returns (total loss, metrics dict) for one batch. `streamed`: None for one causal pass, or
    (BufferLayout, HVRConfig) for a streamed batch; `dropout_key`: LoRA input dropout (training)."""
    if streamed is None:
        lm, tokens, token_states, frame_states, frame_valid = _full_states(model, batch, plan, dropout_key)
    else:
        lm, tokens, token_states, frame_states, frame_valid = _streamed_states(
            model, batch, plan, *streamed, dropout_key=dropout_key
        )
    logits = model.heads(token_states, frame_states)
    kinds = batch["struct_kinds"] * batch["struct_positions_mask"] * batch["valid"][:, None]
    st = structural_loss(logits, kinds, frame_targets(batch["struct_ranges"], frame_valid), frame_valid)
    total = lm + st_weight * st["loss"]
    metrics = {
        "loss": total,
        "lm_loss": lm,
        "st_loss": st["loss"],
        "ent_loss": st["ent_loss"],
        "tst_loss": st["tst_loss"],
        "tokens": tokens,
        "logit_scale": jnp.exp(model.heads.logit_scale[...]),
    }
    return total, metrics


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    st_weight: float = 1.0  # lambda: L_ST weight (MeCo: 1)
    accumulate: int = 1  # micro-batches per update
    trainable: optim.TrainableConfig = optim.TrainableConfig()
    optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
    streaming: streaming_lib.StreamingConfig | None = None  # TimeScope: stream the video into memory
    coarse_to_fine: coarse_to_fine.CoarseToFineConfig = coarse_to_fine.CoarseToFineConfig()
    seed: int = 0  # of the coarse-to-fine augmentation


def device_batch(batch: dict) -> dict:
    """Only numeric arrays go to the device (ids, strings and bookkeeping stay on the host)."""
    return {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


class SFTTrainer:
    """Holds the split model, optimizer state and the jitted step.

    trainable: nnx State of the parameters that train; frozen: everything else (never copied
    into the optimizer). `step(batch)` returns host metrics; `model()` reassembles the model.
    """

    def __init__(
        self, model: GroundingModel, config: SFTConfig, frame_size: tuple[int, int], new_token_ids=(), mesh=None
    ):
        self.config = config
        self.mesh = mesh
        self.frame_size = tuple(frame_size)
        self.graphdef, self.trainable, self.frozen = nnx.split(model, optim.trainable_filter(config.trainable), ...)
        if not jax.tree.leaves(self.trainable):
            raise ValueError("nothing to train: the trainable filter selected no parameters")
        self.optimizer = optim.make_optimizer(config.optimizer, self.trainable)
        # An abstract model (nnx.eval_shape) gets an abstract optimizer state: compile-only uses.
        abstract = isinstance(jax.tree.leaves(self.trainable)[0], jax.ShapeDtypeStruct)
        init = jax.eval_shape if abstract else (lambda f, x: f(x))
        self.opt_state = init(self.optimizer.init, self.trainable)
        self.model_config = model.llm.config
        mask_rows = config.trainable.llm != "full" and config.trainable.embeddings == "new_tokens"
        self._row_mask = (tuple(int(i) for i in new_token_ids), mask_rows)
        self._streamed = None  # (BufferLayout, HVRConfig) once a streamed batch has been seen
        self._step = jax.jit(self._train_step, donate_argnums=(0, 1))

    def model(self) -> GroundingModel:
        return nnx.merge(self.graphdef, self.trainable, self.frozen)

    def _loss(self, trainable, frozen, batch, plan, key):
        model = nnx.merge(self.graphdef, trainable, frozen)
        return sft_loss(model, batch, plan, self.config.st_weight, self._streamed, key)

    def _train_step(self, trainable, opt_state, frozen, batch, plan, key_data):
        key = None if key_data is None else jax.random.wrap_key_data(key_data)
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        accumulate = self.config.accumulate
        if accumulate == 1:
            (_, metrics), grads = grad_fn(trainable, frozen, batch, plan, key)
        else:
            # [B, ...] -> [A, B / A, ...]; the vision plan is per micro-batch already.
            micro = jax.tree.map(lambda x: x.reshape(accumulate, x.shape[0] // accumulate, *x.shape[1:]), batch)

            def body(acc, xs):
                mb, i = xs
                micro_key = None if key is None else jax.random.fold_in(key, i)
                (_, m), g = grad_fn(trainable, frozen, mb, plan, micro_key)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            first = jax.tree.map(lambda x: x[0], micro)
            zero_metrics = jax.tree.map(
                jnp.zeros_like, jax.eval_shape(lambda: grad_fn(trainable, frozen, first, plan, key)[0][1])
            )
            (grads, metrics), _ = jax.lax.scan(body, (zeros, zero_metrics), (micro, jnp.arange(accumulate)))
            grads = jax.tree.map(lambda g: g / accumulate, grads)
            metrics = jax.tree.map(lambda m: m / accumulate, metrics)
        grads = optim.mask_token_rows(grads, *self._row_mask)
        metrics["grad_norm"] = optax.global_norm(grads)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, metrics

    def lower(self, batch: dict, rng=None):
        """`jax.jit(...).lower` of the train step for `batch` (arrays or ShapeDtypeStructs)."""
        plan = batch_plan(batch, self.model_config, self.frame_size)
        key_data = None if rng is None else jax.random.key_data(rng)
        return self._step.lower(self.trainable, self.opt_state, self.frozen, batch, plan, key_data)

    def streamed_arrays(self, batch: dict, step: int) -> dict:
        """Host side of a streamed step on this process's rows: the `split_batch` arrays and which
        segments each sample reloads (drawn per sample and step: `coarse_to_fine.sample_rng`)."""
        config = self.config
        arrays = streaming_lib.split_batch(batch, self.model_config, config.streaming, self.frame_size)
        num_segments = arrays["segment_valid"].shape[1]
        arrays["reloaded"] = coarse_to_fine.training_reloads(
            batch, config.streaming.segment_frames, num_segments, config.coarse_to_fine, seed=config.seed, step=step
        )
        for key in ("struct_kinds", "struct_positions_mask", "struct_ranges", "valid"):
            arrays[key] = np.asarray(batch[key])
        return device_batch(arrays)

    def streamed_plan(self, arrays: dict, micro_batch: int) -> dict:
        """Fixes the run's streaming layout from a (global-shaped) streamed batch and returns the
        vision plan of one segment of a micro-batch."""
        config = self.config
        num_segments = arrays["segment_valid"].shape[1]
        layout = streaming_lib.BufferLayout.build(
            config.streaming,
            arrays["prefix_ids"].shape[1],
            arrays["segment_valid"].shape[2] // config.streaming.segment_frames,
        )
        if self._streamed is not None and self._streamed[0] != layout:
            raise ValueError(f"the streaming layout changed between batches: {self._streamed[0]} -> {layout}")
        self._streamed = (layout, config.streaming.hvr)
        # The frames of all segments of a micro-batch go through the vision tower together.
        return streaming_lib.plan_for(self.model_config, config.streaming, self.frame_size, micro_batch * num_segments)

    def step(self, batch: dict, rng=None, *, step: int = 0) -> dict[str, float]:
        """One update on this process's rows `batch` of the global batch.

        rng: this step's key for LoRA input dropout (None: no dropout), the same on every process;
        step: the step being taken (seeds the coarse-to-fine augmentation). The train loop derives
        both from the run, so a resumed run draws the same.
        """
        b = batch["valid"].shape[0]
        if b % self.config.accumulate:
            raise ValueError(f"batch size {b} is not divisible by accumulate={self.config.accumulate}")
        # The plan is for one micro-batch of the global batch (each process holds a slice).
        micro = b * jax.process_count() // self.config.accumulate
        streamed = self.config.streaming is not None
        arrays = self.streamed_arrays(batch, step) if streamed else device_batch(batch)
        # Shapes first (processes pad their rows to their own buckets), then the plan from them.
        arrays = parallel.agree_shapes(arrays)
        if streamed:
            plan = self.streamed_plan(arrays, micro)
        else:
            plan = batch_plan(arrays, self.model_config, self.frame_size, batch_size=micro)
        key_data = None if rng is None else np.asarray(jax.random.key_data(rng))
        if self.mesh is not None:
            arrays = parallel.global_batch(arrays, self.mesh)
            if key_data is not None:
                key_data = parallel.replicated(key_data, self.mesh)
        self.trainable, self.opt_state, metrics = self._step(
            self.trainable, self.opt_state, self.frozen, arrays, plan, key_data
        )
        return {k: float(v) for k, v in jax.device_get(metrics).items()}
