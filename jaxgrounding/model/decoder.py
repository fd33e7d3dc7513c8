"""The Qwen2 text decoder: embeddings, stacked pre-norm layers run with `lax.scan`, final norm, LM head.

Layers are created once with `nnx.vmap` (every parameter gets a leading "layers" axis) and run
with `jax.lax.scan` under `jax.checkpoint`, so compile time does not grow with depth and the
remat policy is one setting. Hidden states of chosen layers are captured by splitting the scan
at those layers rather than stacking every layer's output.

KV cache layout: keys and values [layers, batch, time, kv_heads, head_dim]; keys are stored
after RoPE (decoding only appends).

`Decoder.attend` runs tokens against an external `Memory` (keys already rotated, any order: the
rotation carries each key's absolute position, so attention does not care where a key sits in
the buffer) and returns the new tokens' keys both rotated and before RoPE; the streaming prefill of long videos
(`jaxgrounding.memory.streaming`) is built on it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.model import attention, layers
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Memory:
    """Keys and values the new tokens attend to besides themselves.

    keys (rotated at their own positions), values: [L, B, M, Kh, D]; valid: [B, M] bool.
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array

    @property
    def size(self) -> int:
        return self.valid.shape[1]

    @classmethod
    def empty(cls, config: ModelConfig, batch: int) -> Memory:
        """No memory at all: `Decoder.attend` over it is a plain causal pass."""
        t = config.text
        shape = (t.num_layers, batch, 0, t.num_kv_heads, t.head_dim)
        dtype = config.compute_dtype
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, 0), bool))


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        t = config.text
        self.impl = config.attention  # which implementation runs the masks (model.attention)
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

    def __call__(
        self, x, cos, sin, key_valid, causal_offset, cache_kv=None, memory_kv=None, dropout_key=None, decode=False
    ):
        """x: [B, T, E]; key_valid: [B, S] bool; query t sits at key slot causal_offset + t (a Python int, or with
        `decode` the traced cache position of a decode step). With a cache ([B, S, Kh, D] each), the new keys and
        values are written at `causal_offset` and attention runs over the cache. With a memory ([B, M, Kh, D]
        each, keys rotated; key_valid then covers memory + new tokens and causal_offset is M), attention runs
        over memory + new tokens and the new keys are returned rotated and before RoPE."""
        impl = self.impl
        drop = (None,) * 4 if dropout_key is None else tuple(jax.random.split(dropout_key, 4))
        q = layers.apply_rotary(self.q_proj(x, drop[0]), cos, sin)
        k_raw = self.k_proj(x, drop[1])
        k = layers.apply_rotary(k_raw, cos, sin)
        v = self.v_proj(x, drop[2])
        q = parallel.constrain(q, ("batch", None, "heads", None))
        if memory_kv is not None:
            memory_k, memory_v = memory_kv
            keys = jnp.concatenate([memory_k.astype(q.dtype), k], axis=1)
            values = jnp.concatenate([memory_v.astype(q.dtype), v], axis=1)
            out = attention.causal_attention(q, keys, values, key_valid, offset=causal_offset, impl=impl)
            return self.o_proj(out, drop[3]), (k, v, k_raw)
        if cache_kv is not None:
            cache_k, cache_v = cache_kv
            k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, causal_offset, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, causal_offset, 0, 0))
            k = parallel.constrain(k, CACHE_AXES[1:])
            v = parallel.constrain(v, CACHE_AXES[1:])
        k, v = k.astype(q.dtype), v.astype(q.dtype)
        if decode:
            out = attention.decode_attention(q, k, v, key_valid, causal_offset)
        else:
            out = attention.causal_attention(q, k, v, key_valid, offset=causal_offset, impl=impl)
        return self.o_proj(out, drop[3]), (k, v)


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

    def __call__(
        self, x, cos, sin, key_valid, causal_offset, cache_kv=None, memory_kv=None, dropout_key=None, decode=False
    ):
        attn_key = mlp_key = None
        if dropout_key is not None:
            attn_key, mlp_key = jax.random.split(dropout_key)
        normed = self.input_layernorm(x)
        attn_out, kv = self.self_attn(
            normed, cos, sin, key_valid, causal_offset, cache_kv, memory_kv, attn_key, decode=decode
        )
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x), mlp_key)
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
        """hidden (after the final norm): [..., E] -> [..., V] float32, the matmul accumulated in float32
        (bf16 logits of a 152k vocabulary would round the log-softmax by ~0.1 nats)."""
        if self.lm_head is not None:
            return self.lm_head(hidden, accumulate_dtype=jnp.float32)
        table = self.embed_tokens[...].astype(self.config.compute_dtype)
        return jnp.einsum("...e,ve->...v", hidden.astype(table.dtype), table, preferred_element_type=jnp.float32)

    def __call__(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        key_valid: jax.Array,
        cache: KVCache | None = None,
        hidden_layers: Sequence[int] = (),
        causal_offset: int | jax.Array = 0,
        dropout_key: jax.Array | None = None,
        decode: bool = False,
    ):
        """Runs the layers, causally. `dropout_key` (training only) turns on LoRA input dropout.

        embeds: [B, T, E]; positions: [3, B, T]; key_valid: [B, S] bool (S = T without a cache,
        the cache length with one); query t sits at key slot causal_offset + t: a Python int for a full
        pass and a prefill (0, or the memory size a prefill continues), with `decode` the traced
        `cache.length` of a decode step. `hidden_layers`: indices into the residual stream, 0 being
        the embeddings and i the output of layer i (before the final norm); negative indices
        count from num_layers + 1, so -1 is the last layer's output and -2 the one before.

        Returns (final normed hidden [B, T, E], {index: hidden}, updated cache or None).
        """
        cfg = self.config
        cos, sin = layers.mrope_cos_sin(
            positions, cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section, jnp.float32
        )

        def layer_fn(layer, h, kv, key):
            return layer(h, cos, sin, key_valid, causal_offset, kv, dropout_key=key, decode=decode)

        kv = None if cache is None else (cache.keys, cache.values)
        h, hidden, new_kv = self._scan(embeds, layer_fn, kv, hidden_layers, dropout_key)
        new_cache = None
        if cache is not None:
            new_cache = dataclasses.replace(cache, keys=new_kv[0], values=new_kv[1])
        return h, hidden, new_cache

    def attend(
        self,
        embeds: jax.Array,
        positions: jax.Array,
        valid: jax.Array,
        memory: Memory,
        hidden_layers: Sequence[int] = (),
        dropout_key: jax.Array | None = None,
    ):
        """Runs new tokens against `memory` (all of it visible where valid) and causally among
        themselves.

        embeds: [B, T, E]; positions: [3, B, T]; valid: [B, T] bool. Returns (final normed hidden
        [B, T, E], {index: hidden} as in `__call__`, (keys rotated, values, keys before RoPE) of the
        new tokens, [L, B, T, Kh, D] each: the rotated keys are what a memory stores, the raw ones
        what HVR pooling needs).
        """
        cfg = self.config
        cos, sin = layers.mrope_cos_sin(
            positions, cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section, jnp.float32
        )
        key_valid = jnp.concatenate([memory.valid, valid], axis=1)

        def layer_fn(layer, h, kv, key):
            return layer(h, cos, sin, key_valid, memory.size, memory_kv=kv, dropout_key=key)

        return self._scan(embeds, layer_fn, (memory.keys, memory.values), hidden_layers, dropout_key)

    def _scan(self, embeds, layer_fn, per_layer_kv, hidden_layers, dropout_key=None):
        """`lax.scan` over the stacked layers, split at the captured ones.

        layer_fn(layer, h, kv, key) -> (h, new kv); per_layer_kv: None or a pair of [L, ...] arrays
        fed to layer l as its kv; dropout_key: None or split into one key per layer. Returns
        (normed h, {index: hidden}, stacked new kv or None)."""
        cfg = self.config
        n = cfg.text.num_layers
        wanted = sorted({i % (n + 1) for i in hidden_layers})
        captured = {}
        graphdef, stacked = nnx.split(self.layers)
        returns_kv = per_layer_kv is not None

        layer_keys = None if dropout_key is None else jax.random.split(dropout_key, n)

        def body(h, xs):
            layer_state, kv, key = xs
            h, new_kv = layer_fn(nnx.merge(graphdef, layer_state), h, kv, key)
            return h, (new_kv if returns_kv else None)

        body = _remat(body, cfg.remat_policy)
        h = embeds
        new_kv = []
        bounds = [0] + [i for i in wanted if 0 < i < n] + [n]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if start in wanted:
                captured[start] = h
            part = jax.tree.map(lambda a: a[start:stop], stacked)
            kv = None if not returns_kv else (per_layer_kv[0][start:stop], per_layer_kv[1][start:stop])
            keys = None if layer_keys is None else layer_keys[start:stop]
            h, part_kv = jax.lax.scan(body, h, (part, kv, keys))
            new_kv.append(part_kv)
        if n in wanted:
            captured[n] = h
        stacked_kv = None
        if returns_kv:
            stacked_kv = tuple(jnp.concatenate(parts) if len(parts) > 1 else parts[0] for parts in zip(*new_kv))
        hidden = {i: captured[i % (n + 1)] for i in hidden_layers}
        return self.norm(h), hidden, stacked_kv
