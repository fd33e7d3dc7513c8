"""Attention (dense, block-causal, decode) and rotary helpers against numpy references."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrounding.model import layers


def numpy_attention(q, k, v, key_valid, offset):
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    out = np.zeros_like(q, dtype=np.float64)
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi].astype(np.float64) @ k[bi, :, hi // g].T.astype(np.float64) / math.sqrt(d)
            mask = np.broadcast_to(key_valid[bi][None], (t, s)).copy()
            if offset is not None:
                mask &= np.arange(s)[None] <= (offset + np.arange(t))[:, None]
            logits = np.where(mask, logits, -1e30)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, hi // g]
    return out


@pytest.mark.parametrize("t,s,offset", [(300, 300, 0), (200, 260, 0), (1, 64, 40), (50, 50, None)])
def test_attention_matches_numpy(t, s, offset):
    rng = np.random.default_rng(t)
    q = rng.standard_normal((2, t, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, s, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, s, 2, 8)).astype(np.float32)
    key_valid = np.ones((2, s), bool)
    key_valid[1, :7] = False  # left padding
    want = numpy_attention(q, k, v, key_valid, offset)
    got = layers.attention(q, k, v, key_valid, causal_offset=offset, block_size=64)
    rows = np.ones((2, t), bool)
    if offset is not None:
        rows[1] = (offset + np.arange(t)) >= 7  # padding queries see nothing; not compared
    np.testing.assert_allclose(np.asarray(got)[rows], want[rows], atol=1e-5)
    if offset == 0:  # the traced (decode) path gives the same result as the blocked static one
        dense = layers.attention(q, k, v, key_valid, causal_offset=jnp.asarray(0), block_size=64)
        np.testing.assert_allclose(np.asarray(dense)[rows], np.asarray(got)[rows], atol=1e-5)


@pytest.mark.parametrize("t,memory", [(150, 90), (64, 30), (20, 0)])
def test_memory_attention_matches_numpy(t, memory):
    """New tokens over [memory (all visible where valid) | themselves (causal)], in sequential
    query blocks, including a ragged last block."""
    rng = np.random.default_rng(t + memory)
    s = memory + t
    q = rng.standard_normal((2, t, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, s, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, s, 2, 8)).astype(np.float32)
    key_valid = rng.random((2, s)) < 0.8
    key_valid[:, memory:] = True
    want = numpy_attention(q, k, v, key_valid, memory)
    got = layers.memory_attention(q, k, v, key_valid, memory_size=memory, block_size=32)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_mrope_hand_case():
    """head_dim 8, sections (1, 2, 1): band 0 follows t, bands 1-2 follow h, band 3 follows w."""
    positions = jnp.array([[[3]], [[5]], [[7]]])  # [3, B=1, T=1]
    cos, _ = layers.mrope_cos_sin(positions, 8, 10000.0, (1, 2, 1), jnp.float32)
    inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    angles = np.array([3 * inv[0], 5 * inv[1], 5 * inv[2], 7 * inv[3]])
    np.testing.assert_allclose(np.asarray(cos)[0, 0], np.cos(np.concatenate([angles, angles])), rtol=1e-6)


def test_vision_rotary_hand_case():
    """head_dim 8: bands (4 of them) = [row * f0, row * f1, col * f0, col * f1], repeated."""
    cos, _ = layers.vision_cos_sin(jnp.array([[2, 9]]), 8, 10000.0)
    inv = 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)
    angles = np.array([2 * inv[0], 2 * inv[1], 9 * inv[0], 9 * inv[1]])
    np.testing.assert_allclose(np.asarray(cos)[0], np.cos(np.concatenate([angles, angles])), rtol=1e-6)
