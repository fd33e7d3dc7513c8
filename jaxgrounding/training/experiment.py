"""What a config means: the checkpoint, the data, the model, the input encoder and evaluation.

Shared by the train / evaluate / ground commands so that each stays a short, linear main().
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

import jaxgrounding.model as jm
from jaxgrounding import data as data_lib
from jaxgrounding import inference, metrics, sampling
from jaxgrounding.data.synthetic_scenes import SceneConfig
from jaxgrounding.model.lora import apply_lora
from jaxgrounding.model.tiny import build_tiny_checkpoint
from jaxgrounding.model.tokenizer import init_token_rows, load_tokenizer
from jaxgrounding.tasks import templates
from jaxgrounding.tasks.encoding import EncoderConfig, StructuralEncoder
from jaxgrounding.training import optim
from jaxgrounding.training.sft import GroundingModel, SFTConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def first_process_first(fn):
    """Runs `fn` on process 0, then on the others: work that writes shared files (generating
    the synthetic set, building the tiny checkpoint) happens once; the rest read the result."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    out = fn() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jaxgrounding: shared files ready")
    return fn() if jax.process_index() != 0 else out


def synthetic_root(config, workdir: str) -> str:
    # Configs with different scene families (short MeCo clips, long TimeScope videos) keep apart.
    name = config.data.get("synthetic_name", "synthetic")
    return config.data.root or os.path.join(os.path.dirname(os.path.abspath(workdir)), "data", name)


def load_samples(config, workdir: str) -> tuple[list, list]:
    """(train samples, eval samples) for `config.data`."""
    if config.data.name == "synthetic":
        synthetic = data_lib.SyntheticConfig(
            splits=(("train", config.data.synthetic_train_videos), ("val", config.data.synthetic_eval_videos)),
            scene=SceneConfig(**dict(config.data.get("scene", {}))),
        )
        splits = data_lib.ensure_synthetic_dataset(synthetic_root(config, workdir), synthetic)
        return splits["train"], splits["val"]
    root = config.data.root
    if not root:
        raise ValueError(f"data.name={config.data.name!r} needs --config.data.root=<dataset directory>")

    def load(name):
        path = os.path.join(root, name)
        durations = os.path.join(root, config.data.durations) if config.data.durations else None
        kwargs = {"durations": durations} if durations else {}
        loaded = data_lib.load_annotations(
            path, config.data.name, video_root=os.path.join(root, config.data.video_root), **kwargs
        )
        log.info("%s: %d samples (%s)", path, len(loaded.samples), loaded.report)
        return loaded.samples

    return load(config.data.train_annotations), load(config.data.eval_annotations)


def text_corpus(samples) -> list[str]:
    """Texts the tiny tokenizer is trained on: queries, captions and the instruction templates."""
    texts = [s.query for s in samples] + [c for s in samples for c in (s.captions or [])]
    return texts + [p for task in templates.TASKS for p in templates.TEMPLATES[task]]


def resolve_checkpoint(config, workdir: str, train_samples) -> str:
    """The HF checkpoint directory; builds the tiny default into the workdir when none is given."""
    if config.model.checkpoint:
        return config.model.checkpoint
    sizes = dict(config.model.get("tiny", {}))
    return build_tiny_checkpoint(
        os.path.join(workdir, "tiny_model"), text_corpus(train_samples), seed=config.seed, **sizes
    )


def encoder_config(config, *, train: bool) -> EncoderConfig:
    return EncoderConfig(
        task=config.encoder.task,
        frame_size=tuple(config.data.frame_size),
        max_tokens=config.encoder.max_tokens,
        random_instruction=train,
        seed=config.seed,
    )


