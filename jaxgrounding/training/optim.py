"""Which parameters train, and the optimizer that trains them.

MeCo's recipe (REFERENCE.md, "Training recipe"): AdamW, weight decay 0, cosine schedule with 3%
warmup, gradient clipping at 1.0; the vision tower frozen; the merger, the structural heads and
logit scale, and the embedding rows of the new tokens trained; the LLM either fully or through
LoRA (adapters at their own learning rate).

`trainable_filter(config)` is an nnx filter over (path, variable); `make_optimizer` builds one
optax chain with a learning rate per group (LoRA adapters vs everything else), and
`mask_token_rows` zeroes the gradient of every embedding / LM-head row except the new tokens'
when the LLM is not trained in full (so only `<ent>` / `<tst>` rows move).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

LLM_MODES = ("full", "lora", "frozen")


@dataclasses.dataclass(frozen=True)
class TrainableConfig:
    """Built from the config's `trainable` section (its values are the defaults: configs/meco.py)."""

    llm: str  # "full" | "lora" | "frozen"
    vision: bool  # train the vision tower (its merger always trains)
    embeddings: str  # "all" | "new_tokens": rows of embed_tokens / lm_head that train

    @classmethod
    def from_config(cls, config) -> TrainableConfig:
        t = config.trainable
        return cls(llm=t.llm, vision=t.vision, embeddings=t.embeddings)


def _path_str(path) -> str:
    return ".".join(str(p) for p in path)


def trainable_filter(config: TrainableConfig):
    """nnx filter selecting the parameters that receive gradients."""
    if config.llm not in LLM_MODES:
        raise ValueError(f"llm mode {config.llm!r} is not one of {LLM_MODES}")

    def keep(path, variable) -> bool:
        if not isinstance(variable, nnx.Param):
            return False
        name = _path_str(path)
        if isinstance(variable, nnx.LoRAParam):
            return config.llm == "lora"
        if name.startswith("llm.visual."):
            return config.vision or name.startswith("llm.visual.merger.")
        if name.startswith("llm.decoder.embed_tokens") or name.startswith("llm.decoder.lm_head"):
            return config.llm == "full" or config.embeddings in ("all", "new_tokens")
        if name.startswith("llm.decoder."):
            return config.llm == "full"
        return True  # structural heads, logit scale

    return keep


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Built from the config's `optimizer` section and `train.steps` (their values are the defaults:
    configs/meco.py); Adam's betas are not in the configs: every recipe uses these."""

    learning_rate: float
    lora_learning_rate: float
    warmup_fraction: float
    weight_decay: float
    grad_clip: float
    total_steps: int
    b1: float = 0.9
    b2: float = 0.999

    @classmethod
    def from_config(cls, config) -> OptimizerConfig:
        o = config.optimizer
        return cls(
            learning_rate=o.learning_rate,
            lora_learning_rate=o.lora_learning_rate,
            warmup_fraction=o.warmup_fraction,
            weight_decay=o.weight_decay,
            grad_clip=o.grad_clip,
            total_steps=config.train.steps,
        )


def _schedule(peak: float, config: OptimizerConfig):
    warmup = max(1, int(config.warmup_fraction * config.total_steps))
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(config.total_steps, warmup + 1), 0.0)


def make_optimizer(config: OptimizerConfig, params) -> optax.GradientTransformation:
    """AdamW with warmup-cosine schedules (LoRA adapters at their own rate) after global-norm clipping.

    `params`: the trainable nnx State; its LoRAParam leaves get `lora_learning_rate`.
    """

    def adamw(peak):
        return optax.adamw(_schedule(peak, config), config.b1, config.b2, weight_decay=config.weight_decay)

    labels = jax.tree.map(
        lambda v: "lora" if isinstance(v, nnx.LoRAParam) else "base",
        params,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.multi_transform({"base": adamw(config.learning_rate), "lora": adamw(config.lora_learning_rate)}, labels),
    )


def mask_token_rows(grads, token_ids, enabled: bool):
    """Keeps only the rows of `token_ids` in the embedding / LM-head gradients (when `enabled`)."""
    if not enabled:
        return grads
    flat = dict(nnx.to_flat_state(grads))
    for path, var in flat.items():
        name = _path_str(path)
        if name == "llm.decoder.embed_tokens":
            rows = jnp.zeros((var.get_value().shape[0],), bool).at[jnp.asarray(token_ids)].set(True)
            var.set_value(jnp.where(rows[:, None], var.get_value(), 0))
        elif name == "llm.decoder.lm_head.kernel":
            cols = jnp.zeros((var.get_value().shape[1],), bool).at[jnp.asarray(token_ids)].set(True)
            var.set_value(jnp.where(cols[None, :], var.get_value(), 0))
    return nnx.from_flat_state(flat)
