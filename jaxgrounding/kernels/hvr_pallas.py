"""Fused Pallas kernel for HVR pooling (see jaxgrounding.memory.hvr for what is pooled and why).

One kernel reads every group of keys and values once and writes the pooled values and the pooled keys already
rotated at the pooled positions, instead of XLA's separate mean, rotate_half (a concatenate), multiply and add
passes over the keys.

Layout (all reshapes below are free: they only split or merge contiguous dims of row-major arrays):
    k, v    [L, B, F, P, Kh, D]   viewed as [L, B, F', r, P', s*Kh*D]
    cos/sin [B, F', P', D]
    outputs [L, B, F', P', Kh*D]  reshaped back to [L, B, F', P', Kh, D]
with F' = F / r (r = temporal) and P' = P / s (s = spatial). The grid is (B, F', P' / bp, L): each step owns `bp`
pooled tokens of one layer; its input block [r, bp, s*Kh*D] is the whole group of every pooled token, so no
partial sums cross grid steps. L is the innermost grid axis so consecutive steps reuse the cos/sin block (Mosaic
skips the copy when a block index does not change).

Inside the kernel every load and store is a static [bp, D/2] (keys, one half of one head) or [bp, D] (values, one
head) window of a block, and the group mean is an unrolled sum over the r*s members in float32. rotate_half never
materialises: the two halves of a head are loaded separately and combined as
    out1 = x1 * cos1 - x2 * sin1,    out2 = x2 * cos2 + x1 * sin2,
which is x * cos + rotate_half(x) * sin with rotate_half(x) = concat([-x2, x1]). The kernel uses only loads,
stores, converts and elementwise arithmetic: no reshape, concatenate, reduction or in-register slicing, which
keeps it inside what both the Triton and the Mosaic lowerings accept.

Backend constraints:
- GPU (Triton): every loaded/stored tile must have power-of-two dims, so D / 2 must be a power of two (D = 128 in
  Qwen2-VL / Qwen2.5-VL) and bp is a power of two dividing P' (default: the largest one <= 32, so P' = 144 runs
  as 9 blocks of 16 and an odd P' as blocks of 1, correct but slow). Kh, r, s and P' themselves are unconstrained.
  Unsupported shapes raise ValueError (see hvr_pallas_unsupported_reason); nothing is padded or masked.
- TPU (Mosaic): the last two dims of every block are full array dims (bp = P' by default), as Mosaic requires
  unless they are multiples of (8, 128); the half-head windows start at lane offsets that are multiples of D / 2.
  The TPU path lowers to Mosaic but has not been run on a TPU.
- interpret=True runs anywhere (the CPU tests) and tiles like the GPU path so the tests exercise that tiling.

Backward (pallas_call has no VJP of its own, so `hvr_pallas` is a jax.custom_vjp; the streamed SFT step
differentiates through it). Pooling and rotation are linear in k and v, so with g the output cotangents
    d pooled_k = g_k * cos + rotate_half^T(g_k * sin),   rotate_half^T(y) = concat([y2, -y1]),
    dk = d pooled_k / (r*s) for every member of the group,   dv = g_v / (r*s) likewise,
neither of which reads k or v. They come from a second fused kernel, the transpose of the forward one: the same
grid, BlockSpecs and tiling with inputs and outputs swapped. Each step reads the [bp, Kh*D] cotangent blocks once
and stores every [bp, D/2] / [bp, D] window of its [r, bp, s*Kh*D] group blocks, applying the inverse rotation
per half head (d1 = g1*cos1 + g2*sin2, d2 = g2*cos2 - g1*sin1), so it obeys the same Triton and Mosaic rules.
There is one backward, the fused one, because it is the faster: on an H200 (2026-12-04, jax 0.11.2, Triton) at
the Qwen2.5-VL-7B shape (L=28, Kh=4, D=128; 16 frames of 144 tokens, temporal=4), host dispatch amortised over
200 calls, it took 65 us (2.5 TB/s) against 97 us (1.7 TB/s) for XLA's transpose of hvr_reference in bfloat16,
97 us against 110 us in float32. bench/hvr_kernel.py --backward times both (jax.vjp of hvr_pallas and of
hvr_reference).

cos and sin are differentiable inputs too: dcos = sum over L, Kh of g_k * pooled_k and dsin = sum over L, Kh of
g_k * rotate_half(pooled_k), computed with jnp in the backward rule. Those sums run across grid steps (every layer
and head of a pooled token), which the all-parallel grid cannot accumulate, and they need the un-rotated pooled
keys, which the backward recomputes from the saved k rather than the forward writing them as a third output: in
practice cos and sin come from integer positions, so nothing consumes dcos/dsin and under jit XLA deletes the
recomputation (and with it the last use of the saved k), while an extra kernel output would be written on every
differentiated forward whether used or not.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

MAX_GPU_BLOCK_TOKENS = 32  # [32, 64] float32 tiles keep the per-head live set in registers at 4 warps.


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _largest_power_of_two_divisor(n: int, cap: int) -> int:
    block = 1
    while n % (2 * block) == 0 and 2 * block <= cap:
        block *= 2
    return block


def hvr_pallas_unsupported_reason(k_shape, temporal: int, spatial: int, backend: str) -> str | None:
    """None when `hvr_pallas` (compiled, not interpreted) can take keys of `k_shape` on `backend`, else why not."""
    if len(k_shape) != 6:
        return f"keys must be [L, B, F, P, Kh, D], got shape {tuple(k_shape)}"
    _, _, f, p, _, d = k_shape
    if temporal < 1 or spatial < 1 or f % temporal or p % spatial:
        return f"F={f} and P={p} must be divisible by temporal={temporal} and spatial={spatial}"
    if d % 2:
        return f"head dim D={d} must be even"
    if backend == "gpu" and not _is_power_of_two(d // 2):
        return f"the Triton path needs power-of-two tiles, so D / 2 must be a power of two, got D={d}"
    return None


def _hvr_kernel(k_ref, v_ref, cos_ref, sin_ref, k_out_ref, v_out_ref, *, temporal, spatial, heads, head_dim):
    """k_ref, v_ref: [r, bp, s*Kh*D] groups; cos_ref, sin_ref: [bp, D]; k_out_ref, v_out_ref: [bp, Kh*D]."""
    half = head_dim // 2
    count = temporal * spatial

    def group_mean(ref, offset, width):
        """Float32 mean over the r*s group members of the [bp, width] window at `offset` within a head."""
        total = None
        for t in range(temporal):
            for j in range(spatial):
                x = ref[t, :, pl.ds(j * heads * head_dim + offset, width)].astype(jnp.float32)
                total = x if total is None else total + x
        return total / count

    cos1 = cos_ref[:, pl.ds(0, half)].astype(jnp.float32)
    cos2 = cos_ref[:, pl.ds(half, half)].astype(jnp.float32)
    sin1 = sin_ref[:, pl.ds(0, half)].astype(jnp.float32)
    sin2 = sin_ref[:, pl.ds(half, half)].astype(jnp.float32)
    for h in range(heads):
        base = h * head_dim
        k1 = group_mean(k_ref, base, half)
        k2 = group_mean(k_ref, base + half, half)
        k_out_ref[:, pl.ds(base, half)] = (k1 * cos1 - k2 * sin1).astype(k_out_ref.dtype)
        k_out_ref[:, pl.ds(base + half, half)] = (k2 * cos2 + k1 * sin2).astype(k_out_ref.dtype)
        v_out_ref[:, pl.ds(base, head_dim)] = group_mean(v_ref, base, head_dim).astype(v_out_ref.dtype)


def _hvr_bwd_kernel(gk_ref, gv_ref, cos_ref, sin_ref, dk_ref, dv_ref, *, temporal, spatial, heads, head_dim):
    """The transpose of _hvr_kernel. gk_ref, gv_ref: [bp, Kh*D] output cotangents; cos_ref, sin_ref: [bp, D];
    dk_ref, dv_ref: [r, bp, s*Kh*D] groups, every window of which is stored (the output has no other writer)."""
    half = head_dim // 2
    count = temporal * spatial

    def broadcast_to_group(ref, value, offset, width):
        """Stores the [bp, width] float32 `value` / (r*s) into the window at `offset` of every group member."""
        value = (value / count).astype(ref.dtype)
        for t in range(temporal):
            for j in range(spatial):
                ref[t, :, pl.ds(j * heads * head_dim + offset, width)] = value

    cos1 = cos_ref[:, pl.ds(0, half)].astype(jnp.float32)
    cos2 = cos_ref[:, pl.ds(half, half)].astype(jnp.float32)
    sin1 = sin_ref[:, pl.ds(0, half)].astype(jnp.float32)
    sin2 = sin_ref[:, pl.ds(half, half)].astype(jnp.float32)
    for h in range(heads):
        base = h * head_dim
        g1 = gk_ref[:, pl.ds(base, half)].astype(jnp.float32)
        g2 = gk_ref[:, pl.ds(base + half, half)].astype(jnp.float32)
        # g * cos + rotate_half^T(g * sin), rotate_half^T(y) = concat([y2, -y1]), one half head at a time.
        broadcast_to_group(dk_ref, g1 * cos1 + g2 * sin2, base, half)
        broadcast_to_group(dk_ref, g2 * cos2 - g1 * sin1, base + half, half)
        broadcast_to_group(dv_ref, gv_ref[:, pl.ds(base, head_dim)].astype(jnp.float32), base, head_dim)


def _compiler_params(backend: str, interpret: bool):
    """Triton explicitly on GPU (not Mosaic GPU, whatever jax_pallas_use_mosaic_gpu says); all-parallel on TPU
    (forward and backward: every grid step writes its own output blocks and accumulates nothing)."""
    if interpret:
        return None
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=(pltpu.PARALLEL,) * 4)
    return None


def hvr_pallas(
    k: jax.Array,
    v: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    *,
    temporal: int,
    spatial: int,
    interpret: bool = False,
    block_tokens: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as jaxgrounding.memory.hvr.hvr_reference, in one fused kernel; differentiable in k, v, cos
    and sin (a custom VJP whose dk, dv come from a fused backward kernel, see the module docstring).

    k, v: [L, B, F, P, Kh, D] (keys pre-RoPE); cos, sin: [B, F // temporal, P // spatial, D].
    Returns (pooled keys rotated, pooled values): [L, B, F // temporal, P // spatial, Kh, D] in k's / v's dtype.
    block_tokens: pooled tokens per grid step (must divide P // spatial; a power of two unless on TPU). Default:
    all of them on TPU, else the largest power-of-two divisor <= MAX_GPU_BLOCK_TOKENS. The backward tiles alike.
    """
    backend = jax.default_backend()
    reason = hvr_pallas_unsupported_reason(k.shape, temporal, spatial, "interpret" if interpret else backend)
    if reason:
        raise ValueError(f"hvr_pallas cannot take this input: {reason}.")
    if v.shape != k.shape:
        raise ValueError(f"hvr_pallas: values must match the keys' shape {k.shape}, got {v.shape}.")
    n_layers, b, f, p, heads, d = k.shape
    f_pooled, p_pooled = f // temporal, p // spatial
    if cos.shape != (b, f_pooled, p_pooled, d) or sin.shape != cos.shape:
        raise ValueError(
            f"hvr_pallas: cos and sin must be [B, F', P', D] = {(b, f_pooled, p_pooled, d)}, "
            f"got {cos.shape} and {sin.shape}."
        )
    on_tpu = backend == "tpu" and not interpret
    if block_tokens is None:
        block_tokens = p_pooled if on_tpu else _largest_power_of_two_divisor(p_pooled, MAX_GPU_BLOCK_TOKENS)
    if p_pooled % block_tokens or not (on_tpu or _is_power_of_two(block_tokens)):
        raise ValueError(
            f"hvr_pallas: block_tokens={block_tokens} must divide P'={p_pooled}"
            + ("." if on_tpu else " and be a power of two (Triton tiles).")
        )
    return _hvr(k, v, cos, sin, temporal, spatial, interpret, block_tokens, backend)


