"""Per-token log-probabilities and the causal-LM cross-entropy from final hidden states, without
materialising all logits.

log p(y_i) = z_{i, y_i} / tau - logsumexp_v(z_{i, v} / tau), z_i = h_i . W, in float32;
loss = -sum_i w_i * log p(y_i) / sum_i w_i at tau = 1.

`token_logprobs` is the one log-probability function: the LM loss is built on it, and so are the
policy and reference log-probs of RL fine-tuning (GRPO), teacher-forced over sampled completions.
The tokens are processed in chunks under `jax.checkpoint` inside a `lax.scan`, so at most
[chunk, vocab] logits exist at once in the forward pass and the backward pass recomputes each
chunk's logits instead of storing them: with Qwen's 152k vocabulary the full [B, T, V] float32
logits (and their gradient) would otherwise dominate training memory.

Temperature follows TRL and Tunix: the log-probability is taken under softmax(logits / tau), the
distribution a sampler at temperature tau draws from before any top-k / top-p truncation; tau <= 0
(greedy) means the raw logits. The rule itself is `sampling.logprobs_from_logits`, which the sampler
applies to the logits of its decode steps, so sampled and teacher-forced log-probs agree by
construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgrounding.sampling import logprobs_from_logits


def token_logprobs(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, *, temperature: float = 1.0, chunk_size: int = 1024
) -> jax.Array:
    """log p(targets) under softmax(hidden @ head / temperature), float32, chunked over tokens.

    hidden: [..., E] final hidden states; head: [E, V] (the LM head kernel, or the embedding table
    transposed when tied); targets: [...] int (same leading shape). Returns [...] float32.
    Differentiable (the loss and the GRPO policy term backpropagate through it).
    """
    lead, e = hidden.shape[:-1], hidden.shape[-1]
    if targets.shape != lead:
        raise ValueError(f"targets {targets.shape} do not match hidden states {hidden.shape}")
    hidden = hidden.reshape(-1, e)
    targets = targets.reshape(-1)
    n = hidden.shape[0]
    chunk_size = max(1, min(chunk_size, n))
    pad = -n % chunk_size
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
    chunks = (n + pad) // chunk_size

    @jax.checkpoint
    def chunk_logprobs(h, y):
        logits = jnp.dot(h, head.astype(h.dtype), preferred_element_type=jnp.float32)
        return logprobs_from_logits(logits, y, temperature)

    def body(_, x):
        return None, chunk_logprobs(*x)

    _, out = jax.lax.scan(body, None, (hidden.reshape(chunks, chunk_size, e), targets.reshape(chunks, chunk_size)))
    return out.reshape(-1)[:n].reshape(lead)


def chunked_cross_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, chunk_size: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """Summed weighted token NLL and the weight total.

    hidden: [N, E] final hidden states; head: [E, V] (the LM head kernel, or the embedding
    table transposed when tied); targets: [N] int; weights: [N] float (0 for tokens without a
    loss). Returns (sum of w_i * nll_i, sum of w_i), both float32 scalars.
    """
    weights = weights.astype(jnp.float32)
    logp = token_logprobs(hidden, head, targets, chunk_size=chunk_size)
    return -jnp.sum(weights * logp), jnp.sum(weights)


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
