"""Supervised fine-tuning with MeCo's objective: LM loss on the response + lambda * L_ST.

The model is `grounding_model.GroundingModel` (the VideoLLM + MeCo's projector heads); the
pipeline batch becomes its inputs inside the jitted step (`grounding_model.batch_inputs`), and

    loss = LM(response tokens) + st_weight * L_ST(structural tokens vs frames)

is the loss `training.trainer.Trainer` differentiates (the `SFT` objective, registered for the
"meco" and "timescope" methods).

With `SFTConfig.streaming` set (TimeScope), the prompt is not run as one sequence: the video is
streamed segment by segment into HVR memory (`memory.streaming.stream_forward`, the same attention
pattern as inference) and the question and response attend to that memory; a
`coarse_to_fine.fine_fraction` share of the samples reload the DVR of the segments around a
jittered ground-truth window (TimeScope's second SFT stage). The pipeline's transform did the cut and
the draw (`tasks.streamed`): the batch holds `data.schema.STREAMED` arrays.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrounding.grounding_model import GroundingModel, batch_inputs, batch_plan, device_batch
from jaxgrounding.memory import streaming as streaming_lib
from jaxgrounding.memory.hvr import HVRConfig
from jaxgrounding.model.config import ModelConfig
from jaxgrounding.objectives import pointer
from jaxgrounding.objectives.lm import next_token_loss
from jaxgrounding.objectives.structural import gather_states, pool_frame_states, structural_loss
from jaxgrounding.training.trainer import register_objective


def frame_targets(ranges_bk2: jax.Array, frame_valid_bf: jax.Array) -> jax.Array:
    """Uniform targets over each token's range of frames [first, last]: [B, K, F]."""
    f = jnp.arange(frame_valid_bf.shape[1])
    inside = (f >= ranges_bk2[..., :1]) & (f <= ranges_bk2[..., 1:]) & frame_valid_bf[:, None, :]
    inside = inside.astype(jnp.float32)
    return inside / jnp.maximum(jnp.sum(inside, axis=-1, keepdims=True), 1.0)


def _causal_pass(model: GroundingModel, batch: dict, plan: dict, hidden_layers=(), dropout_key=None):
    """One causal pass over the whole prompt and response: (inputs, model output, LM loss, tokens)."""
    inputs = batch_inputs(batch, model.llm.config, plan)
    out = model.llm.forward(inputs, hidden_layers=hidden_layers, logits=False, dropout_key=dropout_key)
    mask = inputs.attention_mask
    lm, tokens = next_token_loss(model.llm, out.last_hidden_state, inputs.input_ids, batch["loss_mask"] & mask)
    return inputs, out, lm, tokens


def _full_states(model: GroundingModel, batch: dict, plan: dict, dropout_key=None):
    """One causal pass over the whole prompt: (LM loss, tokens, structural-token states, frame
    states, frame validity)."""
    inputs, out, lm, tokens = _causal_pass(model, batch, plan, (-2, -1), dropout_key)
    mask = inputs.attention_mask
    frame_of_token = jnp.where(mask, batch["frame_of_token"], -1)
    frame_states, frame_valid = pool_frame_states(out.hidden_states[-1], frame_of_token, batch["grid_times"].shape[1])
    token_states = gather_states(out.hidden_states[-2], batch["struct_positions"])
    return lm, tokens, token_states, frame_states, frame_valid


def _streamed_states(model: GroundingModel, batch: dict, plan: dict, layout, hvr: HVRConfig, dropout_key=None):
    """The same quantities with the video streamed into memory (see module docstring); `batch`
    holds `data.schema.STREAMED` arrays (`reloaded` [B, N]: the segments whose DVR the answer sees)."""
    out = streaming_lib.stream_forward(
        model.llm, layout, hvr, batch, plan, batch["reloaded"], hidden_layers=(-2,), dropout_key=dropout_key
    )
    lm, tokens = next_token_loss(model.llm, out.final, batch["suffix_ids"], batch["suffix_loss_mask"])
    token_states = gather_states(out.hidden[-2], batch["suffix_struct_positions"])
    return lm, tokens, token_states, out.frame_states, out.frame_valid


def _pointer_sft_loss(model: GroundingModel, batch: dict, plan: dict, weight: float, dropout_key=None):
    """LM loss + weight * attention pointers (`objectives.pointer`): the batch's structural arrays are time pointers,
    the state that writes each number (`struct_positions`) and the grid it names (`struct_ranges`)."""
    inputs, out, lm, tokens = _causal_pass(model, batch, plan, (-2,), dropout_key)
    mask = inputs.attention_mask
    logprobs = pointer.last_layer_attention_logprobs(
        model.llm, out.hidden_states[-2], inputs.positions, mask, batch["struct_positions"]
    )
    targets = pointer.grid_targets(jnp.where(mask, batch["frame_of_token"], -1), batch["struct_ranges"])
    valid = batch["struct_kinds"] * batch["struct_kinds_mask"] * batch["valid"][:, None] > 0
    ptr = pointer.pointer_loss(logprobs, targets, valid)
    total = lm + weight * ptr
    return total, {"loss": total, "lm_loss": lm, "pointer_loss": ptr, "tokens": tokens}