def _block_specs(temporal, spatial, block_tokens, width, head_dim):
    """(group, table, pooled) BlockSpecs over the grid (B, F', P' / bp, L), shared by the forward and backward
    kernels: group blocks [r, bp, s*Kh*D] of the [L, B, F', r, P', s*Kh*D] view of k, v (or dk, dv), table blocks
    [bp, D] of cos and sin, pooled blocks [bp, Kh*D] of the [L, B, F', P', Kh*D] outputs (or their cotangents)."""
    sq = pl.squeezed
    group = pl.BlockSpec(
        (sq, sq, sq, temporal, block_tokens, spatial * width), lambda bi, fi, pi, li: (li, bi, fi, 0, pi, 0)
    )
    table = pl.BlockSpec((sq, sq, block_tokens, head_dim), lambda bi, fi, pi, li: (bi, fi, pi, 0))
    pooled = pl.BlockSpec((sq, sq, sq, block_tokens, width), lambda bi, fi, pi, li: (li, bi, fi, pi, 0))
    return group, table, pooled


def _forward(k, v, cos, sin, temporal, spatial, interpret, block_tokens, backend):
    n_layers, b, f, p, heads, d = k.shape
    f_pooled, p_pooled = f // temporal, p // spatial
    width = heads * d
    k_groups = k.reshape(n_layers, b, f_pooled, temporal, p_pooled, spatial * width)
    v_groups = v.reshape(n_layers, b, f_pooled, temporal, p_pooled, spatial * width)
    group_spec, table_spec, pooled_spec = _block_specs(temporal, spatial, block_tokens, width, d)
    pooled_shape = (n_layers, b, f_pooled, p_pooled, width)
    bytes_accessed = (
        k.size * k.dtype.itemsize
        + v.size * v.dtype.itemsize
        + cos.size * cos.dtype.itemsize
        + sin.size * sin.dtype.itemsize
        + (k.size * k.dtype.itemsize + v.size * v.dtype.itemsize) // (temporal * spatial)
    )
    kernel = functools.partial(_hvr_kernel, temporal=temporal, spatial=spatial, heads=heads, head_dim=d)
    k_out, v_out = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(pooled_shape, k.dtype), jax.ShapeDtypeStruct(pooled_shape, v.dtype)),
        grid=(b, f_pooled, p_pooled // block_tokens, n_layers),
        in_specs=[group_spec, group_spec, table_spec, table_spec],
        out_specs=(pooled_spec, pooled_spec),
        interpret=interpret,
        compiler_params=_compiler_params(backend, interpret),
        cost_estimate=pl.CostEstimate(
            flops=2 * (k.size + v.size) + 6 * k.size // (temporal * spatial),
            transcendentals=0,
            bytes_accessed=bytes_accessed,
        ),
        name="hvr_pool",
    )(k_groups, v_groups, cos, sin)
    final_shape = (n_layers, b, f_pooled, p_pooled, heads, d)
    return k_out.reshape(final_shape), v_out.reshape(final_shape)


