"""Invert4TVG's reinforcement fine-tuning: GRPO on temporal grounding plus inversion tasks.

One training step (Invert4TVG, Chen et al. 2025, sec. 3; GRPO as TRL's GRPOTrainer and Tunix's
GRPO learner define it):

1. the step's task: grounding with probability `grounding_prob`, otherwise one of verb
   completion / action recognition / video description, uniformly (`inversion.sample_task`, a
   function of the seed and the step, so a resumed run draws the same);
2. rollouts: every prompt is prefilled once and G = `num_samples` completions are drawn from it at
   `temperature` (`sampling.generate`: the G samples share the prompt's KV), with their float32
   log-probabilities;
3. rewards on the host (`tasks.rewards`: IoU + format for grounding, the inversion reward + format
   for the inversion tasks) and group-normalised advantages (`objectives.grpo.group_advantages`).
   With `answer_format = "structural"` the model answers grounding prompts as MeCo does (`<ent>`/`<tst>`
   after query-focused captions) and the IoU is that of the top window its structural tokens select
   through the frame similarities (`inference.sample_predictions`), so a model trained by SFT with L_ST
   continues with GRPO;
4. `num_iterations` optimizer updates on that rollout batch (`Objective.updates_per_batch`), each
   the clipped surrogate + beta * KL of `objectives.grpo.grpo_loss`. With one iteration the old
   policy is the current one (ratio exactly 1, as TRL does); with more, the old log-probs are scored
   once before the first update. The reference policy is the same weights with the LoRA adapters
   switched off (`lora.adapters_disabled`), or a frozen copy of the starting weights when every
   weight trains.

The training forward shares each prompt too (`completion_logprobs`): the prompt (video included)
runs once per prompt, its keys and values become a memory its G completions attend to, and the
log-probabilities come from the chunked `objectives.lm.token_logprobs`, as in the LM loss.
Everything a step draws derives from (seed, step), so a run killed and resumed from a checkpoint
repeats the same rollouts, rewards and losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding import inference, parallel, sampling, settings
from jaxgrounding.data import padding
from jaxgrounding.data.pipeline import DataFailureError
from jaxgrounding.data import video as video_lib
from jaxgrounding.data.sample import Sample
from jaxgrounding.memory import streaming as streaming_lib
from jaxgrounding.grounding_model import GroundingModel, batch_inputs, batch_plan, device_batch
from jaxgrounding.model.config import ModelConfig
from jaxgrounding.model.decoder import Memory
from jaxgrounding.model.lora import adapters_disabled
from jaxgrounding.objectives import grpo as grpo_lib
from jaxgrounding.objectives.lm import lm_head_matrix, token_logprobs
from jaxgrounding.tasks import inversion, rewards, templates, timestamps
from jaxgrounding.tasks.encoding import ChatEncoder, EncoderConfig, clip
from jaxgrounding.training.trainer import register_objective

# Keys of the prompt arrays (one row per prompt) and of the completion arrays (one row per sample).
PROMPT_KEYS = ("input_ids", "input_ids_mask", "positions", "pixel_values", "grid_times", "valid")
COMPLETION_KEYS = ("completion_ids", "completion_mask", "advantages", "old_logps", "ref_logps")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    num_samples: int  # G completions per prompt
    temperature: float  # of the rollouts (and of the log-probs the loss uses)
    top_p: float
    max_new_tokens: int
    num_iterations: int  # optimizer updates per rollout batch
    beta: float  # KL weight (0: no reference policy is run)
    epsilon_low: float
    epsilon_high: float
    kl: str  # "k3" | "k1" | "k2"
    loss_type: str  # "grpo" | "bnpo" | "dr_grpo" | "dapo"
    importance_sampling: str  # "token" | "sequence"
    scale_rewards: str  # "group" | "batch" | "none"
    advantage_estimator: str  # "grpo" | "rloo"
    grounding_prob: float  # probability that a step is a grounding step (else an inversion task)
    inversion_tasks: tuple[str, ...]
    iou: str  # "plain" | "distance_weighted"
    rewards: tuple[str, ...]  # registered reward names, summed per completion over those that apply
    thinking: bool  # the grounding prompt asks for <think> reasoning first
    seed: int
    # "timestamps": Time-R1's text answer; "structural": MeCo's, its windows read through `assignment`.
    answer_format: str = "timestamps"
    assignment: inference.AssignmentConfig | None = None
    # TimeScope's streamed memory: each prompt's video is streamed into HVR memory (the coarse stage) and its G
    # completions attend to that one memory; None: the whole prompt in one causal pass.
    streaming: streaming_lib.StreamingConfig | None = None


def _prompt_context(model: GroundingModel, arrays: dict, plan, streamed):
    """What each prompt's completions attend to: (memory [B rows], the prompt's last final state [B, E], the
    position of completion token 0 [B]). The whole prompt runs once (`streamed` None), or with `streamed`
    = (BufferLayout, HVRConfig) the video is streamed into memory (`memory.streaming.stream_context`, the coarse
    stage: HVR only) and the question after the video attends to it."""
    llm = model.llm
    if streamed is None:
        inputs = batch_inputs({k: arrays[k] for k in PROMPT_KEYS}, llm.config, plan)
        embeds = llm.embed_inputs(inputs)
        context = Memory.empty(llm.config, inputs.input_ids.shape[0])
    else:
        layout, hvr = streamed
        b, n = arrays["segment_valid"].shape[:2]
        context, _, _ = streaming_lib.stream_context(llm, layout, hvr, arrays, plan, jnp.zeros((b, n), bool))
        inputs = streaming_lib.suffix_inputs(arrays)  # the question after the video
        embeds = llm.decoder.embed(inputs.input_ids)
    mask = inputs.attention_mask
    final, _, (keys, values, _) = llm.decoder.attend(embeds, inputs.positions, mask, context)
    last = jnp.max(jnp.where(mask, jnp.arange(mask.shape[1]), -1), axis=1)
    memory = Memory(
        keys=jnp.concatenate([context.keys, keys.astype(context.keys.dtype)], axis=2),
        values=jnp.concatenate([context.values, values.astype(context.values.dtype)], axis=2),
        valid=jnp.concatenate([context.valid, mask], axis=1),
    )
    return memory, final[jnp.arange(mask.shape[0]), last], inputs.next_position


def completion_logprobs(model: GroundingModel, arrays: dict, plan, num_samples: int, temperature: float, streamed=None):
    """log p(completion token n | prompt, tokens < n) for rows p * G + g: [B * G, N] float32.

    The prompt runs once per prompt (`_prompt_context`: the whole prompt, or the streamed video and the question);
    its rotated keys and values are repeated G times as the memory the completions attend to (`Decoder.attend`),
    so the video is never encoded G times. The first completion token is predicted by the prompt's last real
    token, the others by the completion's own states.
    """
    llm = model.llm
    memory, last_state, next_position = _prompt_context(model, arrays, plan, streamed)
    g = num_samples
    first_state = jnp.repeat(last_state, g, axis=0)  # [R, E]
    memory = Memory(
        keys=jnp.repeat(memory.keys, g, axis=1),
        values=jnp.repeat(memory.values, g, axis=1),
        valid=jnp.repeat(memory.valid, g, axis=0),
    )
    ids = arrays["completion_ids"]
    r, n = ids.shape
    fed = ids[:, :-1]
    start = jnp.repeat(next_position, g)  # [R]: the position of completion token 0
    positions = jnp.broadcast_to((start[:, None] + jnp.arange(n - 1))[None], (3, r, n - 1))
    states, _, _ = llm.decoder.attend(llm.decoder.embed(fed), positions, arrays["completion_mask"][:, :-1], memory)
    hidden = jnp.concatenate([first_state[:, None].astype(states.dtype), states], axis=1)
    return token_logprobs(hidden, lm_head_matrix(llm), ids, temperature=temperature)


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
    """`grpo_loss` over `completion_logprobs` as the trainer's static loss (hashable fields only)."""

    num_samples: int
    temperature: float
    beta: float
    epsilon_low: float
    epsilon_high: float
    kl: str
    loss_type: str
    importance_sampling: str
    stored_old: bool  # num_iterations > 1: the old log-probs were scored before the first update
    max_completion_length: int
    accumulate: int  # micro-batches per update: the trainer averages their losses
    streamed: tuple | None = None  # (BufferLayout, HVRConfig): the prompts' videos are streamed into memory

    def __call__(self, model: GroundingModel, arrays: dict, plan, key):
        del key  # no dropout in RL updates (the rollouts had none either)
        logps = completion_logprobs(model, arrays, plan, self.num_samples, self.temperature, self.streamed)
        mask = arrays["completion_mask"].astype(jnp.float32)
        old = arrays["old_logps"] if self.stored_old else jax.lax.stop_gradient(logps)
        loss, metrics = grpo_lib.grpo_loss(
            logps,
            old,
            arrays["ref_logps"] if self.beta else jax.lax.stop_gradient(logps),
            arrays["advantages"],
            mask,
            beta=self.beta,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            kl=self.kl,
            loss_type=self.loss_type,
            importance_sampling=self.importance_sampling,
            # "dapo": the whole batch's token sum over its token count, as a mean of micro-batch losses.
            num_items_in_batch=arrays["num_items"][0] / self.accumulate,
            max_completion_length=self.max_completion_length,
        )
        # Entropy proxy every RL trainer logs: the mean negative log-prob of the sampled tokens.
        metrics = dict(metrics) | {"loss": loss, "neg_logp": -jnp.sum(logps * mask) / jnp.maximum(jnp.sum(mask), 1)}
        return loss, metrics


