"""HVR pooling reference: against a numpy transcription of the definition, the pooled positions, the identity case
against the model's own RoPE, input validation and implementation dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrounding.memory import hvr
from jaxgrounding.memory.hvr import (
    HVRConfig,
    hvr_downsample,
    hvr_reference,
    pooled_positions,
    resolve_impl,
)
from jaxgrounding.model import layers

THETA = 10000.0


def numpy_hvr(k, v, cos, sin, temporal, spatial):
    """The definition, literally: loop over every pooled token, np.mean its group, rotate with numpy."""
    k, v, cos, sin = (np.asarray(x, np.float64) for x in (k, v, cos, sin))
    n_layers, b, f, p, heads, d = k.shape
    k_out = np.zeros((n_layers, b, f // temporal, p // spatial, heads, d))
    v_out = np.zeros_like(k_out)
    for layer in range(n_layers):
        for bi in range(b):
            for fi in range(f // temporal):
                for pi in range(p // spatial):
                    frames = slice(fi * temporal, (fi + 1) * temporal)
                    tokens = slice(pi * spatial, (pi + 1) * spatial)
                    for h in range(heads):
                        mean_k = np.mean(k[layer, bi, frames, tokens, h].reshape(-1, d), axis=0)
                        rotated_half = np.concatenate([-mean_k[d // 2 :], mean_k[: d // 2]])
                        k_out[layer, bi, fi, pi, h] = mean_k * cos[bi, fi, pi] + rotated_half * sin[bi, fi, pi]
                        v_out[layer, bi, fi, pi, h] = np.mean(v[layer, bi, frames, tokens, h].reshape(-1, d), axis=0)
    return k_out, v_out


def random_inputs(rng, shape, temporal, spatial, dtype=jnp.float32):
    _, b, f, p, _, d = shape
    k = jnp.asarray(rng.standard_normal(shape), dtype)
    v = jnp.asarray(rng.standard_normal(shape), dtype)
    angles = rng.uniform(-np.pi, np.pi, (b, f // temporal, p // spatial, d))  # halves differ on purpose
    return k, v, jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def mrope_grid(b, f, p, width):
    """Qwen2-VL style positions of F frames of a (P / width) x width token grid: [3, B, F, P] int32."""
    t = np.broadcast_to(np.arange(f)[:, None] * 2, (f, p))
    h = np.broadcast_to((np.arange(p) // width)[None, :], (f, p))
    w = np.broadcast_to((np.arange(p) % width)[None, :], (f, p))
    return jnp.asarray(np.broadcast_to(np.stack([t, h, w])[:, None], (3, b, f, p)) + 5, jnp.int32)


@pytest.mark.parametrize(
    "shape,temporal,spatial",
    [
        ((2, 1, 4, 6, 2, 8), 2, 1),
        ((1, 2, 8, 4, 3, 4), 4, 2),
        ((2, 2, 4, 8, 1, 6), 1, 4),
        ((1, 1, 3, 9, 2, 10), 3, 3),
    ],
)
def test_reference_matches_numpy_definition(shape, temporal, spatial):
    k, v, cos, sin = random_inputs(np.random.default_rng(0), shape, temporal, spatial)
    k_out, v_out = hvr_reference(k, v, cos, sin, temporal=temporal, spatial=spatial)
    k_np, v_np = numpy_hvr(k, v, cos, sin, temporal, spatial)
    assert k_out.shape == v_out.shape == k_np.shape and k_out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(k_out), k_np, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v_out), v_np, atol=1e-5)


def test_reference_keeps_dtype_and_accumulates_in_float32():
    # bfloat16 has 8 significant bits: a bfloat16 running sum rounds 256 + 1 back to 256 at every step (mean 64);
    # in float32 the mean is 259 / 4 = 64.75, which rounds to 65 in bfloat16.
    k = jnp.asarray([256.0, 1.0, 1.0, 1.0], jnp.bfloat16).reshape(1, 1, 4, 1, 1, 1) * jnp.ones((2,), jnp.bfloat16)
    cos, sin = jnp.ones((1, 1, 1, 2)), jnp.zeros((1, 1, 1, 2))
    k_out, v_out = hvr_reference(k, k, cos, sin, temporal=4, spatial=1)
    assert k_out.dtype == v_out.dtype == jnp.bfloat16
    assert float(v_out[0, 0, 0, 0, 0, 0]) == 65.0


def test_pooled_positions_hand_computed():
    # One batch, 4 frames of 4 tokens: t = 10 * frame, h = token // 2, w = token % 2.
    t = [[0, 0, 0, 0], [10, 10, 10, 10], [20, 20, 20, 20], [30, 30, 30, 30]]
    h = [[0, 0, 1, 1]] * 4
    w = [[0, 1, 0, 1]] * 4
    positions = jnp.asarray([[t], [h], [w]], jnp.int32)  # [3, 1, 4, 4]
    pooled = pooled_positions(positions, temporal=2, spatial=2)
    assert pooled.shape == (3, 1, 2, 2) and pooled.dtype == jnp.float32
    # Frames {0, 1} and {2, 3}; tokens {0, 1} (row 0, cols 0-1) and {2, 3} (row 1, cols 0-1).
    np.testing.assert_array_equal(pooled[0, 0], [[5.0, 5.0], [25.0, 25.0]])
    np.testing.assert_array_equal(pooled[1, 0], [[0.0, 1.0], [0.0, 1.0]])
    np.testing.assert_array_equal(pooled[2, 0], [[0.5, 0.5], [0.5, 0.5]])
    np.testing.assert_array_equal(pooled_positions(positions, 1, 1), positions.astype(jnp.float32))


@pytest.mark.parametrize("impl", ["reference", "pallas_interpret"])
def test_no_pooling_equals_rope_at_own_positions(impl):
    n_layers, b, f, p, heads, d, section = 2, 2, 3, 6, 2, 16, (2, 3, 3)
    k, v, _, _ = random_inputs(np.random.default_rng(1), (n_layers, b, f, p, heads, d), 1, 1)
    positions = mrope_grid(b, f, p, width=3)
    k_out, v_out, pooled = hvr_downsample(
        k, v, positions, config=HVRConfig(1, 1, impl), head_dim=d, rope_theta=THETA, mrope_section=section
    )
    cos, sin = layers.mrope_cos_sin(positions.reshape(3, b, f * p), d, THETA, section, jnp.float32)
    expected = layers.apply_rotary(k.reshape(n_layers, b, f * p, heads, d), cos, sin)
    np.testing.assert_allclose(np.asarray(k_out).reshape(expected.shape), np.asarray(expected), atol=1e-6)
    np.testing.assert_array_equal(v_out, v)
    np.testing.assert_array_equal(pooled, positions.astype(jnp.float32))


def test_downsample_rotates_the_mean_key_at_the_mean_position():
    n_layers, b, f, p, heads, d, section = 1, 1, 4, 4, 2, 8, (2, 1, 1)
    k, v, _, _ = random_inputs(np.random.default_rng(2), (n_layers, b, f, p, heads, d), 1, 1)
    positions = mrope_grid(b, f, p, width=2)
    k_out, _, pooled = hvr_downsample(
        k, v, positions, config=HVRConfig(2, 2, "reference"), head_dim=d, rope_theta=THETA, mrope_section=section
    )
    cos, sin = layers.mrope_cos_sin(pooled.reshape(3, b, 4), d, THETA, section, jnp.float32)
    mean_k = k.reshape(n_layers, b, 2, 2, 2, 2, heads, d).mean(axis=(3, 5)).reshape(n_layers, b, 4, heads, d)
    expected = layers.apply_rotary(mean_k, cos, sin).reshape(k_out.shape)
    np.testing.assert_allclose(np.asarray(k_out), np.asarray(expected), atol=1e-6)
    assert pooled[0, 0, 0, 0] == 5.0 + 1.0  # frames 0, 1 at t = 5, 7


@pytest.mark.parametrize(
    "shape,temporal,spatial,head_dim,match",
    [
        ((1, 1, 6, 4, 1, 8), 4, 1, 8, "F=6 is not divisible by temporal=4"),
        ((1, 1, 4, 6, 1, 8), 2, 4, 8, "P=6 is not divisible by spatial=4"),
        ((1, 1, 4, 4, 1, 7), 2, 1, 7, "D=7 must be even"),
        ((1, 1, 4, 4, 1, 8), 2, 1, 16, "differs from head_dim=16"),
        ((1, 1, 4, 4, 1, 8), 0, 1, 8, "must be >= 1"),
    ],
)
def test_downsample_validation(shape, temporal, spatial, head_dim, match):
    k = jnp.zeros(shape)
    positions = jnp.zeros((3,) + shape[1:4], jnp.int32)
    section = (head_dim // 2 - 2, 1, 1)
    with pytest.raises(ValueError, match=match):
        hvr_downsample(
            k,
            k,
            positions,
            config=HVRConfig(temporal, spatial, impl="auto"),
            head_dim=head_dim,
            rope_theta=THETA,
            mrope_section=section,
        )


def test_downsample_validates_positions_section_and_impl():
    k = jnp.zeros((1, 1, 4, 4, 1, 8))
    good = {"head_dim": 8, "rope_theta": THETA, "mrope_section": (2, 1, 1)}
    with pytest.raises(ValueError, match=r"positions must be \[3, B, F, P\]"):
        hvr_downsample(k, k, jnp.zeros((3, 1, 4, 5)), config=HVRConfig(2, spatial=1, impl="auto"), **good)
    with pytest.raises(ValueError, match="must sum to head_dim // 2 = 4"):
        hvr_downsample(
            k,
            k,
            jnp.zeros((3, 1, 4, 4)),
            config=HVRConfig(2, spatial=1, impl="auto"),
            **{**good, "mrope_section": (2, 2, 2)},
        )
    with pytest.raises(ValueError, match="values must match"):
        hvr_downsample(k, k[..., :4], jnp.zeros((3, 1, 4, 4)), config=HVRConfig(2, spatial=1, impl="auto"), **good)
    with pytest.raises(ValueError, match="impl must be one of"):
        hvr_downsample(k, k, jnp.zeros((3, 1, 4, 4)), config=HVRConfig(2, impl="triton", spatial=1), **good)


def test_auto_dispatch(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "reference"
    assert resolve_impl("auto", "gpu") == resolve_impl("auto", "tpu") == "pallas"
    assert resolve_impl("pallas_interpret") == "pallas_interpret"

    calls = []

    def fake_pallas(k, v, cos, sin, *, temporal, spatial, interpret):
        calls.append(interpret)
        return hvr_reference(k, v, cos, sin, temporal=temporal, spatial=spatial)

    monkeypatch.setattr(hvr, "hvr_pallas", fake_pallas)
    positions = jnp.zeros((3, 1, 4, 4), jnp.int32)

    def pool(head_dim, section):
        k = jnp.ones((1, 1, 4, 4, 1, head_dim))
        config = HVRConfig(2, spatial=1, impl="auto")
        hvr_downsample(k, k, positions, config=config, head_dim=head_dim, rope_theta=THETA, mrope_section=section)

    pool(8, (2, 1, 1))
    assert calls == []  # cpu: the reference
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    pool(8, (2, 1, 1))
    assert calls == [False]  # gpu: the compiled kernel
    pool(12, (4, 1, 1))  # D / 2 = 6: no power-of-two Triton tile, so "auto" falls back
    assert calls == [False]
