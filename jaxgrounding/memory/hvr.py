"""HVR (holistic video representation): TimeScope's per-segment global memory of pooled keys and values.

A long video is streamed through the decoder one segment at a time. For every segment, each decoder layer's keys
and values of the segment's visual tokens are averaged over `temporal` consecutive frames (at the same token index)
and, optionally, over `spatial` consecutive tokens within a frame; the pooled tokens are kept as memory that later
segments attend to.

Why keys are pooled before RoPE and rotated at the mean position: RoPE rotates each frequency pair of a key by an
angle proportional to its position. The mean of keys rotated by different angles is not the rotation of any key at
any single angle: its norm shrinks with the angle spread and its phase is a blend, so queries would see it at no
well-defined time. Averaging the un-rotated keys and rotating the average once, at the mean M-RoPE position of the
group, keeps every pooled key a proper key at one absolute (fractional) position, so relative-position attention
to memory behaves like attention to an ordinary token there. Values carry no rotation and are averaged directly.

With temporal=1 and spatial=1 nothing is pooled and the result equals `layers.apply_rotary` of the keys at their own
positions (tested). Means are accumulated in float32 and cast back to the input dtype at the very end.

`hvr_downsample` is the entry point; it dispatches to `hvr_reference` (plain jnp, used on CPU) or the fused Pallas
kernel in `jaxgrounding.kernels.hvr_pallas` (GPU/TPU), which implement the same contract. Both are differentiable
(the kernel through a custom VJP with a fused backward kernel), so the streamed SFT step can take gradients
through every impl.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxgrounding.kernels.hvr_pallas import hvr_pallas, hvr_pallas_unsupported_reason
from jaxgrounding.model import layers

IMPLS = ("auto", "reference", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class HVRConfig:
    """The config's `streaming.hvr_*` settings (their values are the defaults: configs/meco.py)."""

    temporal: int  # r: frames pooled together (frames of the token grid)
    spatial: int  # consecutive tokens pooled within a frame (1 = none); tokens_per_frame % spatial == 0
    impl: str  # "auto" (Pallas on gpu/tpu, reference on cpu), "reference", "pallas", "pallas_interpret"


def pooled_positions(positions_3bfp: jax.Array, temporal: int, spatial: int) -> jax.Array:
    """positions_3bfp: [3, B, F, P] int or float M-RoPE positions of a segment's visual tokens (F frames of P
    tokens). Returns [3, B, F // temporal, P // spatial] float32: the mean position of each pooled group (`temporal`
    consecutive frames at the same token index times `spatial` consecutive tokens within the frame)."""
    three, b, f, p = positions_3bfp.shape
    grouped = positions_3bfp.astype(jnp.float32).reshape(three, b, f // temporal, temporal, p // spatial, spatial)
    return grouped.mean(axis=(3, 5))


def hvr_reference(
    k: jax.Array, v: jax.Array, cos: jax.Array, sin: jax.Array, *, temporal: int, spatial: int
) -> tuple[jax.Array, jax.Array]:
    """k, v: [L, B, F, P, Kh, D] (keys pre-RoPE); cos, sin: [B, F // temporal, P // spatial, D], the RoPE tables at
    the pooled positions, shared by all layers and heads. Returns (pooled keys rotated, pooled values), each
    [L, B, F // temporal, P // spatial, Kh, D] in k's / v's dtype."""

    def pool(x):
        n_layers, b, f, p, kh, d = x.shape
        grouped = x.astype(jnp.float32).reshape(n_layers, b, f // temporal, temporal, p // spatial, spatial, kh, d)
        return grouped.mean(axis=(3, 5))

    k_rot = layers.apply_rotary(pool(k), cos.astype(jnp.float32), sin.astype(jnp.float32))
    return k_rot.astype(k.dtype), pool(v).astype(v.dtype)


def resolve_impl(impl: str, backend: str | None = None) -> str:
    """The implementation `impl` stands for on `backend` (default: jax.default_backend()): "auto" means the Pallas
    kernel where it compiles natively (gpu, tpu) and the jnp reference on cpu, where Pallas only interprets."""
    if impl not in IMPLS:
        raise ValueError(f"HVR impl must be one of {IMPLS}, got {impl!r}.")
    if impl != "auto":
        return impl
    return "pallas" if (backend or jax.default_backend()) in ("gpu", "tpu") else "reference"


def _validate(k, v, positions_3bfp, temporal, spatial, head_dim, mrope_section) -> None:
    if k.ndim != 6:
        raise ValueError(f"HVR keys must be [L, B, F, P, Kh, D], got shape {k.shape}.")
    if v.shape != k.shape:
        raise ValueError(f"HVR values must match the keys' shape {k.shape}, got {v.shape}.")
    _, b, f, p, _, d = k.shape
    if temporal < 1 or spatial < 1:
        raise ValueError(f"HVR temporal and spatial must be >= 1, got temporal={temporal}, spatial={spatial}.")
    if f % temporal:
        raise ValueError(f"HVR frame count F={f} is not divisible by temporal={temporal}.")
    if p % spatial:
        raise ValueError(f"HVR tokens per frame P={p} is not divisible by spatial={spatial}.")
    if d != head_dim:
        raise ValueError(f"HVR head dim of the keys ({d}) differs from head_dim={head_dim}.")
    if d % 2:
        raise ValueError(f"HVR head dim D={d} must be even for rotary embeddings.")
    if sum(mrope_section) != d // 2:
        raise ValueError(f"HVR mrope_section {tuple(mrope_section)} must sum to head_dim // 2 = {d // 2}.")
    if positions_3bfp.shape != (3, b, f, p):
        raise ValueError(f"HVR positions must be [3, B, F, P] = {(3, b, f, p)}, got {positions_3bfp.shape}.")


def hvr_downsample(
    k: jax.Array,
    v: jax.Array,
    positions_3bfp: jax.Array,
    *,
    config: HVRConfig,
    head_dim: int,
    rope_theta: float,
    mrope_section: Sequence[int],
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pools one segment's per-layer keys (pre-RoPE) and values into HVR memory.

    k, v: [L, B, F, P, Kh, D]; positions_3bfp: [3, B, F, P] M-RoPE positions of the visual tokens.
    Returns (pooled keys rotated at the pooled positions, pooled values) [L, B, F', P', Kh, D] and the pooled
    positions [3, B, F', P'] float32, where F' = F // temporal and P' = P // spatial.
    """
    temporal, spatial = config.temporal, config.spatial
    _validate(k, v, positions_3bfp, temporal, spatial, head_dim, mrope_section)
    impl = resolve_impl(config.impl)
    if config.impl == "auto" and hvr_pallas_unsupported_reason(k.shape, temporal, spatial, jax.default_backend()):
        impl = "reference"  # "auto" never fails on a shape the kernel cannot tile; "pallas" raises instead.
    positions = pooled_positions(positions_3bfp, temporal, spatial)
    _, b, f_pooled, p_pooled = positions.shape
    cos, sin = layers.mrope_cos_sin(
        positions.reshape(3, b, f_pooled * p_pooled), head_dim, rope_theta, mrope_section, jnp.float32
    )
    cos = cos.reshape(b, f_pooled, p_pooled, head_dim)
    sin = sin.reshape(b, f_pooled, p_pooled, head_dim)
    if impl == "reference":
        k_out, v_out = hvr_reference(k, v, cos, sin, temporal=temporal, spatial=spatial)
    else:
        k_out, v_out = hvr_pallas(k, v, cos, sin, temporal=temporal, spatial=spatial, interpret=impl != "pallas")
    return k_out, v_out, positions