def _backward(g_k, g_v, cos, sin, temporal, spatial, interpret, block_tokens, backend):
    """dk, dv [L, B, F, P, Kh, D] in g_k's / g_v's dtype (= k's / v's) from the [L, B, F', P', Kh, D] cotangents."""
    n_layers, b, f_pooled, p_pooled, heads, d = g_k.shape
    width = heads * d
    group_spec, table_spec, pooled_spec = _block_specs(temporal, spatial, block_tokens, width, d)
    pooled_shape = (n_layers, b, f_pooled, p_pooled, width)
    group_shape = (n_layers, b, f_pooled, temporal, p_pooled, spatial * width)
    bytes_accessed = (
        (g_k.size * g_k.dtype.itemsize + g_v.size * g_v.dtype.itemsize) * (1 + temporal * spatial)
        + cos.size * cos.dtype.itemsize
        + sin.size * sin.dtype.itemsize
    )
    kernel = functools.partial(_hvr_bwd_kernel, temporal=temporal, spatial=spatial, heads=heads, head_dim=d)
    dk, dv = pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(group_shape, g_k.dtype), jax.ShapeDtypeStruct(group_shape, g_v.dtype)),
        grid=(b, f_pooled, p_pooled // block_tokens, n_layers),
        in_specs=[pooled_spec, pooled_spec, table_spec, table_spec],
        out_specs=(group_spec, group_spec),
        interpret=interpret,
        compiler_params=_compiler_params(backend, interpret),
        cost_estimate=pl.CostEstimate(
            flops=6 * g_k.size + 2 * g_v.size, transcendentals=0, bytes_accessed=bytes_accessed
        ),
        name="hvr_pool_bwd",
    )(g_k.reshape(pooled_shape), g_v.reshape(pooled_shape), cos, sin)
    full_shape = (n_layers, b, f_pooled * temporal, p_pooled * spatial, heads, d)
    return dk.reshape(full_shape), dv.reshape(full_shape)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _hvr(k, v, cos, sin, temporal, spatial, interpret, block_tokens, backend):
    """hvr_pallas after validation; the static arguments (ints, bool, backend name) are nondiff_argnums."""
    return _forward(k, v, cos, sin, temporal, spatial, interpret, block_tokens, backend)


