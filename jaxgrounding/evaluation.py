"""Evaluation: ground a split with a trained model, write the predictions and the metrics.

`predict` grounds one prompt batch the way a config says (one causal pass, or TimeScope's
streaming coarse-to-fine); `evaluate` runs a whole split through the pipeline, writes
`predictions.jsonl` and `metrics.json` and returns the metrics. Used by the train, evaluate and
ground commands; it knows nothing of training.
"""

from __future__ import annotations

import collections
import dataclasses
import json

import jax
import numpy as np
import tqdm

from jaxgrounding import data as data_lib
from jaxgrounding import inference, metrics, paths, settings
from jaxgrounding.data import synthetic_scenes
from jaxgrounding.grounding_model import GroundingModel
from jaxgrounding.inference import AssignmentConfig
from jaxgrounding.memory.layout import StreamingConfig
from jaxgrounding.sampling import SamplingConfig
from jaxgrounding.tasks import inversion, rewards, timestamps
from jaxgrounding.tasks.coarse_to_fine import CoarseToFineConfig
from jaxgrounding.tasks.encoding import ChatEncoder, EncoderConfig, StructuralEncoder, clip


def predict(model: GroundingModel, batch: dict, tokenizer, config, rng, memory: str = "auto"):
    """Predictions for one prompt batch: one causal pass ("full") or TimeScope's streaming
    coarse-to-fine ("streaming"); "auto" runs the config's `memory`."""
    if memory not in ("auto", "full", "streaming"):
        raise ValueError(f"memory must be auto, full or streaming, got {memory!r}")
    if memory == "auto":
        memory = config.memory
    frame_size = tuple(config.data.frame_size)
    sampling_config, assignment = SamplingConfig.from_config(config), AssignmentConfig.from_config(config)
    args = (model, batch, tokenizer, frame_size, sampling_config, assignment)
    if memory == "full":
        return inference.predict(*args, rng=rng)
    streaming = StreamingConfig.from_config(config)
    return inference.predict_streaming(*args, streaming, CoarseToFineConfig.from_config(config), rng=rng)


def evaluate(model: GroundingModel, tokenizer, samples, checkpoint: str, config, out_dir: str) -> dict:
    """Grounds every sample, writes out_dir/metrics.json and out_dir/predictions.jsonl (in the
    order of `samples`) and returns the metrics.

    With several processes each grounds its share, `samples[process::processes]`, with its own
    whole copy of the model (`model` must be process-local: `parallel.process_local`), so no
    process waits on another's generation loop; the shares meet in part files in `out_dir` (the
    workdir is shared storage, as for checkpoints) and every process returns the same metrics.
    """
    if config.eval.max_samples:
        samples = samples[: config.eval.max_samples]
    if settings.answer_format(config) == "timestamps":
        return evaluate_answers(model, tokenizer, samples, checkpoint, config, out_dir)
    index, count = jax.process_index(), jax.process_count()
    encoder = StructuralEncoder(checkpoint, EncoderConfig.from_config(config, train=False))
    prompts = _PromptTransform(encoder)
    pipeline = settings.pipeline_config(config, train=False, batch_size=config.eval.batch_size)
    pipeline = dataclasses.replace(pipeline, shard_index=0, shard_count=1)  # the share is cut below
    share = samples[index::count]
    # A process whose share is empty (fewer samples than processes) grounds nothing and still meets the others.
    batches = data_lib.make_pipeline(share, pipeline, prompts) if share else []
    primary = index == 0
    rows = []
    iterator = iter(batches)
    rng = jax.random.key(config.seed)
    # TimeScope's single-stage baseline: the same prompt in one causal pass over the whole video.
    single = config.memory == "streaming" and config.eval.single_stage
    with tqdm.tqdm(total=len(share), desc="evaluate", unit="sample", disable=not primary) as bar:
        for batch in iterator:
            rng, key = jax.random.split(rng)
            predictions = predict(model, batch, tokenizer, config, key)
            singles = predict(model, batch, tokenizer, config, key, memory="full") if single else predictions
            for b, prediction, one_pass in zip(np.flatnonzero(batch["valid"]), predictions, singles):
                gt = batch["windows"][b][batch["windows_mask"][b]].tolist()
                row = {
                    "id": str(batch["id"][b]),
                    "duration": float(batch["duration"][b]),
                    "gt_windows": [[round(s, 3), round(e, 3)] for s, e in gt],
                    "pred_windows": _rounded(prediction.windows),
                    "scores": [round(float(w.score), 5) for w in prediction.windows],
                    "text": prediction.text,
                }
                if prediction.coarse is not None:
                    row["coarse_windows"] = _rounded(prediction.coarse.windows)
                    row["reloaded_segments"] = prediction.reloaded
                    row["reload_capped"] = prediction.reload_capped
                    row["coarse_score"] = round(prediction.coarse.score, 5)
                if single:
                    row["single_windows"] = _rounded(one_pass.windows)
                rows.append(row)
            bar.update(len(predictions))
    skipped = [list(s) for s in iterator.skipped] if hasattr(iterator, "skipped") else []
    paths.makedirs(out_dir)
    if count > 1:
        rows, skipped = _gather_shares(rows, skipped, samples, out_dir)
    result = metrics.grounding_metrics(
        [r["pred_windows"] for r in rows], [r["gt_windows"] for r in rows], inclusive=config.eval.inclusive
    )
    for stage in ("coarse", "single"):
        if rows and f"{stage}_windows" in rows[0]:
            found = metrics.grounding_metrics(
                [r[f"{stage}_windows"] for r in rows], [r["gt_windows"] for r in rows], inclusive=config.eval.inclusive
            )
            result |= {f"{stage}_{k}": v for k, v in found.items()}
    result |= _by_phrasing(rows, samples, config.eval.inclusive)
    result |= {"samples": len(rows), "skipped_videos": len(skipped), "inclusive": bool(config.eval.inclusive)}
    if primary:
        _write_results(out_dir, rows, result)
    return result


