"""Chunked LM cross-entropy against a direct numpy transcription of the equation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrounding.objectives.lm import chunked_cross_entropy


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
