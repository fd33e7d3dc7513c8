"""Causal-LM cross-entropy from final hidden states, without materialising all logits.

loss = sum_i w_i * (logsumexp_v(h_i . W_v) - h_i . W_{y_i}) / sum_i w_i, in float32.

The tokens are processed in chunks under `jax.checkpoint` inside a `lax.scan`, so at most
[chunk, vocab] logits exist at once in the forward pass and the backward pass recomputes each
chunk's logits instead of storing them: with Qwen's 152k vocabulary the full [B, T, V] float32
logits (and their gradient) would otherwise dominate training memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chunked_cross_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, chunk_size: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """Summed weighted token NLL and the weight total.

    hidden: [N, E] final hidden states; head: [E, V] (the LM head kernel, or the embedding
    table transposed when tied); targets: [N] int; weights: [N] float (0 for tokens without a
    loss). Returns (sum of w_i * nll_i, sum of w_i), both float32 scalars.
    """
    n, e = hidden.shape
    pad = -n % chunk_size
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    chunks = (n + pad) // chunk_size
    xs = (
        hidden.reshape(chunks, chunk_size, e),
        targets.reshape(chunks, chunk_size),
        weights.reshape(chunks, chunk_size).astype(jnp.float32),
    )

    @jax.checkpoint
    def chunk_loss(h, y, w):
        logits = jnp.dot(h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        target_logit = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        return jnp.sum(w * (jax.nn.logsumexp(logits, axis=-1) - target_logit))

    def body(total, x):
        return total + chunk_loss(*x), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total, jnp.sum(weights.astype(jnp.float32))


def lm_head_matrix(model) -> jax.Array:
    """The [E, V] matrix that maps final hidden states to logits (tied or not)."""
    decoder = model.decoder
    if decoder.lm_head is not None:
        return decoder.lm_head.kernel[...]
    return decoder.embed_tokens[...].T


def next_token_loss(
    model, last_hidden_state: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, chunk_size: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """Mean NLL of predicting token t+1 from position t where loss_mask[t + 1] is set.

    last_hidden_state: [B, T, E]; input_ids, loss_mask: [B, T]. Returns (mean loss, tokens).
    """
    b, t, e = last_hidden_state.shape
    hidden = last_hidden_state[:, :-1].reshape(-1, e)
    targets = input_ids[:, 1:].reshape(-1)
    weights = loss_mask[:, 1:].reshape(-1).astype(jnp.float32)
    total, count = chunked_cross_entropy(hidden, lm_head_matrix(model), targets, weights, chunk_size)
    return total / jnp.maximum(count, 1.0), count