def _ladder(limit: int, start: int) -> tuple[int, ...]:
    """Bucket sizes start, 1.5 * start, 2 * start, 3 * start, ... up to and including `limit`."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return tuple(sizes) + (limit,)


def pipeline_config(config, *, train: bool, batch_size: int) -> data_lib.PipelineConfig:
    """Buckets derived from the frame budget, so a config change never needs a bucket change."""
    h, w = config.data.frame_size
    patches_per_grid = (h // 14) * (w // 14)
    max_grids = -(-config.data.max_frames // 2)
    grids = _ladder(max_grids, min(8, max_grids))
    text = _ladder(config.encoder.max_tokens, min(128, config.encoder.max_tokens))
    structural = (4, 8, 16, 32, 64)
    buckets = {k: text for k in ("input_ids", "loss_mask", "positions", "frame_of_token")}
    buckets |= {"pixel_values": tuple(g * patches_per_grid for g in grids), "grid_times": grids}
    buckets |= {k: structural for k in ("struct_positions", "struct_kinds", "struct_ranges", "windows")}
    return data_lib.PipelineConfig(
        batch_size=batch_size,
        seed=config.seed,
        num_epochs=None if train else 1,
        shuffle=train,
        worker_count=config.data.workers,
        buckets=buckets,
        video={"fps": config.data.fps, "max_frames": config.data.max_frames, "size": tuple(config.data.frame_size)},
    )


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def streaming_config(config):
    """The config's TimeScope streaming settings (`config.streaming`), or None without them."""
    from jaxgrounding.memory.hvr import HVRConfig
    from jaxgrounding.memory.streaming import StreamingConfig

    if "streaming" not in config:
        return None
    s = config.streaming
    return StreamingConfig(
        segment_frames=s.segment_frames,
        hvr=HVRConfig(temporal=s.hvr_temporal, spatial=s.hvr_spatial, impl=s.hvr_impl),
        recent_segments=s.recent_segments,
        max_segments=s.max_segments,
        dvr_placement=s.dvr_placement,
    )


