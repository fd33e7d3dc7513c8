"""MeCo grounding inference: generate, read the structural tokens, assign frames, rank windows.

For each prompt (a batch from `StructuralEncoder.encode_prompt` through the pipeline):
1. generate the response with the KV cache, keeping for every generated token the
   second-to-last layer's state that predicted it;
2. frame states: the prompt's last-layer states pooled per temporal grid (as in training);
3. similarity of every generated `<ent>` / `<tst>` to every frame through the trained heads;
4. `tasks.structural.assign_windows` turns the similarities into ranked windows in seconds,
   using the true timestamps of the sampled frames.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding import sampling
from jaxgrounding.objectives.structural import pool_frame_states
from jaxgrounding.tasks.structural import GroundedWindow, assign_windows
from jaxgrounding.training.sft import GroundingModel, device_batch, batch_inputs, batch_plan


@dataclasses.dataclass(frozen=True)
class AssignmentConfig:
    threshold: float | None = 0.7
    dilation: int = 1
    nms_iou: float = 0.7


@dataclasses.dataclass
class Prediction:
    text: str
    windows: list[GroundedWindow]
    similarity: np.ndarray  # [K, F] logits of the generated structural tokens over the frames
    kinds: list[str]
    frame_times: np.ndarray  # [F] start of each frame (temporal grid), seconds
    frame_duration: float


@jax.jit
def _similarities(heads_graphdef, heads_state, predicting_bne, frame_states_bfe):
    heads = nnx.merge(heads_graphdef, heads_state)
    return heads(predicting_bne, frame_states_bfe)


def predict(
    model: GroundingModel,
    batch: dict,
    tokenizer,
    frame_size,
    sampling_config: sampling.SamplingConfig,
    assignment: AssignmentConfig = AssignmentConfig(),
    rng=None,
) -> list[Prediction]:
    """Predictions for the valid rows of one prompt batch."""
    config = model.llm.config
    arrays = device_batch(batch)
    inputs = batch_inputs(arrays, config, batch_plan(arrays, config, frame_size))
    end_ids = [tokenizer.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if tokenizer.tokenizer.eos_token_id is not None:
        end_ids.append(tokenizer.tokenizer.eos_token_id)
    gen = sampling.generate(
        model.llm,
        inputs,
        sampling_config,
        end_ids=sorted(set(end_ids)),
        rng=rng,
        hidden_layers=(-2,),
        prompt_layers=(-1,),
    )
    mask = np.asarray(inputs.attention_mask)
    frame_of_token = jnp.where(mask, arrays["frame_of_token"], -1)
    num_frames = arrays["grid_times"].shape[1]
    frame_states, frame_valid = pool_frame_states(gen.prompt_hidden[-1], frame_of_token, num_frames)
    sims = np.asarray(_similarities(*nnx.split(model.heads), gen.predicting[-2], frame_states))
    tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
    frame_valid = np.asarray(frame_valid)
    kind_of_id = {tokenizer.ent_id: "ent", tokenizer.tst_id: "tst"}
    predictions = []
    for b in np.flatnonzero(batch["valid"]):
        generated = tokens[b, : lengths[b]]
        where = [i for i, tok in enumerate(generated) if int(tok) in kind_of_id]
        kinds = [kind_of_id[int(generated[i])] for i in where]
        frames = int(frame_valid[b].sum())
        sim = sims[b][where][:, :frames] if where else np.zeros((0, frames), np.float32)
        times = np.asarray(batch["grid_times"][b][:frames], np.float64)
        duration = float(batch["duration"][b])
        grid_duration = float(batch["grid_duration"][b])
        windows = assign_windows(
            sim,
            kinds,
            times,
            grid_duration,
            duration,
            threshold=assignment.threshold,
            dilation=assignment.dilation,
            nms_iou=assignment.nms_iou,
        )
        text = tokenizer.tokenizer.decode(generated, skip_special_tokens=False)
        predictions.append(Prediction(text, windows, sim, kinds, times, grid_duration))
    return predictions
