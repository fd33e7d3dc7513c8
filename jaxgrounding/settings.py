"""Settings derived from several config sections at once: the data pipeline's buckets and the model's dtypes.

The config files (configs/*.py, ml_collections; configs/meco.py is the base) hold every default. A settings
dataclass built from one section is built next to its own definition (`SamplingConfig.from_config`,
`StreamingConfig.from_config`, ...); what is derived here (bucket ladders from the frame and token budgets)
has no section of its own.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxgrounding import data as data_lib
from jaxgrounding.data import schema

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def model_dtypes(config) -> tuple:
    """(parameter dtype, compute dtype) of `config.model`: `model.dtype` and `model.compute_dtype`, whose
    "auto" is the parameter dtype. The recipes keep float32 weights and compute in bfloat16."""
    # A workdir's config.json written before the setting existed ran its compute in the parameter dtype on CPU.
    compute = config.model.get("compute_dtype", "auto")
    for key, value in (("model.dtype", config.model.dtype), ("model.compute_dtype", compute)):
        if value not in DTYPES and not (key == "model.compute_dtype" and value == "auto"):
            allowed = sorted(DTYPES) + (["auto"] if key == "model.compute_dtype" else [])
            raise ValueError(f"{key}={value!r}: supported are {allowed}")
    param_dtype = DTYPES[config.model.dtype]
    return param_dtype, param_dtype if compute == "auto" else DTYPES[compute]


def _ladder(limit: int, start: int) -> tuple[int, ...]:
    """Bucket sizes start, 1.5 * start, 2 * start, 3 * start, ... up to and including `limit`."""
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size = size * 3 // 2 if (size & (size - 1)) == 0 else size * 4 // 3
    return tuple(sizes) + (limit,)


def pipeline_config(config, *, train: bool, batch_size: int) -> data_lib.PipelineConfig:
    """Buckets derived from the frame budget, so a config change never needs a bucket change: one ladder of sizes
    per variable axis of the batch schema (`data.schema`), for every table's keys."""
    h, w = config.data.frame_size
    patches_per_grid = (h // 14) * (w // 14)
    max_grids = -(-config.data.max_frames // 2)
    grids = _ladder(max_grids, min(8, max_grids))
    segment_frames = config.streaming.segment_frames
    # A streamed example has as many segments as its grids fill; the suffix is padded to multiples of 16.
    segments = tuple(sorted({-(-g // segment_frames) for g in grids}))
    suffix = tuple(sorted({-(-n // 16) * 16 for n in _ladder(config.encoder.max_tokens, min(16, config.encoder.max_tokens))}))
    ladders = {
        "text": _ladder(config.encoder.max_tokens, min(128, config.encoder.max_tokens)),
        "patches": tuple(g * patches_per_grid for g in grids),
        "grids": grids,
        "structural": (4, 8, 16, 32, 64),
        "windows": (4, 8, 16, 32, 64),
        # Decoded frames (GRPO builds its prompts on the host, once the step's task is drawn).
        "frames": tuple(2 * g for g in grids),
        "segments": segments,
        "segment_grids": tuple(n * segment_frames for n in segments),
        "suffix": suffix,
    }
    buckets = {}
    for table in (schema.SUPERVISED, schema.STREAMED, schema.DECODED):
        buckets |= schema.buckets(table, ladders)
    return data_lib.PipelineConfig(
        batch_size=batch_size,
        seed=config.seed,
        num_epochs=None if train else 1,
        shuffle=train,
        worker_count=config.data.workers,
        # Evaluation reports its skips instead of stopping on their fraction.
        max_failure_fraction=config.data.max_failure_fraction if train else 1.0,
        max_duration_error=config.data.max_duration_error,
        buckets=buckets,
        video={"fps": config.data.fps, "max_frames": config.data.max_frames, "size": tuple(config.data.frame_size)},
    )


def prompt_buckets(config) -> dict[str, tuple[int, ...]]:
    """Bucket sizes of prompt arrays built on the host (GRPO rollouts, answer evaluation), as the
    pipeline's: a few shapes, so the jitted rollout and score functions compile a few times."""
    buckets = pipeline_config(config, train=True, batch_size=1).buckets
    return {k: v for k, v in buckets.items() if k in schema.PROMPT}


def answer_format(config) -> str:
    """"structural" (MeCo's <ent>/<tst>, read through frame similarity) or "timestamps" (Time-R1's text)."""
    return config.answer.format if "answer" in config else "structural"


def video_first(config) -> bool:
    """Whether answer-format prompts put the video before the instruction: a streamed config's must (the video
    is streamed into memory first, then the question asks), and MeCo's structural prompts do; Time-R1's put the
    query first."""
    return config.memory == "streaming" or answer_format(config) == "structural"
