"""The fused HVR Pallas kernel (interpret mode on CPU) against the jnp reference, its tiling and shape checks, and
that it lowers for Triton (GPU) and Mosaic (TPU) without such a device.

Tolerances: float32 must agree to 1e-6 (the two differ only in the float32 summation order of the group mean).
bfloat16 outputs are compared against the reference run on the same bfloat16 inputs; both compute in float32 and
round once at the end, so a float32 difference of a few ulp can flip that final rounding by one bfloat16 ulp
(2^-7 relative at most, with 8 significant bits) and never more: |kernel - reference| <= 2^-7 |reference| + 1e-6.

Gradients (jax.vjp with random cotangents, kernel in interpret mode vs XLA's transpose of the reference) use the same
bounds, for the same reasons. dk, dv: both sides compute (g1*cos1 + g2*sin2) / (r*s) (and the like) in float32 from
the same cotangents and round to k's dtype once; in float32 they differ by at most a rounding or two (XLA may fuse
the multiply-add) of values below 8 (|dk| <= |g1| + |g2| for unit-bounded cos, sin), so 1e-6 absolute holds; in
bfloat16 that final rounding may flip by one ulp, the 2^-7 relative bound. dcos, dsin (float32, like the tables)
are the same jnp sums over L and Kh of g_k * pooled_k on both sides, so they differ only by summation order: with
L*Kh <= 8 terms of magnitude < 10 here, 1e-6 absolute holds (no relative bound is needed at these sizes; larger
L*Kh would need one, of about L*Kh float32 ulps of the largest partial sum: at the 7B shape, L*Kh = 112, compiled
on an H200 the two summation orders differed by 3.8e-6).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrounding.kernels.hvr_pallas import hvr_pallas, hvr_pallas_unsupported_reason
from jaxgrounding.memory.hvr import HVRConfig, hvr_downsample, hvr_reference

SHAPES = [  # (L, B, F, P, Kh, D), temporal, spatial
    ((1, 1, 4, 4, 1, 8), 4, 1),
    ((2, 1, 4, 6, 2, 8), 2, 1),  # P = 6
    ((1, 2, 4, 36, 2, 16), 4, 2),  # P = 36, P' = 18: blocks of 2
    ((2, 1, 2, 8, 1, 4), 1, 4),
    ((1, 1, 8, 6, 4, 8), 2, 2),  # P' = 3: blocks of 1
    ((3, 1, 4, 16, 2, 8), 1, 1),
    ((1, 1, 4, 36, 1, 8), 1, 4),  # P' = 9
    ((2, 2, 8, 64, 2, 8), 4, 1),  # P' = 64: two blocks of 32
    ((1, 1, 4, 12, 3, 32), 2, 4),  # Kh = 3
    ((1, 1, 3, 4, 2, 6), 3, 1),  # temporal = 3, D / 2 = 3 (interpret only; Triton needs a power of two)
]


def random_inputs(shape, temporal, spatial, dtype, seed=0):
    rng = np.random.default_rng(seed)
    _, b, f, p, _, d = shape
    k = jnp.asarray(rng.standard_normal(shape), dtype)
    v = jnp.asarray(rng.standard_normal(shape), dtype)
    angles = rng.uniform(-np.pi, np.pi, (b, f // temporal, p // spatial, d))  # halves differ: both must be used
    return k, v, jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def assert_close(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype == dtype
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if dtype == jnp.float32:
        assert np.max(np.abs(out - ref)) <= 1e-6
    else:
        assert np.all(np.abs(out - ref) <= 2.0**-7 * np.abs(ref) + 1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,temporal,spatial", SHAPES)
def test_kernel_matches_reference(shape, temporal, spatial, dtype):
    k, v, cos, sin = random_inputs(shape, temporal, spatial, dtype)
    k_out, v_out = hvr_pallas(k, v, cos, sin, temporal=temporal, spatial=spatial, interpret=True)
    k_ref, v_ref = hvr_reference(k, v, cos, sin, temporal=temporal, spatial=spatial)
    assert_close(k_out, k_ref, dtype)
    assert_close(v_out, v_ref, dtype)


@pytest.mark.parametrize("block_tokens", [1, 4, 16])
def test_explicit_block_tokens(block_tokens):
    shape, temporal, spatial = (2, 1, 4, 32, 2, 8), 2, 2
    k, v, cos, sin = random_inputs(shape, temporal, spatial, jnp.float32, seed=1)
    out = hvr_pallas(k, v, cos, sin, temporal=temporal, spatial=spatial, interpret=True, block_tokens=block_tokens)
    ref = hvr_reference(k, v, cos, sin, temporal=temporal, spatial=spatial)
    for o, r in zip(out, ref):
        assert_close(o, r, jnp.float32)


def test_shape_errors():
    k, v, cos, sin = random_inputs((1, 1, 4, 24, 1, 8), 2, 2, jnp.float32)
    with pytest.raises(ValueError, match="must divide P'=12"):
        hvr_pallas(k, v, cos, sin, temporal=2, spatial=2, interpret=True, block_tokens=5)
    with pytest.raises(ValueError, match="power of two"):
        hvr_pallas(k, v, cos, sin, temporal=2, spatial=2, interpret=True, block_tokens=6)
    with pytest.raises(ValueError, match="cos and sin must be"):
        hvr_pallas(k, v, cos[:, :, :6], sin[:, :, :6], temporal=2, spatial=2, interpret=True)
    with pytest.raises(ValueError, match="divisible by temporal=3"):
        hvr_pallas(k, v, cos, sin, temporal=3, spatial=2, interpret=True)
    assert hvr_pallas_unsupported_reason((1, 1, 4, 4, 2, 12), 2, 1, "gpu").startswith("the Triton path")
    assert hvr_pallas_unsupported_reason((1, 1, 4, 4, 2, 12), 2, 1, "tpu") is None
    assert hvr_pallas_unsupported_reason((1, 1, 4, 4, 2, 128), 4, 4, "gpu") is None


@pytest.mark.parametrize(
    "platform,backend,marker", [("cuda", "gpu", "xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")]
)
def test_lowers_without_the_device(monkeypatch, platform, backend, marker):
    """Cross-lowers the compiled (non-interpret) kernel at the realistic shape: catches Triton's power-of-two tile
    rule, unsupported primitives and Mosaic's block-shape rule on a CPU-only machine. It does not compile or run."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    k = jax.ShapeDtypeStruct((28, 1, 16, 144, 4, 128), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((1, 4, 144, 128), jnp.float32)
    traced = jax.jit(lambda *a: hvr_pallas(*a, temporal=4, spatial=1)).trace(k, k, table, table)
    assert marker in traced.lower(lowering_platforms=(platform,)).as_text()


