"""The Qwen2 text decoder: embeddings, stacked pre-norm layers run with `lax.scan`, final norm, LM head.

Layers are created once with `nnx.vmap` (every parameter gets a leading "layers" axis) and run
with `jax.lax.scan` under `jax.checkpoint`, so compile time does not grow with depth and the
remat policy is one setting. Hidden states of chosen layers are captured by splitting the scan
at those layers rather than stacking every layer's output.

KV cache layout: keys and values [layers, batch, time, kv_heads, head_dim]; keys are stored
after RoPE (decoding only appends).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.model import layers
from jaxgrounding.model.config import ModelConfig
from jaxgrounding.model.vision import mark_stacked


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Preallocated decoding cache.

    keys, values: [L, B, S, Kh, D]; key_valid: [B, S] bool (false for padding and unwritten
    slots); length: [] int32 slots written so far (shared by the batch: prompts are left-padded);
    next_position: [B] int32 M-RoPE position of the next token.
    """

    keys: jax.Array
    values: jax.Array
    key_valid: jax.Array
    length: jax.Array
    next_position: jax.Array

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, max_length: int, dtype=None) -> KVCache:
        t = config.text
        dtype = dtype or config.compute_dtype
        shape = (t.num_layers, batch, max_length, t.num_kv_heads, t.head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            key_valid=jnp.zeros((batch, max_length), bool),
            length=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )


CACHE_AXES = ("layers", "batch", "cache_time", "kv_heads", None)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        t = config.text
        kw = dict(param_dtype=config.param_dtype, compute_dtype=config.compute_dtype, rngs=rngs)
        self.q_proj = layers.Linear(
            t.hidden_size, (t.num_heads, t.head_dim), axes=("embed", "heads", None), use_bias=True, **kw
        )
        self.k_proj = layers.Linear(
            t.hidden_size, (t.num_kv_heads, t.head_dim), axes=("embed", "kv_heads", None), use_bias=True, **kw
        )
        self.v_proj = layers.Linear(
            t.hidden_size, (t.num_kv_heads, t.head_dim), axes=("embed", "kv_heads", None), use_bias=True, **kw
        )
        self.o_proj = layers.OutLinear(
            (t.num_heads, t.head_dim), t.hidden_size, axes=("heads", None, "embed"), use_bias=False, **kw
        )

    def __call__(self, x, cos, sin, key_valid, causal_offset, cache_kv=None):
        """x: [B, T, E]; key_valid: [B, S] bool; query t sits at key slot causal_offset + t.
        With a cache ([B, S, Kh, D] each), the new keys and values are written at
        `causal_offset` and attention runs over the cache."""
        q = layers.apply_rotary(self.q_proj(x), cos, sin)
        k = layers.apply_rotary(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        q = parallel.constrain(q, ("batch", None, "heads", None))
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, causal_offset, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, causal_offset, 0, 0))
            k = parallel.constrain(k, CACHE_AXES[1:])
            v = parallel.constrain(v, CACHE_AXES[1:])
        out = layers.attention(q, k.astype(q.dtype), v.astype(q.dtype), key_valid, causal_offset=causal_offset)
        return self.o_proj(out), (k, v)


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.input_layernorm = layers.RMSNorm(
            t.hidden_size, eps=t.rms_norm_eps, axis_name="embed", param_dtype=config.param_dtype
        )
        self.self_attn = Attention(config, rngs=rngs)
        self.post_attention_layernorm = layers.RMSNorm(
            t.hidden_size, eps=t.rms_norm_eps, axis_name="embed", param_dtype=config.param_dtype
        )
        self.mlp = layers.GatedMLP(
            t.hidden_size,
            t.intermediate_size,
            act=t.hidden_act,
            use_bias=False,
            axes=("embed", "mlp"),
            param_dtype=config.param_dtype,
            compute_dtype=config.compute_dtype,
            rngs=rngs,
        )

    def __call__(self, x, cos, sin, key_valid, causal_offset, cache_kv=None):
        attn_out, kv = self.self_attn(self.input_layernorm(x), cos, sin, key_valid, causal_offset, cache_kv)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return parallel.constrain(x, ("batch", None, "embed")), kv


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, prevent_cse=False)
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=False)


