"""Building blocks shared by the vision tower and the text decoder.

Every parameter carries `logical_axes` metadata (names such as "embed", "heads", "mlp"); the one
rules table in `jaxgrounding.parallel` turns those names into mesh shardings. Numerics follow
transformers' Qwen2-VL / Qwen2.5-VL modules: norms and softmax statistics in float32, everything
else in the configured compute dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

# Added to attention logits where a key must not be seen. Finite, so that a query row with no
# visible key (a padding row) gives a uniform distribution rather than NaN.


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def _normal_init(rngs: nnx.Rngs, shape, dtype, stddev: float = 0.02):
    return stddev * jax.random.normal(rngs.params(), shape, dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias), with a kernel of shape [in_features, *out_shape].

    Keeping the output split (e.g. [embed, heads, head_dim]) lets each axis carry its own
    logical name, so attention heads shard over the tensor axis without reshapes in the model.
    """

    def __init__(
        self,
        in_features: int,
        out_shape: int | Sequence[int],
        *,
        axes: Sequence[str | None],
        use_bias: bool,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
    ):
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        if len(axes) != 1 + len(out_shape):
            raise ValueError(f"axes {axes} do not match kernel rank {1 + len(out_shape)}")
        self.compute_dtype = compute_dtype
        self.kernel = nnx.Param(_normal_init(rngs, (in_features, *out_shape), param_dtype), logical_axes=tuple(axes))
        self.bias = nnx.Param(jnp.zeros(out_shape, param_dtype), logical_axes=tuple(axes[1:])) if use_bias else None
        # Low-rank adapter (jaxgrounding.model.lora): a [in, r], b [r, *out]; None until attached.
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 1.0
        self.lora_dropout = 0.0
        # False runs the base weights only (`lora.adapters_disabled`: GRPO's reference policy).
        self.lora_enabled = True

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None, accumulate_dtype=None) -> jax.Array:
        """`dropout_key` (training): with an adapter whose `lora_dropout` > 0, the adapter sees
        its input through dropout; otherwise the adapter is folded into the kernel. `accumulate_dtype`:
        the matmul's accumulation and output dtype (float32 for the LM head's logits; default the
        compute dtype)."""
        kernel = self.kernel[...].astype(self.compute_dtype)
        # A 2D [tokens, in] x [in, out] dot: XLA:CPU picks far better layouts for it than for a
        # batched one (MLP forward + backward 1.5x faster at [2, 1024, 512] x [512, 1536]).
        flat = x.reshape(-1, x.shape[-1]).astype(self.compute_dtype)
        dropped = _adapter_input(self, flat, dropout_key)
        if _adapter_active(self):
            a, b = self.lora_a[...].astype(self.compute_dtype), self.lora_b[...].astype(self.compute_dtype)
            if dropped is None:
                kernel = kernel + self.lora_scale * jnp.einsum("ir,r...->i...", a, b)
        y = jnp.dot(flat, kernel.reshape(kernel.shape[0], -1), preferred_element_type=accumulate_dtype)
        if dropped is not None:
            y = y + self.lora_scale * jnp.dot(
                jnp.dot(dropped, a), b.reshape(b.shape[0], -1), preferred_element_type=accumulate_dtype
            )
        y = y.reshape(*x.shape[:-1], *kernel.shape[1:])
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def _adapter_active(module) -> bool:
    """An adapter is attached and not switched off (`lora.adapters_disabled`)."""
    return module.lora_a is not None and module.lora_enabled


def _adapter_input(module, flat: jax.Array, dropout_key: jax.Array | None) -> jax.Array | None:
    """The adapter's input under dropout ([tokens, in]), or None when the adapter is folded into
    the kernel instead (no adapter, no dropout, or no key: evaluation)."""
    rate = module.lora_dropout
    if not _adapter_active(module) or rate <= 0 or dropout_key is None:
        return None
    keep = jax.random.bernoulli(dropout_key, 1.0 - rate, flat.shape)
    return jnp.where(keep, flat / (1.0 - rate), 0).astype(flat.dtype)


