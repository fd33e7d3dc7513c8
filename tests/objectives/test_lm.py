"""Chunked LM cross-entropy and per-token log-probabilities against a direct numpy transcription of the
equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrounding.objectives.lm import chunked_cross_entropy, token_logprobs


def numpy_reference(hidden, head, targets, weights):
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = lse - logits[np.arange(len(targets)), targets]
    return (weights * nll).sum(), weights.sum()


@pytest.mark.parametrize("n,chunk", [(37, 8), (64, 64), (5, 1024)])
def test_matches_numpy_and_gradients_match_dense(n, chunk):
    rng = np.random.default_rng(n)
    e, v = 16, 50
    hidden = rng.standard_normal((n, e)).astype(np.float32)
    head = rng.standard_normal((e, v)).astype(np.float32)
    targets = rng.integers(0, v, n)
    weights = (rng.random(n) > 0.3).astype(np.float32)
    total, count = chunked_cross_entropy(
        jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), jnp.asarray(weights), chunk_size=chunk
    )
    want_total, want_count = numpy_reference(hidden, head, targets, weights)
    np.testing.assert_allclose(float(total), want_total, rtol=1e-5)
    assert float(count) == want_count

    def dense(h, w):
        logp = jax.nn.log_softmax(h @ w, -1)
        return -jnp.sum(weights * jnp.take_along_axis(logp, targets[:, None], -1)[:, 0])

    chunked = lambda h, w: chunked_cross_entropy(h, w, jnp.asarray(targets), jnp.asarray(weights), chunk)[0]
    for got, want in zip(jax.grad(chunked, (0, 1))(hidden, head), jax.grad(dense, (0, 1))(hidden, head)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("temperature", [0.7, 0.0])
def test_token_logprobs_match_numpy_at_a_temperature(temperature):
    """[B, T] log-probabilities under softmax(logits / T) (raw logits at T = 0), chunked over tokens
    that do not fill the last chunk; the loss is their weighted mean."""
    rng = np.random.default_rng(7)
    b, t, e, v = 3, 7, 16, 50
    hidden = rng.standard_normal((b, t, e)).astype(np.float32)
    head = rng.standard_normal((e, v)).astype(np.float32)
    targets = rng.integers(0, v, (b, t))
    got = token_logprobs(
        jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets), temperature=temperature, chunk_size=4
    )
    logits = hidden.astype(np.float64) @ head / (temperature if temperature > 0 else 1.0)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want = np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    assert got.shape == (b, t) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    weights = (rng.random((b, t)) > 0.3).astype(np.float32)
    total, count = chunked_cross_entropy(
        jnp.asarray(hidden.reshape(-1, e)),
        jnp.asarray(head),
        jnp.asarray(targets.reshape(-1)),
        jnp.asarray(weights.reshape(-1)),
        chunk_size=4,
    )
    if temperature == 0.0:  # the loss is at temperature 1 = the raw logits
        np.testing.assert_allclose(float(total), -(weights * want).sum(), rtol=1e-5)
