"""GRPO training (Invert4TVG): the shared-prompt training forward equals a full forward over prompt + completion,
the train command's warm start -> GRPO -> evaluation on a micro config, and a killed-then-resumed GRPO run
repeats the uninterrupted run's rollouts, rewards and losses (with two updates per rollout batch)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import invert4tvg
from jaxgrounding import data as data_lib
from jaxgrounding import settings
from jaxgrounding.data import padding
from jaxgrounding.grounding_model import batch_inputs, batch_plan
from jaxgrounding.memory import streaming as streaming_lib
from jaxgrounding.memory.hvr import HVRConfig
from jaxgrounding.objectives.lm import lm_head_matrix, token_logprobs
from jaxgrounding.tasks import rewards, timestamps
from jaxgrounding.tasks.encoding import ChatEncoder, EncoderConfig
from jaxgrounding.train import train_and_evaluate
from jaxgrounding.training import experiment, grpo


@rewards.register_reward("test_length_mod_3")
def _length_mod_3(text, sample, task, **_):
    """A stand-in reward that varies within a group: a micro model earns none of the real rewards, and with every
    group's rewards equal the advantages, the loss and the policy's moves would all be zero."""
    return float(len(text) % 3)


def micro_config(data_root):
    config = invert4tvg.get_config()
    config.data.root = str(data_root)
    config.data.synthetic_train_videos = 8
    config.data.synthetic_eval_videos = 2
    # One length for every video: the two evaluation videos swap in the shuffled-video control.
    config.data.scene = dict(config.data.scene) | {"min_duration": 10.0, "max_duration": 10.0, "max_events": 1}
    config.data.max_frames = 12
    config.model.tiny = {"hidden": 64, "layers": 2, "vision_depth": 1, "vision_hidden": 32}
    config.warm_start.steps = 3
    config.warm_start.pointer_weight = 1.0  # the time pointers' path (the default's)
    config.train.batch_size = 2
    config.train.steps = 4
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.grpo.num_samples = 2
    config.grpo.max_new_tokens = 6
    config.grpo.num_iterations = 2
    config.grpo.grounding_prob = 0.5  # both kinds of step within four
    config.grpo.rewards = rewards.DEFAULT_REWARDS + ("test_length_mod_3",)
    config.sampling.max_new_tokens = 6
    config.eval.batch_size = 2
    # One device: a resumed GRPO step sharded over 2 virtual CPU devices deadlocks in XLA:CPU's in-process
    # all-gather (devices reach collectives in different orders); sharded GRPO is not claimed yet.
    config.mesh.fsdp = 1
    return config


def trainer_and_batches(config, workdir):
    """The GRPO trainer of `config` and an iterator over its training batches, as the train command builds them."""
    train, _ = experiment.load_samples(config, workdir)
    checkpoint = experiment.resolve_checkpoint(config, workdir, train)
    transform = experiment.train_transform(config, checkpoint, train)
    pipeline = settings.pipeline_config(config, train=True, batch_size=config.train.batch_size)
    batches = iter(data_lib.make_pipeline(train, pipeline, transform))
    model, tokenizer = experiment.build_model(config, checkpoint)
    return experiment.build_trainer(config, model, tokenizer, checkpoint, train), batches


def test_completion_logprobs_equal_a_full_forward(tmp_path):
    config = micro_config(tmp_path / "data")
    workdir = str(tmp_path / "run")
    train, _ = experiment.load_samples(config, workdir)
    checkpoint = experiment.resolve_checkpoint(config, workdir, train)
    model, _ = experiment.build_model(config, checkpoint)
    encoder = ChatEncoder(checkpoint, EncoderConfig.from_config(config, train=False))
    videos = [data_lib.read_video(s.video, fps=1.0, max_frames=12, size=(56, 56)) for s in train[:2]]
    prompts = [encoder.prompt(timestamps.grounding_prompt(s.query, thinking=False), v) for s, v in zip(train, videos)]
    arrays = padding.pad_and_stack(prompts, 2, settings.prompt_buckets(config))
    g, n = 3, 5
    rng = np.random.default_rng(0)
    completions = rng.integers(10, 200, size=(2 * g, n)).astype(np.int32)
    lengths = np.array([5, 3, 1, 5, 4, 2])
    mask = np.arange(n)[None] < lengths[:, None]
    plan = batch_plan(arrays, model.llm.config, (56, 56))
    got = np.asarray(
        grpo.completion_logprobs(
            model, arrays | {"completion_ids": completions, "completion_mask": mask}, plan, g, temperature=0.7
        )
    )

    # The reference: every sample as its own row, prompt + completion in one causal forward.
    prompt_lengths = arrays["input_ids_mask"].sum(1)
    width = arrays["input_ids"].shape[1] + n
    rows = {k: [] for k in ("input_ids", "input_ids_mask", "positions")}
    for r in range(2 * g):
        p, k = r // g, prompt_lengths[r // g]
        ids = np.zeros(width, np.int32)
        ids[:k], ids[k : k + lengths[r]] = arrays["input_ids"][p, :k], completions[r, : lengths[r]]
        positions = np.zeros((width, 3), np.int32)
        positions[:k] = arrays["positions"][p, :k]
        positions[k : k + n] = positions[k - 1].max() + 1 + np.arange(n)[:, None]
        rows["input_ids"].append(ids)
        rows["input_ids_mask"].append(np.arange(width) < k + lengths[r])
        rows["positions"].append(positions)
    full = {k: np.stack(v) for k, v in rows.items()}
    full |= {
        "pixel_values": np.repeat(arrays["pixel_values"], g, axis=0),
        "grid_times": np.repeat(arrays["grid_times"], g, axis=0),
        "valid": np.ones(2 * g, bool),
    }
    inputs = batch_inputs(full, model.llm.config, batch_plan(full, model.llm.config, (56, 56)))
    out = model.llm.forward(inputs, logits=False)
    ids = jnp.asarray(full["input_ids"])
    head = lm_head_matrix(model.llm)
    logp = np.asarray(token_logprobs(out.last_hidden_state[:, :-1], head, ids[:, 1:], temperature=0.7))
    for r in range(2 * g):
        at = prompt_lengths[r // g] - 1 + np.arange(lengths[r])
        np.testing.assert_allclose(got[r, : lengths[r]], logp[r, at], atol=2e-5, err_msg=f"row {r}")


def test_streamed_completion_logprobs_equal_the_whole_prompts_at_r1(tmp_path):
    """G samples over one streamed video (HVR at r = 1 keeps every key) score as over the whole prompt."""
    config = micro_config(tmp_path / "data")
    workdir = str(tmp_path / "run")
    train, _ = experiment.load_samples(config, workdir)
    checkpoint = experiment.resolve_checkpoint(config, workdir, train)
    model, _ = experiment.build_model(config, checkpoint)
    encoder = ChatEncoder(checkpoint, EncoderConfig.from_config(config, train=False), video_first=True)
    videos = [data_lib.read_video(s.video, fps=1.0, max_frames=12, size=(56, 56)) for s in train[:2]]
    prompts = [encoder.prompt(timestamps.grounding_prompt(s.query, thinking=False), v) for s, v in zip(train, videos)]
    arrays = padding.pad_and_stack(prompts, 2, settings.prompt_buckets(config))
    g, n = 2, 4
    completions = np.random.default_rng(1).integers(10, 200, size=(2 * g, n)).astype(np.int32)
    mask = np.arange(n)[None] < np.array([4, 2, 3, 1])[:, None]
    completion = {"completion_ids": completions, "completion_mask": mask}
    want = grpo.completion_logprobs(
        model, arrays | completion, batch_plan(arrays, model.llm.config, (56, 56)), g, temperature=1.0
    )

    cfg = streaming_lib.StreamingConfig(
        segment_frames=2, hvr=HVRConfig(temporal=1, spatial=1, impl="auto"), recent_segments=0, max_segments=8,
        dvr_placement="auto",
    )
    cut = streaming_lib.split_batch(arrays, model.llm.config, cfg, (56, 56))
    segments = cut["segment_valid"].shape[1]
    layout = streaming_lib.BufferLayout.build(cfg, cut["prefix_ids"].shape[1], cut["segment_valid"].shape[2] // 2)
    plan = streaming_lib.plan_for(model.llm.config, cfg, (56, 56), 2 * segments)
    got = grpo.completion_logprobs(model, cut | completion, plan, g, temperature=1.0, streamed=(layout, cfg.hvr))
    np.testing.assert_allclose(np.where(mask, got, 0), np.where(mask, want, 0), atol=2e-5)


def test_grpo_over_the_streamed_memory_trains(tmp_path, monkeypatch):
    """The GRPO step with TimeScope's streamed memory: rollouts continue each streamed video G times, the update
    streams it once per prompt; the loss is finite and the policy moves (an untrained model earns no reward, so a
    stand-in reward that varies within each group, the completion's length, gives the advantages)."""
    monkeypatch.setattr(grpo.rewards, "task_rewards", lambda text, sample, task, **_: {"length": float(len(text) % 3)})
    config = micro_config(tmp_path / "data")
    config.memory = "streaming"
    config.streaming.update(segment_frames=2, hvr_temporal=2)
    config.warm_start.steps = 0
    config.train.steps = 2
    config.grpo.num_iterations = 1
    config.grpo.grounding_prob = 1.0
    trainer, batches = trainer_and_batches(config, str(tmp_path / "run"))
    assert trainer.objective.encoder.video_first
    before = jax.tree.map(np.asarray, trainer.trainable)
    for step in range(2):
        metrics = trainer.step(next(batches), rng=jax.random.key(step), step=step)
        assert np.isfinite(metrics["loss"]) and metrics["frac_reward_zero_std"] < 1.0, metrics
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), trainer.trainable, before)
    assert max(jax.tree.leaves(moved)) > 0


