"""MeCo grounding inference: generate, read the structural tokens, assign frames, rank windows.

For each prompt (a batch from `StructuralEncoder.encode_prompt` through the pipeline):
1. generate the response with the KV cache, keeping for every generated token the
   second-to-last layer's state that predicted it;
2. frame states: the prompt's last-layer states pooled per temporal grid (as in training);
3. similarity of every generated `<ent>` / `<tst>` to every frame through the trained heads;
4. `tasks.structural.assign_windows` turns the similarities into ranked windows in seconds,
   using the true timestamps of the sampled frames.

`predict_streaming` is TimeScope's coarse-to-fine version: the video is streamed into memory
(`memory.streaming`), the coarse stage answers over the HVR of the whole video and reads its
windows at the HVR's resolution (frame states pooled like it, `coarse_to_fine.hvr_frames`), the
fine stage reloads the DVR of the segments around the coarse window and answers again, assigning
single frames inside the reloaded region only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding import sampling
from jaxgrounding.grounding_model import GroundingModel, batch_inputs, batch_plan, device_batch
from jaxgrounding.memory import streaming
from jaxgrounding.objectives.structural import pool_frame_states
from jaxgrounding.tasks import coarse_to_fine
from jaxgrounding.tasks.structural import GroundedWindow, assign_windows, time_softmax


@dataclasses.dataclass(frozen=True)
class AssignmentConfig:
    """How structural-token similarities become windows (`tasks.structural.assign_windows`); built from the
    config's `assignment` section (its values are the defaults: configs/meco.py). threshold None: no threshold."""

    threshold: float | None
    dilation: int
    nms_iou: float

    @classmethod
    def from_config(cls, config) -> AssignmentConfig:
        a = config.assignment
        return cls(threshold=a.threshold or None, dilation=a.dilation, nms_iou=a.nms_iou)


@dataclasses.dataclass
class Prediction:
    text: str
    windows: list[GroundedWindow]
    similarity: np.ndarray  # [K, F] logits of the generated structural tokens over the frames
    kinds: list[str]
    frame_times: np.ndarray  # [F] start of each frame (temporal grid), seconds
    frame_duration: float
    coarse: Prediction | None = None  # coarse-to-fine: the coarse stage's prediction
    reloaded: list[int] | None = None  # coarse-to-fine: the segments whose DVR the fine stage saw
    # coarse-to-fine: the coarse interval overlapped more than max_reload_segments segments, and those with the
    # highest coarse confidence were reloaded
    reload_capped: bool = False

    @property
    def score(self) -> float:
        """Confidence of the answer: its top window's score (the structural token's highest softmax-over-time
        probability inside it), 0 without a window."""
        return float(self.windows[0].score) if self.windows else 0.0


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
    assignment: AssignmentConfig,
    rng=None,
) -> list[Prediction]:
    """Predictions for the valid rows of one prompt batch."""
    config = model.llm.config
    arrays = device_batch(batch)
    inputs = batch_inputs(arrays, config, batch_plan(arrays, config, frame_size))
    gen = sampling.generate(
        model.llm,
        inputs,
        sampling_config,
        end_ids=_end_ids(tokenizer),
        rng=rng,
        hidden_layers=(-2,),
        prompt_layers=(-1,),
    )
    mask = np.asarray(inputs.attention_mask)
    frame_of_token = jnp.where(mask, arrays["frame_of_token"], -1)
    num_frames = arrays["grid_times"].shape[1]
    frame_states, frame_valid = pool_frame_states(gen.prompt_hidden[-1], frame_of_token, num_frames)
    return _read(model, batch, tokenizer, assignment, gen, frame_states, np.asarray(frame_valid))


def generate_answers(model: GroundingModel, batch: dict, tokenizer, frame_size, sampling_config, rng=None) -> list[str]:
    """The generated text of every valid row of a prompt batch (answers written as text: Time-R1's format)."""
    config = model.llm.config
    arrays = device_batch(batch)
    inputs = batch_inputs(arrays, config, batch_plan(arrays, config, frame_size))
    end_ids = _end_ids(tokenizer)
    gen = sampling.generate(model.llm, inputs, sampling_config, end_ids=end_ids, rng=rng)
    tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
    return [
        tokenizer.tokenizer.decode([int(t) for t in tokens[b, : lengths[b]] if int(t) not in end_ids])
        for b in np.flatnonzero(batch["valid"])
    ]


def sample_predictions(
    model: GroundingModel, batch: dict, tokenizer, assignment: AssignmentConfig, gen, num_samples: int
) -> list[Prediction | None]:
    """The Prediction of every row p * G + g of a G-sample generation over the prompt batch `batch` (None for
    padding prompts): each sample's structural tokens against its prompt's frame states, which its G samples
    share. `gen` must carry `hidden_layers=(-2,)` and `prompt_layers=(-1,)` (`sampling.generate`)."""
    g = num_samples
    mask = jnp.asarray(batch["input_ids_mask"]) & jnp.asarray(batch["valid"])[:, None]
    frame_of_token = jnp.where(mask, jnp.asarray(batch["frame_of_token"]), -1)
    frame_states, frame_valid = pool_frame_states(gen.prompt_hidden[-1], frame_of_token, np.shape(batch["grid_times"])[1])
    rows = {k: np.repeat(np.asarray(batch[k]), g, axis=0) for k in ("valid", "grid_times", "duration", "grid_duration")}
    predictions = _read(
        model, rows, tokenizer, assignment, gen, jnp.repeat(frame_states, g, axis=0), np.repeat(np.asarray(frame_valid), g, axis=0)
    )
    out: list[Prediction | None] = [None] * len(rows["valid"])
    for r, prediction in zip(np.flatnonzero(rows["valid"]), predictions):
        out[r] = prediction
    return out