def _hvr_fwd(k, v, cos, sin, temporal, spatial, interpret, block_tokens, backend):
    # dk and dv need only cos and sin; k is kept for dcos / dsin alone (dead, hence freed, when those are unused).
    return _forward(k, v, cos, sin, temporal, spatial, interpret, block_tokens, backend), (k, cos, sin)


def _hvr_bwd(temporal, spatial, interpret, block_tokens, backend, residuals, cotangents):
    k, cos, sin = residuals
    g_k, g_v = cotangents
    dk, dv = _backward(g_k, g_v, cos, sin, temporal, spatial, interpret, block_tokens, backend)
    # dcos, dsin: sums over layers and heads (across grid steps), so jnp; pooled_k is recomputed exactly as
    # hvr_reference pools (see the module docstring for why it is not saved by the forward kernel).
    n_layers, b, f, p, heads, d = k.shape
    grouped = k.astype(jnp.float32).reshape(n_layers, b, f // temporal, temporal, p // spatial, spatial, heads, d)
    pooled_k = grouped.mean(axis=(3, 5))
    g_k32 = g_k.astype(jnp.float32)
    dcos = jnp.sum(g_k32 * pooled_k, axis=(0, 4)).astype(cos.dtype)
    dsin = jnp.sum(g_k32 * _rotate_half(pooled_k), axis=(0, 4)).astype(sin.dtype)
    return dk, dv, dcos, dsin


_hvr.defvjp(_hvr_fwd, _hvr_bwd)
