"""Rotary helpers against hand-computed cases."""


import jax.numpy as jnp
import numpy as np

from jaxgrounding.model import layers


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