def _rounded(windows) -> list[list[float]]:
    """Predicted windows as predictions.jsonl stores them: [start, end] seconds to the millisecond."""
    return [[round(w.start, 3), round(w.end, 3)] for w in windows]


def _by_phrasing(rows: list[dict], samples, inclusive: bool) -> dict:
    """`explicit_*` and `task_oriented_*` figures of the predicted windows when every query is one the synthetic
    set wrote (its phrasing is known; TimeScope reports the two kinds of query apart), else nothing."""
    phrasing = {s.id: synthetic_scenes.query_phrasing(s.query) for s in samples}
    if not rows or not all(phrasing.get(r["id"]) for r in rows):
        return {}
    out = {}
    for name in ("explicit", "task_oriented"):
        subset = [r for r in rows if phrasing[r["id"]] == name]
        if subset:
            found = metrics.grounding_metrics(
                [r["pred_windows"] for r in subset], [r["gt_windows"] for r in subset], inclusive=inclusive
            )
            out |= {f"{name}_{k}": v for k, v in found.items()} | {f"{name}_samples": len(subset)}
    return out


def evaluate_answers(model: GroundingModel, tokenizer, samples, checkpoint: str, config, out_dir: str) -> dict:
    """Evaluation of a model that writes its answers (Time-R1 / Invert4TVG): grounding R1@{0.3, 0.5, 0.7} with
    both threshold conventions (IoU >= m, Invert4TVG's; IoU > m, Time-R1's), mIoU and the parse-failure rate, then
    the three inversion tasks' accuracies on the same samples (Invert4TVG, fig. 1). What published numbers silently
    depend on is pinned in the result: the prompt, thinking, decoding and the new-token budget."""
    index, count = jax.process_index(), jax.process_count()
    encoder = ChatEncoder(
        checkpoint, EncoderConfig.from_config(config, train=False), video_first=settings.video_first(config)
    )
    sampling_config = SamplingConfig.from_config(config)
    thinking = config.answer.thinking
    tasks = ("grounding",) + tuple(config.grpo.inversion_tasks)
    share = samples[index::count]
    rows = {s.id: {"id": s.id, "duration": round(s.duration, 3), "gt_windows": [list(w) for w in s.windows]} for s in share}
    rng = jax.random.key(config.seed)
    # The shuffled-video control asks every grounding question again over another video of the same length.
    swaps = video_swaps(samples) if config.eval.shuffled_video else {}
    passes = ("grounding",) + (("shuffled_video",) if swaps else ()) + tasks[1:]
    for task in passes:
        transform = _AnswerPrompt(encoder, "grounding" if task == "shuffled_video" else task, thinking)
        pipeline = settings.pipeline_config(config, train=False, batch_size=config.eval.batch_size)
        pipeline = dataclasses.replace(pipeline, shard_index=0, shard_count=1, buckets=settings.prompt_buckets(config))
        # An inversion task is scored on the samples that have an answer for it (a verb to recover).
        if task == "grounding":
            asked = share
        elif task == "shuffled_video":
            asked = [swaps[s.id] for s in share if s.id in swaps]
        else:
            asked = [s for s in share if inversion.applicable(task, s)]
        by_id = {s.id: s for s in asked}
        with tqdm.tqdm(total=len(asked), desc=f"evaluate {task}", unit="sample", disable=index != 0) as bar:
            # A process may hold no sample of a task (its share has no verb to recover): it asks nothing.
            for batch in data_lib.make_pipeline(asked, pipeline, transform) if asked else []:
                rng, key = jax.random.split(rng)
                texts = inference.generate_answers(model, batch, tokenizer, tuple(config.data.frame_size), sampling_config, key)
                for b, text in zip(np.flatnonzero(batch["valid"]), texts):
                    row = rows[str(batch["id"][b])]
                    sample = by_id[row["id"]]
                    if task in ("grounding", "shuffled_video"):
                        window = timestamps.parse_answer(text)
                        answer = {"text": text, "pred_windows": [] if window is None else [[round(window[0], 3), round(window[1], 3)]]}
                        row |= answer if task == "grounding" else {task: answer | {"video": sample.video}}
                    else:
                        value = rewards.task_rewards(text, sample, task, thinking=thinking)[task]
                        row[task] = {"text": text, "correct": bool(value > 0)}
                bar.update(int(batch["valid"].sum()))
    rows = [rows[s.id] for s in share]
    paths.makedirs(out_dir)
    if count > 1:
        rows, _ = _gather_shares(rows, [], samples, out_dir)
    preds, gts = [r["pred_windows"] for r in rows], [r["gt_windows"] for r in rows]
    result = {}
    for inclusive, suffix in ((True, ""), (False, "_gt")):
        for k, v in metrics.grounding_metrics(preds, gts, inclusive=inclusive).items():
            if k != "mIoU" or inclusive:
                result[k + suffix] = v
    result["parse_failures"] = 100.0 * sum(not p for p in preds) / max(len(rows), 1)
    result |= shuffled_video_metrics(rows)
    for task in tasks[1:]:
        scored = [r[task]["correct"] for r in rows if task in r]
        result[f"{task}_accuracy"] = 100.0 * sum(scored) / max(len(scored), 1)
        result[f"{task}_samples"] = len(scored)
    result |= {
        "samples": len(rows),
        "inclusive": True,
        "conventions": {"R1@m": "IoU >= m (Invert4TVG)", "R1@m_gt": "IoU > m (Time-R1)"},
        "prompt": timestamps.grounding_prompt("{query}", thinking=thinking),
        "thinking": bool(thinking),
        "decoding": "greedy" if sampling_config.temperature <= 0 else f"temperature {sampling_config.temperature}",
        "max_new_tokens": sampling_config.max_new_tokens,
    }
    if index == 0:
        _write_results(out_dir, rows, result)
    return result