def inference_streaming_config(config):
    """Streaming settings for grounding with `config`: its own, or for a model trained without
    them (`ground --memory streaming` on a MeCo workdir) the defaults sized to data.max_frames."""
    from jaxgrounding.memory.streaming import StreamingConfig

    streaming = streaming_config(config)
    if streaming is not None:
        return streaming
    segment_frames = StreamingConfig.segment_frames
    return StreamingConfig(max_segments=-(-config.data.max_frames // 2 // segment_frames))


def coarse_to_fine_config(config):
    from jaxgrounding.tasks.coarse_to_fine import CoarseToFineConfig

    if "coarse_to_fine" not in config:
        return CoarseToFineConfig()
    c = config.coarse_to_fine
    return CoarseToFineConfig(
        margin=c.margin, max_reload_segments=c.max_reload_segments, fine_fraction=c.fine_fraction, jitter=c.jitter
    )


def sft_config(config) -> SFTConfig:
    return SFTConfig(
        streaming=streaming_config(config),
        coarse_to_fine=coarse_to_fine_config(config),
        seed=config.seed,
        st_weight=config.train.st_weight,
        accumulate=config.train.accumulate,
        trainable=optim.TrainableConfig(
            llm=config.trainable.llm, vision=config.trainable.vision, embeddings=config.trainable.embeddings
        ),
        optimizer=optim.OptimizerConfig(
            learning_rate=config.optimizer.learning_rate,
            lora_learning_rate=config.optimizer.lora_learning_rate,
            warmup_fraction=config.optimizer.warmup_fraction,
            weight_decay=config.optimizer.weight_decay,
            grad_clip=config.optimizer.grad_clip,
            total_steps=config.train.steps,
        ),
    )


def build_model(config, checkpoint: str, mesh=None):
    """(GroundingModel, tokenizer): the checkpoint plus <ent>/<tst> rows, heads and LoRA."""
    tokenizer = load_tokenizer(checkpoint)
    llm = jm.from_pretrained(
        checkpoint, dtype=DTYPES[config.model.dtype], mesh=mesh, remat_policy=config.model.remat_policy
    )
    init_token_rows(llm, [tokenizer.ent_id, tokenizer.tst_id], tokenizer.base_vocab_size)
    if config.trainable.llm == "lora":
        apply_lora(
            llm,
            rank=config.lora.rank,
            alpha=config.lora.alpha,
            targets=tuple(config.lora.targets),
            dropout=config.lora.get("dropout", 0.0),
            seed=config.seed,
        )
    return GroundingModel(llm, rngs=nnx.Rngs(config.seed)), tokenizer


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


def sampling_config(config) -> sampling.SamplingConfig:
    return sampling.SamplingConfig(
        max_new_tokens=config.sampling.max_new_tokens,
        temperature=config.sampling.temperature,
        top_p=config.sampling.top_p,
    )


def assignment_config(config) -> inference.AssignmentConfig:
    return inference.AssignmentConfig(
        threshold=config.assignment.threshold or None,
        dilation=config.assignment.dilation,
        nms_iou=config.assignment.nms_iou,
    )


def predict(model: GroundingModel, batch: dict, tokenizer, config, rng, memory: str = "auto"):
    """Predictions for one prompt batch: one causal pass ("full") or TimeScope's streaming
    coarse-to-fine ("streaming"); "auto" streams when the config has streaming settings."""
    if memory not in ("auto", "full", "streaming"):
        raise ValueError(f"memory must be auto, full or streaming, got {memory!r}")
    if memory == "auto":
        memory = "full" if streaming_config(config) is None else "streaming"
    frame_size = tuple(config.data.frame_size)
    args = (model, batch, tokenizer, frame_size, sampling_config(config), assignment_config(config))
    if memory == "full":
        return inference.predict(*args, rng=rng)
    streaming = inference_streaming_config(config)
    return inference.predict_streaming(*args, streaming, coarse_to_fine_config(config), rng=rng)


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
    index, count = jax.process_index(), jax.process_count()
    encoder = StructuralEncoder(checkpoint, encoder_config(config, train=False))
    prompts = _PromptTransform(encoder)
    pipeline = pipeline_config(config, train=False, batch_size=config.eval.batch_size)
    pipeline = dataclasses.replace(pipeline, shard_index=0, shard_count=1)  # the share is cut below
    batches = data_lib.make_pipeline(samples[index::count], pipeline, prompts)
    primary = index == 0
    rows = []
    iterator = iter(batches)
    rng = jax.random.key(config.seed)
    with tqdm.tqdm(total=len(samples[index::count]), desc="evaluate", unit="sample", disable=not primary) as bar:
        for batch in iterator:
            rng, key = jax.random.split(rng)
            predictions = predict(model, batch, tokenizer, config, key)
            for b, prediction in zip(np.flatnonzero(batch["valid"]), predictions):
                gt = batch["windows"][b][batch["windows_mask"][b]].tolist()
                row = {
                    "id": str(batch["id"][b]),
                    "duration": float(batch["duration"][b]),
                    "gt_windows": [[round(s, 3), round(e, 3)] for s, e in gt],
                    "pred_windows": [[round(w.start, 3), round(w.end, 3)] for w in prediction.windows],
                    "scores": [round(float(w.score), 5) for w in prediction.windows],
                    "text": prediction.text,
                }
                if prediction.coarse is not None:
                    row["coarse_windows"] = [[round(w.start, 3), round(w.end, 3)] for w in prediction.coarse.windows]
                    row["reloaded_segments"] = prediction.reloaded
                rows.append(row)
            bar.update(len(predictions))
    skipped = [list(s) for s in iterator.skipped] if hasattr(iterator, "skipped") else []
    os.makedirs(out_dir, exist_ok=True)
    if count > 1:
        rows, skipped = _gather_shares(rows, skipped, samples, out_dir)
    result = metrics.grounding_metrics(
        [r["pred_windows"] for r in rows], [r["gt_windows"] for r in rows], inclusive=config.eval.inclusive
    )
    if rows and "coarse_windows" in rows[0]:
        coarse = metrics.grounding_metrics(
            [r["coarse_windows"] for r in rows], [r["gt_windows"] for r in rows], inclusive=config.eval.inclusive
        )
        result |= {f"coarse_{k}": v for k, v in coarse.items()}
    result |= {"samples": len(rows), "skipped_videos": len(skipped), "inclusive": bool(config.eval.inclusive)}
    if primary:
        with open(os.path.join(out_dir, "predictions.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        with open(os.path.join(out_dir, "metrics.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def _gather_shares(rows: list, skipped: list, samples, out_dir: str) -> tuple[list, list]:
    """Every process's evaluation rows and skipped videos, rows in the order of `samples`."""
    from jax.experimental import multihost_utils

    index, count = jax.process_index(), jax.process_count()
    part = os.path.join(out_dir, f"predictions.part-{{}}-of-{count}.json")
    with open(part.format(index), "w") as f:
        json.dump({"rows": rows, "skipped": skipped}, f)
    multihost_utils.sync_global_devices("jaxgrounding: evaluation shares written")
    shares = []
    for p in range(count):
        with open(part.format(p)) as f:
            shares.append(json.load(f))
    multihost_utils.sync_global_devices("jaxgrounding: evaluation shares read")
    os.remove(part.format(index))
    order = {s.id: i for i, s in enumerate(samples)}
    rows = sorted((r for share in shares for r in share["rows"]), key=lambda r: order[r["id"]])
    return rows, [s for share in shares for s in share["skipped"]]


@dataclasses.dataclass
class _PromptTransform:
    """The evaluation transform: prompt arrays plus the ground truth and id of the sample."""

    encoder: StructuralEncoder

    def __call__(self, sample, video):
        return self.encoder.encode_prompt(sample, video) | {
            "windows": np.asarray(sample.windows, np.float32).reshape(-1, 2),
            "id": np.asarray(sample.id),
        }


def restore_model(config, workdir: str):
    """(model, tokenizer, checkpoint dir, step) of the latest checkpoint in `workdir`."""
    from jaxgrounding.training.checkpoint import Checkpointer, TrainState
    from jaxgrounding.training.sft import SFTTrainer

    checkpoint_dir = config.model.checkpoint or os.path.join(workdir, "tiny_model")
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"{checkpoint_dir}: base checkpoint not found (was {workdir} trained?)")
    model, tokenizer = build_model(config, checkpoint_dir)
    # The trainer gives the exact structure the checkpoint was written with.
    trainer = SFTTrainer(model, sft_config(config), tuple(config.data.frame_size), [tokenizer.ent_id, tokenizer.tst_id])
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
    step = checkpointer.latest_step()
    if step is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to evaluate")
    state, _ = checkpointer.restore(
        TrainState(params=trainer.trainable, opt_state=trainer.opt_state, step=0, rng=jax.random.key(0))
    )
    checkpointer.close()
    trainer.trainable = state.params
    return trainer.model(), tokenizer, checkpoint_dir, step


def load_workdir_config(workdir: str):
    """The config a workdir was trained with (written by train.py)."""
    import ml_collections

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a jaxgrounding workdir (no config.json)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def export_hf(model: GroundingModel, tokenizer, path: str) -> None:
    """Writes the merged model as an HF checkpoint transformers loads: config.json + safetensors
    (LoRA folded into the kernels, <ent>/<tst> rows included), the tokenizer with the structural
    tokens, and MeCo's projector heads in `structural_heads.safetensors` (not an HF module)."""
    import copy

    from jaxgrounding.model import safetensors_io
    from jaxgrounding.model.lora import merge_lora

    llm = copy.deepcopy(model.llm)
    merge_lora(llm)
    jm.save_pretrained(llm, path)
    tokenizer.tokenizer.save_pretrained(path)
    heads = {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model.heads))}
    safetensors_io.write(os.path.join(path, "structural_heads.safetensors"), heads)
