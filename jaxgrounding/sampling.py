"""Token generation with the KV cache: prefill once, then a jitted decode loop.

`generate` runs prefill and a `lax.while_loop` of one-token decode steps inside one jit, stops
when every row has produced an end token (or after `max_new_tokens`), and can return, for each
generated token, the hidden states of chosen layers at the position that *predicted* it (what
MeCo grounds structural tokens with). Sampling: greedy (temperature 0), or temperature with
top-k and top-p (nucleus) filtering; logits are float32. Sampling settings are always explicit
arguments: nothing is read from a checkpoint's generation_config.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrounding.model.decoder import KVCache, Memory
from jaxgrounding.model.video_llm import ModelInputs


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter


def sample_tokens(logits_bv: jax.Array, rng: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token per row from float32 logits [B, V]."""
    logits_bv = logits_bv.astype(jnp.float32)
    if config.temperature <= 0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / config.temperature
    if config.top_k > 0:
        kth = jax.lax.top_k(logits_bv, config.top_k)[0][:, -1:]
        logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
    if config.top_p < 1.0:
        order = jnp.argsort(-logits_bv, axis=-1)
        sorted_logits = jnp.take_along_axis(logits_bv, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        drop_sorted = (cumulative - jax.nn.softmax(sorted_logits, axis=-1)) >= config.top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(order.shape[0])[:, None], order].set(drop_sorted)
        logits_bv = jnp.where(drop, -jnp.inf, logits_bv)
    return jax.random.categorical(rng, logits_bv, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
    """tokens: [B, N] (after a row's end: its end token repeated); lengths: [B] tokens up to and
    including the end token (N when it never came); predicting: {layer: [B, N, E]} state that predicted token n;
    prompt_hidden: {layer: [B, T, E]} prefill states of `prompt_layers`."""

    tokens: jax.Array
    lengths: jax.Array
    predicting: dict
    prompt_hidden: dict


@functools.partial(
    jax.jit, static_argnames=("graphdef", "config", "end_ids", "hidden_layers", "prompt_layers", "cache_length")
)
def _generate(graphdef, state, inputs, rng, memory, *, config, end_ids, hidden_layers, prompt_layers, cache_length):
    model = nnx.merge(graphdef, state)
    b, t = inputs.input_ids.shape
    n = config.max_new_tokens
    cache = KVCache.zeros(model.config, b, cache_length)
    start = 0
    if memory is not None:
        # The cache starts with the memory (keys already rotated, any order); the prompt follows.
        start = memory.size
        pad = [(0, 0), (0, 0), (0, cache_length), (0, 0), (0, 0)]
        cache = dataclasses.replace(
            cache,
            keys=jnp.pad(memory.keys.astype(cache.keys.dtype), pad),
            values=jnp.pad(memory.values.astype(cache.values.dtype), pad),
            key_valid=jnp.pad(memory.valid, [(0, 0), (0, cache_length)]),
        )
    layers = tuple(sorted(set(hidden_layers) | set(prompt_layers)))
    logits, cache, hidden = model.prefill(inputs, cache, layers, start=start)
    last = jnp.max(jnp.where(inputs.attention_mask, jnp.arange(t), -1), axis=1)
    first_states = {k: hidden[k][jnp.arange(b), last] for k in hidden_layers}
    e = model.config.text.hidden_size
    predicting = {k: jnp.zeros((b, n, e), jnp.float32).at[:, 0].set(first_states[k]) for k in hidden_layers}
    ends = jnp.asarray(end_ids, jnp.int32)

    def cond(carry):
        i, _, _, _, done, _, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, logits, cache, tokens, done, lengths, predicting, rng = carry
        rng, key = jax.random.split(rng)
        token = sample_tokens(logits, key, config)
        token = jnp.where(done, tokens[jnp.arange(b), jnp.maximum(i - 1, 0)], token)
        tokens = tokens.at[:, i].set(token)
        lengths = jnp.where(done, lengths, i + 1)
        done = done | jnp.isin(token, ends)
        logits, cache, states = model.decode_step(token, cache, hidden_layers)
        # The states of token i predict token i + 1.
        predicting = {
            k: v.at[:, jnp.minimum(i + 1, n - 1)].set(jnp.where(i + 1 < n, states[k], v[:, n - 1]))
            for k, v in predicting.items()
        }
        return i + 1, logits, cache, tokens, done, lengths, predicting, rng

    carry = (
        0,
        logits,
        cache,
        jnp.zeros((b, n), jnp.int32),
        jnp.zeros((b,), bool),
        jnp.zeros((b,), jnp.int32),
        predicting,
        rng,
    )
    _, _, _, tokens, _, lengths, predicting, _ = jax.lax.while_loop(cond, body, carry)
    # The loop stops once every row has ended; pad each row after its end with its last token.
    last = tokens[jnp.arange(b), jnp.maximum(lengths - 1, 0)]
    tokens = jnp.where(jnp.arange(n)[None, :] < lengths[:, None], tokens, last[:, None])
    return Generation(
        tokens=tokens, lengths=lengths, predicting=predicting, prompt_hidden={k: hidden[k] for k in prompt_layers}
    )


def generate(
    model,
    inputs: ModelInputs,
    config: SamplingConfig,
    *,
    end_ids: Sequence[int],
    rng=None,
    hidden_layers: Sequence[int] = (),
    prompt_layers: Sequence[int] = (),
    memory: Memory | None = None,
) -> Generation:
    """Generates up to `config.max_new_tokens` tokens after each prompt of `inputs`; with a
    `memory` (a streamed video, `jaxgrounding.memory.streaming`) the prompt continues it."""
    graphdef, state = nnx.split(model)
    rng = jax.random.key(0) if rng is None else rng
    t = inputs.input_ids.shape[1]
    # Cache long enough for prompt + generation, rounded so nearby prompt lengths share a compile.
    cache_length = -(-(t + config.max_new_tokens) // 64) * 64
    return _generate(
        graphdef,
        state,
        inputs,
        rng,
        memory,
        config=config,
        end_ids=tuple(int(i) for i in end_ids),
        hidden_layers=tuple(hidden_layers),
        prompt_layers=tuple(prompt_layers),
        cache_length=cache_length,
    )