def sft_loss(
    model: GroundingModel,
    batch: dict,
    plan: dict,
    st_weight: float,
    streamed=None,
    dropout_key=None,
    time_pointers: bool = False,
):
    """Returns (total loss, metrics dict) for one batch. `streamed`: None for one causal pass, or
    (BufferLayout, HVRConfig) for a streamed batch; `dropout_key`: LoRA input dropout (training).
    A batch without structural tokens (free-text answers: Time-R1's format) has the LM loss alone; with
    `time_pointers` its structural arrays are time pointers, trained as attention pointers with weight `st_weight`."""
    if time_pointers and "struct_kinds" in batch:
        if streamed is not None:
            raise ValueError("time pointers are trained on one causal pass, not a streamed batch")
        return _pointer_sft_loss(model, batch, plan, st_weight, dropout_key)
    if "struct_kinds" not in batch:
        if streamed is not None:
            raise ValueError("streamed SFT needs structural-token batches")
        _, _, lm, tokens = _causal_pass(model, batch, plan, dropout_key=dropout_key)
        return lm, {"loss": lm, "lm_loss": lm, "tokens": tokens}
    if streamed is None:
        lm, tokens, token_states, frame_states, frame_valid = _full_states(model, batch, plan, dropout_key)
    else:
        lm, tokens, token_states, frame_states, frame_valid = _streamed_states(
            model, batch, plan, *streamed, dropout_key=dropout_key
        )
    logits = model.heads(token_states, frame_states)
    kinds = batch["struct_kinds"] * batch["struct_kinds_mask"] * batch["valid"][:, None]
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
    st_weight: float  # lambda: L_ST weight (MeCo: 1); the time pointers' weight with `time_pointers`
    streaming: streaming_lib.StreamingConfig | None  # TimeScope: stream the video into memory
    time_pointers: bool = False  # answer SFT: structural arrays are time pointers (`objectives.pointer`)


@dataclasses.dataclass(frozen=True)
class SFTLoss:
    """`sft_loss` as the trainer's static loss: everything the trace depends on is a field (hashable)."""

    st_weight: float
    streamed: tuple[streaming_lib.BufferLayout, HVRConfig] | None = None
    time_pointers: bool = False

    def __call__(self, model: GroundingModel, arrays: dict, plan: dict, key):
        return sft_loss(model, arrays, plan, self.st_weight, self.streamed, key, self.time_pointers)


class SFT:
    """The SFT objective for `training.trainer.Trainer`: MeCo's one causal pass, or with `config.streaming`
    TimeScope's streamed pass over batches the pipeline already cut into prefix / segments / suffix."""

    updates_per_batch = 1

    def __init__(self, config: SFTConfig, model_config: ModelConfig, frame_size: tuple[int, int]):
        self.config = config
        self.model_config = model_config
        self.frame_size = tuple(frame_size)

    def start(self, model: GroundingModel, mesh=None) -> None:
        del model, mesh

    def host_arrays(self, batch: dict, step: int, policy=None, skip=None) -> tuple[dict, dict]:
        # Supervised: the batch alone, prepared (streamed cut and augmentation included) and its failures counted
        # by the pipeline.
        del step, policy, skip
        return device_batch(batch), {}

    def prepare(self, arrays: dict, micro_batch: int) -> tuple[dict, SFTLoss]:
        """The vision plan of one micro-batch and the loss, from (global-shaped) host arrays or their shapes."""
        streaming = self.config.streaming
        if streaming is None:
            plan = batch_plan(arrays, self.model_config, self.frame_size, batch_size=micro_batch)
            return plan, SFTLoss(self.config.st_weight, time_pointers=self.config.time_pointers)
        if "segment_valid" not in arrays:
            raise ValueError(
                "streamed SFT needs batches cut by the streamed transform (tasks.streamed: structural examples); "
                f"this batch has {sorted(arrays)}"
            )
        num_segments = np.shape(arrays["segment_valid"])[1]
        segment_tokens = np.shape(arrays["segment_valid"])[2]
        layout = streaming_lib.BufferLayout.build(
            streaming, np.shape(arrays["prefix_ids"])[1], segment_tokens // streaming.segment_frames
        )
        # The frames of all segments of a micro-batch go through the vision tower together.
        plan = streaming_lib.plan_for(self.model_config, streaming, self.frame_size, micro_batch * num_segments)
        return plan, SFTLoss(self.config.st_weight, (layout, streaming.hvr))


@register_objective("meco", "timescope", "answer_sft")
def sft_objective(config, model_config: ModelConfig, checkpoint: str, samples) -> SFT:
    """MeCo and TimeScope train with SFT (TimeScope's config has `streaming` settings)."""
    sft = SFTConfig(
        st_weight=config.train.st_weight,
        streaming=streaming_lib.StreamingConfig.from_config(config) if config.memory == "streaming" else None,
        # The supervised warm start of a GRPO config (`experiment.warm_start_config`) writes its times as text.
        time_pointers=config.method == "answer_sft",
    )
    return SFT(sft, model_config, tuple(config.data.frame_size))