def test_prompts_that_cannot_be_built_are_skipped_and_counted(tmp_path):
    """A query over encoder.max_tokens fails when GRPO builds its prompt at rollout time: that sample is skipped and
    counted by the pipeline (stage transform, as a pipeline failure); a batch with no usable prompt makes no update."""
    import dataclasses

    config = micro_config(tmp_path / "data")
    config.warm_start.steps = 0
    config.grpo.num_iterations = 1
    config.grpo.grounding_prob = 1.0
    trainer, batches = trainer_and_batches(config, str(tmp_path / "run"))
    samples = trainer.objective.samples

    def too_long(batch):
        for i in batch["sample_index"][batch["valid"]]:
            samples[i] = dataclasses.replace(samples[i], query="the person opens the door " * 2000)
        return batch

    batch = next(batches)
    first = int(batch["sample_index"][0])
    samples[first] = dataclasses.replace(samples[first], query="the person opens the door " * 2000)
    metrics = trainer.step(batch, rng=jax.random.key(0), step=0, skip=batches.skip)
    assert np.isfinite(metrics["loss"]) and metrics["skipped_prompts"] == 1
    assert batches.failed == 1
    (_, sample_id, _, stage, reason), = batches.skipped
    assert (sample_id, stage) == (samples[first].id, "transform") and "exceed max_tokens" in reason

    before = jax.tree.map(np.asarray, trainer.trainable)
    metrics = trainer.step(too_long(next(batches)), rng=jax.random.key(1), step=1, skip=batches.skip)
    assert "loss" not in metrics and metrics["skipped_step"] == 1 and metrics["skipped_prompts"] == 2
    assert batches.failed == 3
    unchanged = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), trainer.trainable, before)
    assert all(jax.tree.leaves(unchanged))  # no update, no division by zero
    with pytest.raises(data_lib.DataFailureError, match="exceed max_tokens"):  # no pipeline to count them in
        trainer.step(too_long(next(batches)), rng=jax.random.key(2), step=2)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    workdir = str(root / "run")
    result = train_and_evaluate(micro_config(root / "data"), workdir)
    return root, workdir, result