class OutLinear(nnx.Module):
    """y = x @ kernel over several trailing input axes (e.g. [heads, head_dim] -> embed)."""

    def __init__(
        self,
        in_shape: Sequence[int],
        out_features: int,
        *,
        axes,
        use_bias: bool,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
    ):
        self.in_shape = tuple(in_shape)
        self.compute_dtype = compute_dtype
        self.kernel = nnx.Param(
            _normal_init(rngs, (*self.in_shape, out_features), param_dtype), logical_axes=tuple(axes)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[-1],)) if use_bias else None
        # Low-rank adapter: a [*in, r], b [r, out]; None until attached.
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 1.0
        self.lora_dropout = 0.0
        # False runs the base weights only (`lora.adapters_disabled`: GRPO's reference policy).
        self.lora_enabled = True

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """As `Linear.__call__`."""
        n_in = len(self.in_shape)
        kernel = self.kernel[...].astype(self.compute_dtype)
        flat = x.reshape(-1, math.prod(self.in_shape)).astype(self.compute_dtype)
        dropped = _adapter_input(self, flat, dropout_key)
        if _adapter_active(self):
            a, b = self.lora_a[...].astype(self.compute_dtype), self.lora_b[...].astype(self.compute_dtype)
            if dropped is None:
                kernel = kernel + self.lora_scale * jnp.einsum("...r,ro->...o", a, b)
        y = jnp.dot(flat, kernel.reshape(-1, kernel.shape[-1]))
        if dropped is not None:
            y = y + self.lora_scale * jnp.dot(jnp.dot(dropped, a.reshape(-1, a.shape[-1])), b)
        y = y.reshape(*x.shape[:-n_in], kernel.shape[-1])
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        return y


class RMSNorm(nnx.Module):
    """weight * x / rms(x), statistics in float32, cast back before the weight (as transformers does)."""

    def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with bias (Qwen2-VL's vision tower), statistics in float32."""

    def __init__(self, dim: int, *, eps: float, axis_name: str, param_dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=(axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)): the text decoder's MLP and Qwen2.5-VL's vision MLP."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        act: str,
        use_bias: bool,
        axes: tuple[str, str],
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
    ):
        embed, mlp = axes
        kw = dict(use_bias=use_bias, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.act = activation(act)
        self.gate_proj = Linear(dim, hidden, axes=(embed, mlp), **kw)
        self.up_proj = Linear(dim, hidden, axes=(embed, mlp), **kw)
        self.down_proj = Linear(hidden, dim, axes=(mlp, embed), **kw)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        keys = (None,) * 3 if dropout_key is None else tuple(jax.random.split(dropout_key, 3))
        return self.down_proj(self.act(self.gate_proj(x, keys[0])) * self.up_proj(x, keys[1]), keys[2])


class PlainMLP(nnx.Module):
    """fc2(act(fc1(x))): Qwen2-VL's vision MLP."""

    def __init__(
        self, dim: int, hidden: int, *, act: str, axes: tuple[str, str], param_dtype, compute_dtype, rngs: nnx.Rngs
    ):
        embed, mlp = axes
        kw = dict(use_bias=True, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.act = activation(act)
        self.fc1 = Linear(dim, hidden, axes=(embed, mlp), **kw)
        self.fc2 = Linear(hidden, dim, axes=(mlp, embed), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings
# ----------------------------------------------------------------------------------------------


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [..., T, heads, D]; cos, sin: [..., T, D] (broadcast over heads). The rotation runs in float32
    (a bf16 angle loses positions beyond a few hundred) and returns x's dtype."""
    cos = cos[..., None, :].astype(jnp.float32)
    sin = sin[..., None, :].astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def inverse_frequencies(dim: int, theta: float) -> jax.Array:
    """theta^(-2i/dim) for i < dim/2, in float32 like transformers."""
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def mrope_cos_sin(
    positions_3bt: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int], dtype
) -> tuple[jax.Array, jax.Array]:
    """Multimodal RoPE (Qwen2-VL sec. 2.1): frequency band i of the head takes its angle from the
    temporal, height or width position stream according to `mrope_section`.

    positions_3bt: [3, B, T] integer positions. Returns cos, sin: [B, T, head_dim].
    """
    inv_freq = inverse_frequencies(head_dim, theta)  # [D/2]
    stream_of_band = jnp.asarray(
        sum(([i % 3] * n for i, n in enumerate(mrope_section)), []), dtype=jnp.int32
    )  # [D/2]: which of t/h/w drives each frequency band
    freqs = positions_3bt.astype(jnp.float32)[..., None] * inv_freq  # [3, B, T, D/2]
    picked = jnp.take_along_axis(freqs, stream_of_band[None, None, None, :], axis=0)[0]
    # transformers selects per band with `freq.split(section)[i][i % 3]`, equal to this gather.
    angles = jnp.concatenate([picked, picked], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def vision_cos_sin(positions_n2: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """2D rotary of the vision tower: half the bands follow the patch row, half the column.

    positions_n2: [N, 2] (row, col). Returns cos, sin: [N, head_dim] in float32.
    """
    inv_freq = inverse_frequencies(head_dim // 2, theta)  # [D/4]
    freqs = positions_n2.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, D/4]
    angles = freqs.reshape(freqs.shape[0], -1)  # [N, D/2]: rows then columns
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