def video_swaps(samples) -> dict:
    """The shuffled-video control's prompts, by sample id: the sample (its query and true windows) over the video of
    another sample of the same length to the second, so the prompt is as long as the real one and only what the
    video shows differs. Within each length, the distinct videos (in path order) pass each one to the next; a video
    alone in its length has no swap. A model that answers from the query and the video's length alone (a "blind"
    model: Yuan et al. 2021 show such priors score well on Charades-STA) answers the same over either video."""
    by_length = collections.defaultdict(list)
    for s in samples:
        by_length[round(s.duration)].append(s)
    swaps = {}
    for group in by_length.values():
        videos = sorted({s.video: s.duration for s in group}.items())
        if len(videos) < 2:
            continue
        successor = {v: videos[(i + 1) % len(videos)] for i, (v, _) in enumerate(videos)}
        for s in group:
            video, duration = successor[s.video]
            windows = tuple((min(a, duration), min(b, duration)) for a, b in s.windows)
            swaps[s.id] = dataclasses.replace(s, video=video, duration=duration, windows=windows)
    return swaps


def shuffled_video_metrics(rows: list[dict]) -> dict:
    """The shuffled-video control's figures from evaluation rows that carry one (`row["shuffled_video"]`): grounding
    metrics of the answers given over the other video, scored against the true windows (IoU >= m), and
    `answers_changed`, the share of those questions whose parsed window (or parse failure) differs from the answer over
    the true video. A model that looks at the video changes most answers and scores near a constant window; one that
    does not changes none and scores as it does over the true video. {} without such rows."""
    swapped = [r for r in rows if "shuffled_video" in r]
    if not swapped:
        return {}
    found = metrics.grounding_metrics(
        [r["shuffled_video"]["pred_windows"] for r in swapped], [r["gt_windows"] for r in swapped], inclusive=True
    )
    changed = sum(r["shuffled_video"]["pred_windows"] != r["pred_windows"] for r in swapped)
    return {f"shuffled_video_{k}": v for k, v in found.items()} | {
        "shuffled_video_samples": len(swapped),
        "answers_changed": 100.0 * changed / len(swapped),
    }