@dataclasses.dataclass
class RolloutTransform:
    """The pipeline transform of GRPO training: decoded frames and the sample's index; prompts are
    built on the host once the step's task is known (it is drawn per step, not per sample)."""

    index_of: dict  # sample id -> index into the training samples

    def __call__(self, sample: Sample, video: video_lib.Video, epoch: int) -> dict[str, np.ndarray]:
        del epoch  # the step's task is drawn per step, on the host
        return {
            "frames": np.asarray(video.frames),
            "timestamps": np.asarray(video.timestamps, np.float32),
            "fps": np.float32(video.fps or 0.0),
            "duration": np.float32(video.duration),
            "sample_index": np.int32(self.index_of[sample.id]),
            "id": np.asarray(sample.id),
        }


def _score_fn(graphdef, state, arrays, plan, *, num_samples, temperature, base, streamed):
    model = nnx.merge(graphdef, state)
    with adapters_disabled(model) if base else contextlib.nullcontext():
        return completion_logprobs(model, arrays, plan, num_samples, temperature, streamed)


_score = jax.jit(_score_fn, static_argnames=("graphdef", "num_samples", "temperature", "base", "streamed"))


class GRPO:
    """The GRPO objective for `training.trainer.Trainer` (see the module docstring)."""

    def __init__(self, config: GRPOConfig, model_config: ModelConfig, encoder: ChatEncoder, samples, end_ids, buckets):
        self.config = config
        self.model_config = model_config
        self.encoder = encoder
        self.samples = samples
        self.end_ids = tuple(int(i) for i in end_ids)
        self.buckets = buckets  # of the prompt arrays: text length and temporal grids, so shapes repeat
        self.updates_per_batch = config.num_iterations
        unknown = [name for name in config.rewards if name not in rewards.REWARDS]
        if unknown:
            raise ValueError(
                f"grpo.rewards names {unknown}, not registered: known {sorted(rewards.REWARDS)} "
                "(jaxgrounding.tasks.rewards.register_reward adds one)"
            )
        self.reference = None  # full fine-tuning: the starting weights, copied (see `start`)
        self._uses_lora = False
        self.mesh = None

    # --- Objective protocol --------------------------------------------------------------------------------------

    def start(self, model: GroundingModel, mesh=None) -> None:
        """Before the first step: the reference policy. With LoRA it is the base weights (adapters off);
        otherwise a copy of the starting weights (the trainer donates, and so overwrites, its own). `mesh`: where
        the rollouts and the scoring run; with several processes they take every process's rows as one global
        batch, as the update does (each process then reads back its own rows)."""
        if jax.process_count() > 1 and (self.config.streaming is not None or self.config.answer_format != "timestamps"):
            raise ValueError(
                "GRPO on several processes runs the whole-prompt timestamp answer: over the streamed memory "
                "(a `streaming` section) or with answer.format = 'structural' it runs on one process only"
            )
        if jax.process_count() > 1 and mesh is None:
            raise ValueError("GRPO on several processes needs the training mesh")
        self.mesh = mesh
        self._uses_lora = any(
            getattr(m, "lora_a", None) is not None for _, m in nnx.iter_graph(model)
        )
        if self.config.beta and not self._uses_lora:
            self.reference = jax.tree.map(jnp.copy, nnx.state(model))

    def host_arrays(self, batch: dict, step: int, policy, skip=None) -> tuple[dict | None, dict]:
        config = self.config
        model = policy()
        task = inversion.sample_task(config.seed, step, grounding_prob=config.grounding_prob, tasks=config.inversion_tasks)
        rows = np.flatnonzero(batch["valid"])
        samples = [self.samples[int(batch["sample_index"][i])] for i in rows]
        videos = [
            video_lib.Video(
                frames=batch["frames"][i][batch["frames_mask"][i]],
                timestamps=batch["timestamps"][i][batch["timestamps_mask"][i]].astype(np.float64),
                duration=float(batch["duration"][i]),
                fps=float(batch["fps"][i]) or None,
                backend="pipeline",
            )
            for i in rows
        ]
        read = len(samples)
        tasks, samples, prompts = self._prompts(task, samples, videos, step, skip)
        if not _every_process_has_prompts(prompts, step):
            return None, {"skipped_step": 1.0, "skipped_prompts": float(read - len(prompts))}
        arrays = padding.pad_and_stack(prompts, len(batch["valid"]), self.buckets)
        arrays["valid"][len(prompts) :] = False
        tick = time.perf_counter()
        arrays, gen = self._rollout(model, arrays, step)
        tokens, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
        rollout_seconds = time.perf_counter() - tick
        rows = len(arrays["valid"]) * jax.process_count()  # prompts of the global batch

        g = config.num_samples
        texts = [self._text(tokens[r], lengths[r]) for r in range(tokens.shape[0])]
        windows = None
        if config.answer_format == "structural":
            predictions = inference.sample_predictions(
                model, arrays, self.encoder.tokenizer, config.assignment, gen, g
            )
            windows = chosen_windows(predictions)
        scores = self._rewards(tasks, samples, texts, len(batch["valid"]), windows)
        totals = reward_totals(scores)
        valid_rows = np.repeat(arrays["valid"], g)
        advantages, zero_std = grpo_lib.group_advantages(
            jnp.asarray(totals, jnp.float32),
            g,
            scale=config.scale_rewards,
            estimator=config.advantage_estimator,
        )
        advantages = np.where(valid_rows, np.asarray(advantages), 0.0).astype(np.float32)
        mask = (np.arange(tokens.shape[1])[None] < lengths[:, None]) & valid_rows[:, None]
        arrays |= {
            "completion_ids": tokens.astype(np.int32),
            "completion_mask": mask,
            "advantages": advantages,
            # The token count of the whole rollout batch, every process's ("dapo" normalises by it across
            # micro-batches and processes).
            "num_items": np.full((tokens.shape[0],), _every_process(np.asarray([mask.sum()])).sum(), np.float32),
        }
        zeros = np.zeros(tokens.shape, np.float32)
        graphdef, state = nnx.split(model)
        plan, streamed = self._plan(arrays, rows)
        on_mesh = self._global(arrays)

        def score(state, base):
            return parallel.local_rows(
                _score(graphdef, state, on_mesh, plan, num_samples=g, temperature=config.temperature, base=base,
                       streamed=streamed)
            )

        arrays["old_logps"] = score(state, base=False) if config.num_iterations > 1 else zeros
        if config.beta and self._uses_lora:
            arrays["ref_logps"] = score(state, base=True)
        elif config.beta:
            arrays["ref_logps"] = score(self.reference, base=False)
        else:
            arrays["ref_logps"] = zeros

        # Logged over the global batch: every process's rows.
        totals, valid_rows, lengths, tokens = (_every_process(x) for x in (totals, valid_rows, lengths, tokens))
        zero_std, prompt_valid = _every_process(np.asarray(zero_std)), _every_process(arrays["valid"])
        scores = {name: _every_process(values) for name, values in scores.items()}
        real = valid_rows
        metrics = {
            f"task_{task}": float(np.mean([t == task for t in tasks])),
            "reward": float(totals[real].mean()),
            "reward_std": float(totals[real].std()),
            "frac_reward_zero_std": float(zero_std[prompt_valid].mean()),
            "completion_length": float(lengths[real].mean()),
            "completion_length_max": float(lengths[real].max()),
            "truncated_fraction": float((~np.isin(tokens[real, -1], self.end_ids) & (lengths[real] == tokens.shape[1])).mean()),
            "rollout_tokens_per_s": float(lengths[real].sum() / max(rollout_seconds, 1e-9)),
            "rollout_seconds": rollout_seconds,
            "skipped_prompts": float(read - len(prompts)),
        }
        for name, values in scores.items():
            applicable = values[real][~np.isnan(values[real])]
            if applicable.size:
                metrics[f"reward_{name}"] = float(applicable.mean())
                metrics[f"reward_{name}_std"] = float(applicable.std())
        self.last_rollout = {"tasks": tasks, "ids": [s.id for s in samples], "texts": texts}
        return arrays, metrics

    def prepare(self, arrays: dict, micro_batch: int):
        config = self.config
        plan, streamed = self._plan(arrays, micro_batch)
        loss = GRPOLoss(
            num_samples=config.num_samples,
            temperature=config.temperature,
            beta=config.beta,
            epsilon_low=config.epsilon_low,
            epsilon_high=config.epsilon_high,
            kl=config.kl,
            loss_type=config.loss_type,
            importance_sampling=config.importance_sampling,
            stored_old=config.num_iterations > 1,
            max_completion_length=config.max_new_tokens,
            accumulate=len(arrays["valid"]) * jax.process_count() // micro_batch,
            streamed=streamed,
        )
        return plan, loss

    def _plan(self, arrays: dict, micro_batch: int):
        """The vision plan of `micro_batch` prompts and, when streaming, (BufferLayout, HVRConfig)."""
        frame_size = self.encoder.config.frame_size
        streaming = self.config.streaming
        if streaming is None:
            return batch_plan(arrays, self.model_config, frame_size, batch_size=micro_batch), None
        n, segment_tokens = np.shape(arrays["segment_valid"])[1:]
        layout = streaming_lib.BufferLayout.build(
            streaming, np.shape(arrays["prefix_ids"])[1], segment_tokens // streaming.segment_frames
        )
        # The frames of all segments of a micro-batch go through the vision tower together.
        plan = streaming_lib.plan_for(self.model_config, streaming, frame_size, micro_batch * n)
        return plan, (layout, streaming.hvr)

    def _rollout(self, model: GroundingModel, arrays: dict, step: int):
        """G completions per prompt of the padded prompt `arrays`, sharing each prompt's prefill (or its streamed
        memory). Returns (the arrays the loss reads: the prompt's, or its streamed cut, on device; Generation)."""
        config = self.config
        sampling_config = sampling.SamplingConfig(
            max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p
        )
        generate = dict(end_ids=self.end_ids, rng=jax.random.fold_in(jax.random.key(config.seed), step))
        frame_size = self.encoder.config.frame_size
        if config.streaming is None:
            # Shapes agreed first: every process's rows form one global batch.
            arrays = parallel.agree_shapes(device_batch(arrays))
            plan = batch_plan(arrays, self.model_config, frame_size, batch_size=len(arrays["valid"]) * jax.process_count())
            inputs = batch_inputs(self._global(arrays), self.model_config, plan)
            if config.answer_format == "structural":  # the states the structural tokens are read through
                generate |= dict(hidden_layers=(-2,), prompt_layers=(-1,))
            gen = sampling.generate(model.llm, inputs, sampling_config, num_samples=config.num_samples, **generate)
            return arrays, jax.tree.map(parallel.local_rows, gen)
        streamed = streaming_lib.split_batch(arrays, self.model_config, config.streaming, frame_size)
        streamed["valid"] = arrays["valid"]
        video = streaming_lib.stream_prompt(model.llm, streamed, config.streaming, frame_size)
        context = streaming_lib.answer_memory(video.layout, video.memory)  # the coarse stage: HVR only
        question = streaming_lib.suffix_inputs(streamed)
        gen = sampling.generate(
            model.llm, question, sampling_config, num_samples=config.num_samples, memory=context, **generate
        )
        return device_batch(streamed), gen

    def _global(self, arrays: dict) -> dict:
        """The host arrays as the jitted rollout and scoring take them: this process's rows as they are on one
        process; on several, global arrays of every process's rows (`parallel.global_batch`)."""
        return arrays if jax.process_count() == 1 else parallel.global_batch(arrays, self.mesh)

    # --- Host side -----------------------------------------------------------------------------------------------

    def _prompts(self, task: str, samples: list, videos: list, step: int, skip):
        """(tasks, samples, encoded prompts) of the samples whose prompt could be built. A sample whose prompt
        fails (a query over encoder.max_tokens, an inversion task it cannot pose) is dropped and handed to `skip`
        under the pipeline's transform stage: the same count, report and failure cap as a pipeline failure."""
        kept, failures = ([], [], []), []
        for sample, video in zip(samples, videos):
            try:
                # A sample the step's inversion task cannot score (no verb to recover) is asked to ground instead.
                sample_task = task if task == "grounding" or inversion.applicable(task, sample) else "grounding"
                prompt = self.encoder.prompt(*self._task_prompt(sample_task, sample, video), sample.id)
                prompt["duration"] = np.float32(sample.duration)
            except Exception as e:  # pylint: disable=broad-except  # any per-sample error, as the pipeline's
                failures.append((sample, "transform", f"{type(e).__name__}: {e}"))
                continue
            for out, value in zip(kept, (sample_task, sample, prompt)):
                out.append(value)
        if failures:
            logging.warning(
                "step %d: skipped %d of %d prompts: %s", step, len(failures), len(samples),
                [f"{s.id}: {reason}" for s, _, reason in failures],
            )
            if skip is None:  # nothing to count them in
                raise DataFailureError(f"step {step}: prompts could not be built: {[f[2] for f in failures]}")
            skip(failures)
        return kept

    def _task_prompt(self, task: str, sample: Sample, video: video_lib.Video):
        if task == "grounding" and self.config.answer_format == "structural":
            return templates.instruction(self.encoder.config.task, sample.query, None), video  # MeCo's evaluation phrasing
        if task == "grounding":
            return timestamps.grounding_prompt(sample.query, thinking=self.config.thinking), video
        return inversion.prompt(task, sample), clip(video, inversion.clip_window(sample))

    def _text(self, tokens: np.ndarray, length: int) -> str:
        ids = [int(t) for t in tokens[:length] if int(t) not in self.end_ids]
        return self.encoder.tokenizer.tokenizer.decode(ids, skip_special_tokens=False)

    def _rewards(self, tasks, samples, texts, batch_size: int, windows=None) -> dict[str, np.ndarray]:
        """{reward name: [B * G] float, NaN where it does not apply (padding rows, other tasks)}. `windows`: per
        row, the ranked windows of a structural answer."""
        g = self.config.num_samples
        names = self.config.rewards
        # Every name, applicable or not: every process holds the same components (they are gathered to be logged).
        out = {name: np.full((batch_size * g,), np.nan) for name in names}
        for p, (task, sample) in enumerate(zip(tasks, samples)):
            for k in range(g):
                r = p * g + k
                for name, value in rewards.task_rewards(
                    texts[r],
                    sample,
                    task,
                    names=names,
                    thinking=self.config.thinking,
                    distance_weighted=self.config.iou == "distance_weighted",
                    windows=None if windows is None else windows[r],
                ).items():
                    out.setdefault(name, np.full((batch_size * g,), np.nan))[r] = value
        return out