def _end_ids(tokenizer) -> list[int]:
    end_ids = [tokenizer.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if tokenizer.tokenizer.eos_token_id is not None:
        end_ids.append(tokenizer.tokenizer.eos_token_id)
    return sorted(set(end_ids))


def _read(model, batch, tokenizer, assignment, gen, frame_states, frame_valid, allowed=None) -> list[Prediction]:
    """Generated structural tokens x frame states -> one Prediction per valid row. `allowed`
    [B, F] bool restricts the frames a token may be assigned to (the fine stage's region)."""
    sims = np.asarray(_similarities(*nnx.split(model.heads), gen.predicting[-2], jnp.asarray(frame_states)))
    tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
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
            allowed=None if allowed is None else allowed[b][:frames],
        )
        text = tokenizer.tokenizer.decode(generated, skip_special_tokens=False)
        predictions.append(Prediction(text, windows, sim, kinds, times, grid_duration))
    return predictions


def predict_streaming(
    model: GroundingModel,
    batch: dict,
    tokenizer,
    frame_size,
    sampling_config: sampling.SamplingConfig,
    assignment: AssignmentConfig,
    streaming_config: streaming.StreamingConfig,
    c2f: coarse_to_fine.CoarseToFineConfig,
    rng=None,
    fine: bool = True,
) -> list[Prediction]:
    """Coarse-to-fine predictions for the valid rows of one prompt batch (see module docstring).
    With `fine=False` only the coarse stage runs. The returned windows are the fine stage's (the
    coarse stage's where the fine stage found none); `Prediction.coarse` keeps the coarse ones."""
    llm = model.llm
    rng = jax.random.key(0) if rng is None else rng
    coarse_key, fine_key = jax.random.split(rng)
    arrays = streaming.split_batch(batch, llm.config, streaming_config, frame_size)
    streamed = streaming.stream_prompt(llm, arrays, streaming_config, frame_size)
    layout, frame_states, frame_valid = streamed.layout, streamed.frame_states, streamed.frame_valid
    suffix = streaming.suffix_inputs(arrays)
    b = arrays["suffix_ids"].shape[0]
    context = streaming.answer_memory(layout, streamed.memory)
    generate = dict(end_ids=_end_ids(tokenizer), hidden_layers=(-2,))
    gen = sampling.generate(llm, suffix, sampling_config, rng=coarse_key, memory=context, **generate)
    r = streaming_config.hvr.temporal
    slot_states, slot_valid, slot_times, slot_duration = coarse_to_fine.hvr_frames(
        np.asarray(frame_states), np.asarray(frame_valid), batch["grid_times"], batch["grid_duration"], r
    )
    slots = dict(valid=batch["valid"], duration=batch["duration"], grid_times=slot_times, grid_duration=slot_duration)
    coarse = _read(model, slots, tokenizer, assignment, gen, jnp.asarray(slot_states), slot_valid)
    if not fine:
        return coarse

    rows = np.flatnonzero(batch["valid"])
    n = arrays["segment_valid"].shape[1]
    chosen = -np.ones((b, c2f.max_reload_segments), np.int64)
    allowed = np.zeros(frame_valid.shape, bool)
    capped = np.zeros(b, bool)
    for row, prediction in zip(rows, coarse):
        if not prediction.windows:
            continue  # nothing to refine: the coarse answer stands
        frames = int(frame_valid[row].sum())
        grid_times = np.asarray(batch["grid_times"][row][:frames], np.float64)
        spans = coarse_to_fine.segment_spans(
            grid_times, float(batch["grid_duration"][row]), streaming_config.segment_frames, n
        )
        top = prediction.windows[0]
        scores = None
        if top.token_index >= 0:  # the top token's softmax over the slots: where the coarse stage is most confident
            probabilities = time_softmax(prediction.similarity)[top.token_index]
            scores = coarse_to_fine.segment_scores(probabilities, streaming_config.segment_frames // r, n)
        segments, capped[row] = coarse_to_fine.reload_segments((top.start, top.end), spans, c2f, scores)
        chosen[row, : segments.size] = segments
        for k in segments:
            allowed[row, k * streaming_config.segment_frames : (k + 1) * streaming_config.segment_frames] = True
        allowed[row, frames:] = False
    dvr = streamed.dvr.gather(chosen)
    context = streaming.answer_memory(layout, streamed.memory, dvr, jnp.asarray(chosen, jnp.int32))
    gen = sampling.generate(llm, suffix, sampling_config, rng=fine_key, memory=context, **generate)
    refined = _read(model, batch, tokenizer, assignment, gen, frame_states, frame_valid, allowed=allowed)
    predictions = []
    for row, first, second in zip(rows, coarse, refined):
        if not second.windows or not (chosen[row] >= 0).any():
            second = dataclasses.replace(second, windows=first.windows)
        second.coarse = first
        second.reloaded = [int(k) for k in chosen[row] if k >= 0]
        second.reload_capped = bool(capped[row])
        predictions.append(second)
    return predictions