@dataclasses.dataclass
class _AnswerPrompt:
    """The prompt of one task for a sample (grounding: the whole video; inversion: the ground-truth clip)."""

    encoder: ChatEncoder
    task: str
    thinking: bool

    def __call__(self, sample, video, epoch):
        del epoch  # evaluation draws nothing
        if self.task == "grounding":
            text = timestamps.grounding_prompt(sample.query, thinking=self.thinking)
        else:
            text, video = inversion.prompt(self.task, sample), clip(video, sample.windows[0])
        return self.encoder.prompt(text, video) | {"id": np.asarray(sample.id)}


def _write_results(out_dir: str, rows: list, result: dict) -> None:
    """The evaluation files: one prediction row per sample (predictions.jsonl) and the metrics (metrics.json)."""
    paths.write_text(paths.join(out_dir, "predictions.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
    paths.write_text(paths.join(out_dir, "metrics.json"), json.dumps(result, indent=2))


def _gather_shares(rows: list, skipped: list, samples, out_dir: str) -> tuple[list, list]:
    """Every process's evaluation rows and skipped videos, rows in the order of `samples`."""
    from jax.experimental import multihost_utils

    index, count = jax.process_index(), jax.process_count()
    part = paths.join(out_dir, f"predictions.part-{{}}-of-{count}.json")
    paths.write_text(part.format(index), json.dumps({"rows": rows, "skipped": skipped}))
    multihost_utils.sync_global_devices("jaxgrounding: evaluation shares written")
    shares = [json.loads(paths.read_text(part.format(p))) for p in range(count)]
    multihost_utils.sync_global_devices("jaxgrounding: evaluation shares read")
    paths.remove(part.format(index))
    order = {s.id: i for i, s in enumerate(samples)}
    rows = sorted((r for share in shares for r in share["rows"]), key=lambda r: order[r["id"]])
    return rows, [s for share in shares for s in share["skipped"]]


@dataclasses.dataclass
class _PromptTransform:
    """The evaluation transform: prompt arrays plus the ground truth and id of the sample."""

    encoder: StructuralEncoder

    def __call__(self, sample, video, epoch):
        del epoch  # evaluation draws nothing
        return self.encoder.encode_prompt(sample, video) | {
            "windows": np.asarray(sample.windows, np.float32).reshape(-1, 2),
            "id": np.asarray(sample.id),
        }