class Decoder(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.config = config
        self.embed_tokens = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (t.vocab_size, t.hidden_size), config.param_dtype),
            logical_axes=("vocab", "embed"),
        )

        @nnx.split_rngs(splits=t.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs):
            return DecoderLayer(config, rngs=rngs)

        self.layers = make_layers(rngs)
        mark_stacked(self.layers)
        self.norm = layers.RMSNorm(t.hidden_size, eps=t.rms_norm_eps, axis_name="embed", param_dtype=config.param_dtype)
        self.lm_head = nnx.data(
            None
            if config.tie_word_embeddings
            else layers.Linear(
                t.hidden_size,
                t.vocab_size,
                axes=("embed", "vocab"),
                use_bias=False,
                param_dtype=config.param_dtype,
                compute_dtype=config.compute_dtype,
                rngs=rngs,
            )
        )

    def embed(self, input_ids: jax.Array) -> jax.Array:
        table = self.embed_tokens[...].astype(self.config.compute_dtype)
        return parallel.constrain(table[input_ids], ("batch", None, "embed"))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (after the final norm): [..., E] -> [..., V] float32."""
        if self.lm_head is not None:
            out = self.lm_head(hidden)
        else:
            table = self.embed_tokens[...].astype(self.config.compute_dtype)
            out = jnp.einsum("...e,ve->...v", hidden, table)
        return out.astype(jnp.float32)

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        key_valid: jax.Array,
        cache: KVCache | None = None,
        hidden_layers: Sequence[int] = (),
        causal_offset: int | jax.Array = 0,
    ):
        """Runs the layers, causally.

        embeds: [B, T, E]; positions: [3, B, T]; key_valid: [B, S] bool (S = T without a cache,
        the cache length with one); query t sits at key slot causal_offset + t (0 for a full
        pass and a prefill, `cache.length` for a decode step). `hidden_layers`: indices into the residual stream, 0 being
        the embeddings and i the output of layer i (before the final norm); negative indices
        count from num_layers + 1, so -1 is the last layer's output and -2 the one before.

        Returns (final normed hidden [B, T, E], {index: hidden}, updated cache or None).
        """
        cfg = self.config
        n = cfg.text.num_layers
        cos, sin = layers.mrope_cos_sin(
            positions, cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section, cfg.compute_dtype
        )
        wanted = sorted({i % (n + 1) for i in hidden_layers})
        captured = {}
        graphdef, stacked = nnx.split(self.layers)

        def run(h, layer_state, kv):
            layer = nnx.merge(graphdef, layer_state)
            return layer(h, cos, sin, key_valid, causal_offset, kv)

        def body(h, xs):
            layer_state, kv = xs
            h, new_kv = run(h, layer_state, kv)
            return h, (new_kv if cache is not None else None)

        body = _remat(body, cfg.remat_policy)
        h = embeds
        new_keys, new_values = [], []
        bounds = [0] + [i for i in wanted if 0 < i < n] + [n]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if start in wanted:
                captured[start] = h
            part = jax.tree.map(lambda a: a[start:stop], stacked)
            kv = None if cache is None else (cache.keys[start:stop], cache.values[start:stop])
            h, new_kv = jax.lax.scan(body, h, (part, kv))
            if cache is not None:
                new_keys.append(new_kv[0])
                new_values.append(new_kv[1])
        if n in wanted:
            captured[n] = h
        new_cache = None
        if cache is not None:
            new_cache = dataclasses.replace(
                cache,
                keys=jnp.concatenate(new_keys) if len(new_keys) > 1 else new_keys[0],
                values=jnp.concatenate(new_values) if len(new_values) > 1 else new_values[0],
            )
        hidden = {i: captured[i % (n + 1)] for i in hidden_layers}
        return self.norm(h), hidden, new_cache
