"""GRPO: group-relative advantages and the clipped policy loss with a KL penalty, as TRL's GRPOTrainer
and Tunix's GRPO learner define them.

Advantages (`group_advantages`). The rewards of P prompts with G completions each, ordered p * G + g, are
centred by an estimator registered by name: "grpo" subtracts the group mean (DeepSeekMath, Shao et al.
2024), "rloo" the mean of the other G - 1 (REINFORCE leave-one-out; = G / (G - 1) times the former).
`scale` then divides by the unbiased (ddof = 1) standard deviation plus `eps` (TRL's eps 1e-4): of each
group ("group", GRPO), of the whole batch ("batch", TRL's scale_rewards="batch") or not at all ("none",
Dr. GRPO). A group whose rewards are all equal carries no signal: its advantages are exactly 0 (not
rounding noise divided by eps), and it is counted (TRL logs the fraction as frac_reward_zero_std).

Loss (`grpo_loss`), per completion token t of sequence i, with A_i the advantage:

    r_it = exp(logp_it - old_it)   ("sequence" importance sampling, GSPO: exp of the sequence's masked
                                    mean of logp - old, the same for all its tokens)
    l_it = -min(r_it * A_i, clip(r_it, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_it
    KL_it: "k3" exp(d) - d - 1 with d = ref - logp clamped to [-20, 20] (Schulman's k3; TRL, Time-R1);
           "k1" logp - ref (Tunix's default); "k2" (logp - ref)^2 / 2

aggregated over the masked tokens as `loss_type` says: "grpo" the token mean of each sequence, then the
mean over sequences; "bnpo" the token sum over the token count of these rows; "dr_grpo" the token sum
over rows * max_completion_length; "dapo" the token sum over `num_items_in_batch`. "dapo" is the one
whose normaliser spans micro-batches: the caller passes it so that the micro-batch losses, combined the
way its trainer combines them, give the token mean of the whole batch (TRL sums its accumulation steps
and passes the global token count over the number of processes; a trainer that averages k micro-batch
gradients passes the batch's token count over k). With one policy update per rollout the old policy is
the current one: r = 1 exactly and nothing clips (expected).

All arrays: logps / old_logps / ref_logps / mask [B, N] (float32 log-probs of the sampled completion
tokens; mask 1 on completion tokens), advantages [B]. Masked positions may hold anything (padding
garbage included): they are replaced before any arithmetic, so they reach neither the loss nor its
gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

KL_EXPONENT_CLAMP = 20.0  # |ref - logp| beyond this makes exp() in k3 overflow float32 soon after

ADVANTAGE_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {}
SCALES = ("group", "batch", "none")
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING = ("token", "sequence")


def register_advantage_estimator(name: str):
    """Decorator: registers `fn(rewards [P, G]) -> centred advantages [P, G]` under `name` (G >= 2)."""

    def register(fn):
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"an advantage estimator named {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return register


@register_advantage_estimator("grpo")
def _group_mean_baseline(rewards_pg: jax.Array) -> jax.Array:
    return rewards_pg - jnp.mean(rewards_pg, axis=1, keepdims=True)


@register_advantage_estimator("rloo")
def _leave_one_out_baseline(rewards_pg: jax.Array) -> jax.Array:
    g = rewards_pg.shape[1]
    return rewards_pg - (jnp.sum(rewards_pg, axis=1, keepdims=True) - rewards_pg) / (g - 1)


def group_advantages(
    rewards: jax.Array, group_size: int, *, estimator: str = "grpo", scale: str = "group", eps: float = 1e-4
) -> tuple[jax.Array, jax.Array]:
    """Advantages [P * G] float32 of rewards [P * G] ordered p * G + g, and zero_std [P] bool: the groups
    whose rewards are all equal (advantage 0). Count them with zero_std.sum(), log zero_std.mean()."""
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; known: {', '.join(ADVANTAGE_ESTIMATORS)}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; known: {', '.join(SCALES)}")
    rewards = jnp.asarray(rewards, jnp.float32)
    if rewards.ndim != 1 or group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards {rewards.shape} are not P groups of group_size={group_size}")
    rewards_pg = rewards.reshape(-1, group_size)
    zero_std = jnp.max(rewards_pg, axis=1) == jnp.min(rewards_pg, axis=1)
    if group_size == 1:  # a lone completion has nothing to be compared with
        return jnp.zeros_like(rewards), zero_std
    advantages = ADVANTAGE_ESTIMATORS[estimator](rewards_pg)
    if scale == "group":
        advantages = advantages / (jnp.std(rewards_pg, axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        advantages = advantages / (jnp.std(rewards, ddof=1) + eps)
    advantages = jnp.where(zero_std[:, None], 0.0, advantages)
    return advantages.reshape(-1).astype(jnp.float32), zero_std


def _kl(logps: jax.Array, ref_logps: jax.Array, kind: str) -> jax.Array:
    if kind == "k3":
        d = jnp.clip(ref_logps - logps, -KL_EXPONENT_CLAMP, KL_EXPONENT_CLAMP)
        return jnp.exp(d) - d - 1.0
    if kind == "k1":
        return logps - ref_logps
    return 0.5 * jnp.square(logps - ref_logps)


def grpo_loss(
    logps: jax.Array,
    old_logps: jax.Array,
    ref_logps: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    kl: str = "k3",
    loss_type: str = "grpo",
    importance_sampling: str = "token",
    num_items_in_batch: jax.Array | float | None = None,
    max_completion_length: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss (module docstring) and metrics, all float32 scalars: "kl" (token mean of KL_it),
    "clip_ratio_low" / "clip_ratio_high" / "clip_ratio_region" (share of tokens, or of sequences with
    "sequence" importance sampling, whose ratio left [1 - eps_low, 1 + eps_high] on the side where the
    clip binds: below with A < 0, above with A > 0, either), "ratio_mean"."""
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kl!r}; known: {', '.join(KL_ESTIMATORS)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(
            f"unknown importance_sampling {importance_sampling!r}; known: {', '.join(IMPORTANCE_SAMPLING)}"
        )
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError('loss_type="dr_grpo" needs max_completion_length')
    if loss_type == "dapo" and num_items_in_batch is None:
        raise ValueError('loss_type="dapo" needs num_items_in_batch (the token count it normalises by)')
    if logps.ndim != 2 or not logps.shape == old_logps.shape == ref_logps.shape == mask.shape:
        raise ValueError(f"logps {logps.shape}, old {old_logps.shape}, ref {ref_logps.shape}, mask {mask.shape}")
    if advantages.shape != logps.shape[:1]:
        raise ValueError(f"advantages {advantages.shape} do not match {logps.shape[0]} sequences")

    valid = mask > 0
    weights = valid.astype(jnp.float32)
    # Zero the masked positions first: a where() after the arithmetic would still send NaN gradients
    # through inf / NaN padding values.
    logps = jnp.where(valid, logps.astype(jnp.float32), 0.0)
    old_logps = jnp.where(valid, old_logps.astype(jnp.float32), 0.0)
    ref_logps = jnp.where(valid, ref_logps.astype(jnp.float32), 0.0)
    advantages_b1 = advantages.astype(jnp.float32)[:, None]
    tokens_b = jnp.sum(weights, axis=1)

    log_ratio = logps - old_logps
    if importance_sampling == "sequence":
        log_ratio = (jnp.sum(log_ratio * weights, axis=1) / jnp.maximum(tokens_b, 1.0))[:, None]
    ratio = jnp.exp(log_ratio)  # [B, N] or [B, 1]
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    surrogate = -jnp.minimum(ratio * advantages_b1, clipped * advantages_b1)
    kl_bn = jnp.where(valid, _kl(logps, ref_logps, kl), 0.0)
    per_token = jnp.broadcast_to(surrogate, logps.shape) + beta * kl_bn
    token_sum = jnp.sum(per_token * weights)

    if loss_type == "grpo":
        loss = jnp.mean(jnp.sum(per_token * weights, axis=1) / jnp.maximum(tokens_b, 1.0))
    elif loss_type == "bnpo":
        loss = token_sum / jnp.maximum(jnp.sum(weights), 1.0)
    elif loss_type == "dr_grpo":
        loss = token_sum / (logps.shape[0] * max_completion_length)
    else:
        loss = token_sum / jnp.maximum(jnp.asarray(num_items_in_batch, jnp.float32), 1.0)

    # Clip statistics per unit of importance sampling: tokens, or sequences that have tokens.
    units = weights if importance_sampling == "token" else (tokens_b > 0).astype(jnp.float32)[:, None]
    low = (ratio < 1.0 - epsilon_low) & (advantages_b1 < 0)
    high = (ratio > 1.0 + epsilon_high) & (advantages_b1 > 0)
    count = jnp.maximum(jnp.sum(units), 1.0)

    def unit_mean(x):
        return jnp.sum(x.astype(jnp.float32) * units) / count

    metrics = {
        "kl": jnp.sum(kl_bn) / jnp.maximum(jnp.sum(weights), 1.0),
        "clip_ratio_low": unit_mean(low),
        "clip_ratio_high": unit_mean(high),
        "clip_ratio_region": unit_mean(low | high),
        "ratio_mean": unit_mean(ratio),
    }
    return loss, metrics