def random_cotangents(shape, temporal, spatial, dtype, seed=2):
    """Cotangents of (pooled keys, pooled values): [L, B, F', P', Kh, D] in `dtype`."""
    rng = np.random.default_rng(seed)
    n_layers, b, f, p, heads, d = shape
    pooled = (n_layers, b, f // temporal, p // spatial, heads, d)
    return jnp.asarray(rng.standard_normal(pooled), dtype), jnp.asarray(rng.standard_normal(pooled), dtype)


def jitted_vjp(fn, inputs, cotangents):
    """jax.vjp of fn at `inputs`, applied to `cotangents`, as one jitted computation: one compile instead of op-by-op
    dispatch, which keeps these tests fast. Returns the cotangents of every input."""
    return jax.jit(lambda args, g: jax.vjp(fn, *args)[1](g))(inputs, cotangents)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape,temporal,spatial", SHAPES)
def test_gradients_match_reference(shape, temporal, spatial, dtype):
    """The custom VJP (fused backward kernel for dk, dv; jnp for dcos, dsin) against XLA's transpose of the
    reference, for all four inputs."""
    inputs = random_inputs(shape, temporal, spatial, dtype)
    cotangents = random_cotangents(shape, temporal, spatial, dtype)
    pools = {"temporal": temporal, "spatial": spatial}
    grads = jitted_vjp(functools.partial(hvr_pallas, **pools, interpret=True), inputs, cotangents)
    expected = jitted_vjp(functools.partial(hvr_reference, **pools), inputs, cotangents)
    for grad, ref, grad_dtype in zip(grads, expected, (dtype, dtype, jnp.float32, jnp.float32)):
        assert_close(grad, ref, grad_dtype)


def test_grad_through_downsample_pallas_equals_reference():
    """hvr_downsample differentiates through every impl: keys, values and (float) positions, the latter through
    the kernel's dcos / dsin and the M-RoPE tables."""
    n_layers, b, f, p, heads, d, section = 2, 1, 4, 8, 2, 8, (2, 1, 1)
    rng = np.random.default_rng(3)
    k = jnp.asarray(rng.standard_normal((n_layers, b, f, p, heads, d)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((n_layers, b, f, p, heads, d)), jnp.float32)
    positions = jnp.asarray(rng.uniform(0.0, 20.0, (3, b, f, p)), jnp.float32)
    weights = jnp.asarray(rng.standard_normal((2, n_layers, b, f // 2, p // 2, heads, d)), jnp.float32)

    def loss(impl, k, v, positions):
        config = HVRConfig(temporal=2, spatial=2, impl=impl)
        k_out, v_out, _ = hvr_downsample(
            k, v, positions, config=config, head_dim=d, rope_theta=10000.0, mrope_section=section
        )
        return jnp.sum(k_out * weights[0]) + jnp.sum(v_out * weights[1])

    grad = {
        impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2)))(k, v, positions)
        for impl in ("pallas_interpret", "reference")
    }
    for got, ref in zip(grad["pallas_interpret"], grad["reference"]):
        assert_close(got, ref, jnp.float32)
    assert float(jnp.max(jnp.abs(grad["reference"][2]))) > 0  # positions do reach the loss


@pytest.mark.parametrize(
    "platform,backend,marker", [("cuda", "gpu", "xla.gpu.triton"), ("tpu", "tpu", "tpu_custom_call")]
)
def test_backward_lowers_without_the_device(monkeypatch, platform, backend, marker):
    """Cross-lowers jax.grad through the compiled kernel at the realistic shape: the forward and the fused backward
    kernel (two custom calls) must both pass Triton's / Mosaic's lowering rules."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    k = jax.ShapeDtypeStruct((28, 1, 16, 144, 4, 128), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((1, 4, 144, 128), jnp.float32)

    def loss(k, v, cos, sin):
        k_out, v_out = hvr_pallas(k, v, cos, sin, temporal=4, spatial=1)
        return jnp.sum(k_out.astype(jnp.float32) ** 2) + jnp.sum(v_out.astype(jnp.float32))

    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(k, k, table, table)
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert text.count(marker) == 2 and "hvr_pool_bwd" in text