def reward_totals(scores: dict[str, np.ndarray]) -> np.ndarray:
    """Per row, the sum of the rewards that apply to it (NaN: does not apply). Rows of different tasks share a
    batch when a sample cannot pose the step's inversion task and grounds instead, so no component applies to every
    row; a padding row, with none, totals 0."""
    return np.nansum(np.stack(list(scores.values())), axis=0)


def chosen_windows(predictions) -> list:
    """Per completion, the ranked (start, end) windows its structural tokens chose (None for padding rows). The
    whole-video fallback of an answer without any is left out: it would earn the IoU of guessing the whole video
    and so reward answers without the format."""
    return [None if p is None else [(w.start, w.end) for w in p.windows if w.token_index >= 0] for p in predictions]


def _every_process(x: np.ndarray) -> np.ndarray:
    """Every process's rows of `x` (same shape everywhere), concatenated in process order; `x` on one process."""
    x = np.asarray(x)
    return x if jax.process_count() == 1 else parallel.host_allgather(x).reshape(-1, *x.shape[1:])


def _every_process_has_prompts(prompts: list, step: int) -> bool:
    """Whether every process has a prompt to roll out; agreed by all processes (the rollouts and the update
    are collectives: every process takes the step, or none does)."""
    message = "" if prompts else "no prompt of its rows could be built"
    messages, _ = parallel.process_messages(message)
    empty = [f"process {i}: {m}" for i, m in enumerate(messages) if m]
    if empty:
        logging.warning("step %d skipped, no update: %s", step, "; ".join(empty))
    return not empty