def test_warm_start_then_grpo_then_evaluation(uninterrupted):
    _, workdir, result = uninterrupted
    init = json.load(open(os.path.join(workdir, "eval_init", "metrics.json")))
    for metrics in (init, result):
        assert {"R1@0.5", "R1@0.5_gt", "mIoU", "parse_failures", "verb_completion_accuracy"} <= set(metrics)
        assert metrics["decoding"] == "greedy" and metrics["max_new_tokens"] == 6
    logged = _jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    for m in logged:
        assert {"reward", "reward_std", "frac_reward_zero_std", "kl", "completion_length", "rollout_tokens_per_s"} <= set(m)
        assert np.isfinite(m["loss"])
    rows = _jsonl(os.path.join(workdir, "eval", "predictions.jsonl"))
    assert rows and all("text" in r and "pred_windows" in r for r in rows)
    # The shuffled-video control asked each question over the other evaluation video.
    assert result["shuffled_video_samples"] == len(rows) == 2 and 0 <= result["answers_changed"] <= 100
    assert rows[0]["shuffled_video"]["video"] != rows[1]["shuffled_video"]["video"]


def test_two_processes_train_like_one(uninterrupted):
    """GRPO as a pod runs it: each process rolls out its own prompts, but the rollouts, the old / reference scoring
    and the updates run over the global batch on the shared mesh. Losses,
    rewards (logged over every process's rows) and the evaluation equal one process's."""
    from tests.multiprocess_train import check_two_processes_train_like_one

    root, workdir, result = uninterrupted
    two = root / "grpo_two_processes"
    # The same warm start (the SFT path is tested on two processes in tests/test_train.py): only GRPO runs.
    for name in ("warm_start", "eval_init"):
        shutil.copytree(os.path.join(workdir, name), two / name)
    check_two_processes_train_like_one(
        "grpo", root, workdir, result, micro_config(root / "data"), evaluate=True, across_process_counts=False
    )
    one = _jsonl(os.path.join(workdir, "train_metrics.jsonl"))
    two = _jsonl(os.path.join(str(root), "grpo_two_processes", "train_metrics.jsonl"))
    for a, b in zip(one, two):
        for key in ("reward", "reward_std", "frac_reward_zero_std", "completion_length", "kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_warm_start_trains_time_pointers(uninterrupted, tmp_path):
    """The warm start's grounding examples point the last layer's attention from the states that write the start and
    end numbers to the grids where the window starts and ends (objectives.pointer, logged as pointer_loss)."""
    import dataclasses

    root, workdir, _ = uninterrupted
    warm = [json.loads(line) for line in open(os.path.join(workdir, "warm_start", "train_metrics.jsonl"))]
    assert warm and all(np.isfinite(m["pointer_loss"]) and m["pointer_loss"] > 0 for m in warm)

    config = experiment.warm_start_config(micro_config(root / "data"))
    train, _ = experiment.load_samples(config, str(tmp_path))
    transform = experiment.train_transform(config, os.path.join(workdir, "warm_start", "export"), train)
    transform = dataclasses.replace(transform, inversion_fraction=0.0)  # grounding examples only
    tokenizer = transform.encoder.tokenizer.tokenizer
    for sample in train[:3]:
        video = data_lib.read_video(sample.video, fps=config.data.fps, max_frames=12, size=(56, 56))
        example = transform(sample, video, 0)
        ids, times = example["input_ids"], example["grid_times"]
        for position, value, (first, last) in zip(example["struct_positions"], sample.windows[0], example["struct_ranges"]):
            written = tokenizer.decode(ids[position + 1 : position + 8])  # the token the state predicts, onwards
            assert written.lstrip(" <answer>").startswith(f"{value:.2f}"), (written, value)
            assert first == last and times[first] <= value + 1e-6
        start, end = sample.windows[0]
        first, last = example["struct_ranges"][:, 0]
        assert first == len(times) - 1 or times[first + 1] > start
        assert times[last] < end and (last == len(times) - 1 or times[last + 1] >= end)


def test_killed_grpo_run_resumes_exactly(uninterrupted):
    root, workdir, _ = uninterrupted
    resumed = str(root / "resumed")
    # The same warm start (its export is where GRPO starts): copied, so only GRPO runs again.
    os.makedirs(resumed)
    for name in ("warm_start", "eval_init"):
        shutil.copytree(os.path.join(workdir, name), os.path.join(resumed, name))
    config = micro_config(root / "data")
    train_and_evaluate(config, resumed, stop_after=3)  # killed after step 3; the last save was step 2
    train_and_evaluate(config, resumed)
    want = {m["step"]: m for m in _jsonl(os.path.join(workdir, "train_metrics.jsonl"))}
    got = {m["step"]: m for m in _jsonl(os.path.join(resumed, "train_metrics.jsonl"))}  # step 3 logged twice
    for step in (3, 4):
        for key in ("loss", "reward", "kl", "completion_length"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_a_rows_total_is_the_sum_of_the_rewards_that_apply_to_it():
    """A grounding row (IoU + format) and a verb-completion row (its reward + format) in one batch, and a padding
    row: NaN marks a reward that does not apply, and must not wipe out the rest of the row's."""
    nan = np.nan
    scores = {
        "iou": np.array([0.5, nan, nan]),
        "format": np.array([1.0, 1.0, nan]),
        "verb_completion": np.array([nan, 1.0, nan]),
    }
    np.testing.assert_array_equal(grpo.reward_totals(scores), [1.5, 2.0, 0.0])
