"""The video-LLM backbone: Qwen2-VL / Qwen2.5-VL in Flax NNX, loading and saving HF checkpoints.

model = jaxgrounding.model.from_pretrained("/ckpt/Qwen2.5-VL-3B-Instruct", dtype=jnp.bfloat16)
out = model(input_ids=..., attention_mask=..., pixel_values_videos=..., video_grid_thw=...,
            second_per_grid_ts=...)
out.logits  # [B, T, V]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrounding.model.config import ConfigError, ModelConfig
from jaxgrounding.model.decoder import KVCache
from jaxgrounding.model.video_llm import ModelInputs, ModelOutput, VideoLLM, decode_step, prefill, prepare_inputs
from jaxgrounding.model.weights import CheckpointError, load_state, save_pretrained


def default_compute_dtype():
    """bfloat16 on accelerators, float32 on CPU (where bf16 matmuls are emulated and slow)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def from_pretrained(
    path: str,
    dtype=jnp.float32,
    mesh=None,
    compute_dtype=None,
    remat_policy: str | None = None,
    attention: str | None = None,
) -> VideoLLM:
    """Builds a VideoLLM from an HF checkpoint directory (config.json + safetensors).

    dtype: parameter dtype; compute_dtype: activation dtype (default: `default_compute_dtype()`);
    mesh: place each parameter directly into its sharding on this mesh; remat_policy: of the decoder's
    layer scan (default: `ModelConfig.remat_policy`); attention: the implementation (`model.attention`,
    default: `ModelConfig.attention`).
    """
    overrides = {} if remat_policy is None else {"remat_policy": remat_policy}
    if attention is not None:
        overrides["attention"] = attention
    config = ModelConfig.from_pretrained(
        path, param_dtype=dtype, compute_dtype=compute_dtype or default_compute_dtype(), **overrides
    )
    abstract = nnx.eval_shape(lambda: VideoLLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    state = load_state(path, abstract_state, config, mesh)
    return nnx.merge(graphdef, state)


__all__ = [
    "CheckpointError",
    "ConfigError",
    "KVCache",
    "ModelConfig",
    "ModelInputs",
    "ModelOutput",
    "VideoLLM",
    "decode_step",
    "default_compute_dtype",
    "from_pretrained",
    "prefill",
    "prepare_inputs",
    "save_pretrained",
]