def grpo_config(config) -> GRPOConfig:
    g = config.grpo
    return GRPOConfig(
        num_samples=g.num_samples,
        temperature=g.temperature,
        top_p=g.top_p,
        max_new_tokens=g.max_new_tokens,
        num_iterations=g.num_iterations,
        beta=g.beta,
        epsilon_low=g.epsilon_low,
        epsilon_high=g.epsilon_high,
        kl=g.kl,
        loss_type=g.loss_type,
        importance_sampling=g.importance_sampling,
        scale_rewards=g.scale_rewards,
        advantage_estimator=g.advantage_estimator,
        grounding_prob=g.grounding_prob,
        inversion_tasks=tuple(g.inversion_tasks),
        iou=g.iou,
        rewards=tuple(g.rewards)
        or (rewards.STRUCTURAL_REWARDS if config.answer.format == "structural" else rewards.DEFAULT_REWARDS),
        thinking=config.answer.thinking,
        seed=config.seed,
        answer_format=config.answer.format,
        assignment=inference.AssignmentConfig.from_config(config),
        streaming=streaming_lib.StreamingConfig.from_config(config) if config.memory == "streaming" else None,
    )


@register_objective("invert4tvg")
def grpo_objective(config, model_config: ModelConfig, checkpoint: str, samples) -> GRPO:
    encoder = ChatEncoder(
        checkpoint, EncoderConfig.from_config(config, train=True), video_first=settings.video_first(config)
    )
    tokenizer = encoder.tokenizer
    end_ids = [tokenizer.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    if tokenizer.tokenizer.eos_token_id is not None:
        end_ids.append(tokenizer.tokenizer.eos_token_id)
    buckets = settings.prompt_buckets(config)
    return GRPO(grpo_config(config), model_config, encoder, samples, sorted(set(end_ids)), buckets)


@dataclasses.dataclass
class WarmStartTransform:
    """Supervised examples in the answer format (the warm start of a model that does not know it): a grounding
    prompt answered with the true window (`timestamps.format_answer`), or, for `inversion_fraction` of the
    samples (chosen per sample id, so every epoch agrees), one of the inversion tasks answered with the
    sample's own verb or caption."""

    encoder: ChatEncoder
    thinking: bool
    inversion_fraction: float
    inversion_tasks: tuple[str, ...]
    seed: int
    time_pointers: bool = False  # grounding examples carry attention pointers for their start and end numbers

    def __call__(self, sample: Sample, video: video_lib.Video, epoch: int) -> dict[str, np.ndarray]:
        del epoch  # one task per sample for every epoch
        rng = np.random.default_rng([self.seed, zlib.crc32(sample.id.encode())])
        task = "grounding"
        if rng.random() < self.inversion_fraction:
            task = self.inversion_tasks[rng.integers(len(self.inversion_tasks))]
            if not inversion.applicable(task, sample):  # no reachable answer: teach grounding instead
                task = "grounding"
        if task == "grounding":
            window = sample.windows[0]
            prompt = timestamps.grounding_prompt(sample.query, thinking=self.thinking)
            # With thinking on, the target reasons in one sentence that names the range (the answer format
            # the prompt asks for); the RL stage is where the model writes its own reasoning.
            reasoning = f"The event is seen from {window[0]:.2f} to {window[1]:.2f}." if self.thinking else None
            response = timestamps.format_answer(window, thinking=reasoning)
            if self.time_pointers:
                example = self.encoder.example(prompt, video, response, sample.id, marks=_number_offsets(response))
                return example | _pointer_targets(example, window) | {"id": np.asarray(sample.id)}
        else:
            prompt, response = inversion.prompt(task, sample), inversion.target(task, sample)
            video = clip(video, inversion.clip_window(sample))
        example = self.encoder.example(prompt, video, response, sample.id)
        if self.time_pointers:  # the same keys in every example of a batch: no pointer to train here
            example |= {
                "struct_positions": np.zeros((0,), np.int32),
                "struct_kinds": np.zeros((0,), np.int32),
                "struct_ranges": np.zeros((0, 2), np.int32),
            }
        return example | {"id": np.asarray(sample.id)}


def _number_offsets(response: str) -> tuple[int, int]:
    """Character offsets of the start and end numbers inside the (last) <answer> block of a target completion."""
    answer = response.rindex("<answer>")
    start = answer + len("<answer>")
    end = response.index(" to ", start) + len(" to ")
    return start, end


def _pointer_targets(example: dict, window) -> dict[str, np.ndarray]:
    """Time pointers, the warm start's auxiliary loss (`objectives.pointer`): the state that writes the start number
    should attend to the temporal grid where the window starts (kind 1), the one that writes the end number to the
    grid where it ends (kind 2). A from-scratch model learns to write numbers that follow the video far sooner with
    this signal than from the answer tokens alone (README, Invert4TVG)."""
    times = np.asarray(example["grid_times"], np.float64)
    first = int(np.clip(np.searchsorted(times, window[0], side="right") - 1, 0, len(times) - 1))
    last = int(np.clip(np.searchsorted(times, window[1], side="left") - 1, first, len(times) - 1))
    return {
        "struct_kinds": np.asarray([1, 2], np.int32),
        "struct_ranges": np.asarray([[first, first], [last, last]], np.int32),
    }
