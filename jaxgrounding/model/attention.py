"""Grouped-query attention: one function per mask the model needs, run by the implementation the model names.

The masks (q: [B, T, H, D]; k, v: [B, S, Kh, D], H a multiple of Kh; key_valid: [B, S] bool):

- `causal_attention(..., offset)`: query t sits at key slot `offset + t` and sees the valid slots up to it. With
  offset 0 and S = T it is the decoder's pass over a (left- or right-padded) prompt; with S > T a prefill into a
  cache, or the streamed segment over its memory buffer (`offset` = memory size: every valid memory slot, then
  the segment causally). `offset` is a Python int: the mask is static, so kernels can skip whole blocks.
- `full_attention(...)`: every valid key (the vision tower's windows and frames).
- `decode_attention(..., offset)`: a few new tokens at a traced cache position (a decode step at `cache.length`).
  One dense implementation on every backend: decoding reads the cache once and is bound by memory bandwidth,
  not by the T x S logits a fused kernel avoids.

Implementations (`ModelConfig.attention`; "auto" picks by backend when the function is traced):

- "blocked" (auto on CPU): query blocks that skip the keys after the block, about half the work of a dense
  causal pass (2.6x faster forward + backward at T = 1024 on CPU); the memory pass runs its blocks one after
  another (`lax.map`), so only one block's float32 logits are alive.
- "xla": `jax.nn.dot_product_attention` with XLA's implementation and an explicit mask; runs everywhere.
- "cudnn" (auto on GPU for bf16 / fp16 inputs; float32 runs "xla"): the same call with cuDNN's fused flash
  attention, on sequences padded to even lengths (its backward needs them).
- "splash" (auto on TPU): the Pallas splash-attention kernel, with the static mask (causal with its offset, or
  full) and padding as segment ids; "splash_interpret" runs the same kernel in the Pallas interpreter (tests).

Every implementation computes the logits and the softmax in float32 and returns q's dtype. Rows of queries that
see no valid key (padding queries) are unspecified: callers never read them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrounding.model.config import ATTENTION_SETTINGS as SETTINGS

_AUTO = {"cpu": "blocked", "gpu": "cudnn", "tpu": "splash"}
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Query / key tile of the blocked path and of the splash kernel (a multiple of TPU's 128 lanes).
BLOCK = 128


def resolve(impl: str, backend: str | None = None, dtype=jnp.bfloat16) -> str:
    """The implementation `impl` stands for on `backend` (default: `jax.default_backend()`) for inputs of
    `dtype`. cuDNN's fused attention takes 16-bit inputs only: "auto" runs "xla" for a float32 model on GPU, and
    a float32 model that names "cudnn" is refused here rather than by the GPU at its first step."""
    if impl not in SETTINGS:
        raise ValueError(f"attention must be one of {SETTINGS}, got {impl!r}")
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if impl == "cudnn" and not sixteen_bit:
        raise ValueError(f"attention 'cudnn' takes bfloat16 or float16 inputs, got {jnp.dtype(dtype)} "
                         "(set model.compute_dtype = 'bfloat16', or attention 'xla' / 'auto')")
    if impl != "auto":
        return impl
    choice = _AUTO.get(backend or jax.default_backend(), "xla")
    return "xla" if choice == "cudnn" and not sixteen_bit else choice


def causal_attention(q, k, v, key_valid, *, offset: int, impl: str, block_size: int = BLOCK) -> jax.Array:
    """Query t sees the valid key slots <= offset + t (module docstring). Returns [B, T, H, D] in q's dtype."""
    if not isinstance(offset, (int, np.integer)):
        raise TypeError(f"causal_attention takes a static offset (a Python int); got {type(offset).__name__}: "
                        "a decode step at a traced position is decode_attention")
    impl = resolve(impl, dtype=q.dtype)
    if impl == "blocked":
        if offset and q.shape[1] > block_size:
            return _blocked_memory(q, k, v, key_valid, int(offset), block_size)
        return _blocked_causal(q, k, v, key_valid, int(offset), block_size)
    return _fused(q, k, v, key_valid, int(offset), impl)


def full_attention(q, k, v, key_valid, *, impl: str) -> jax.Array:
    """Every query sees every valid key. Returns [B, T, H, D] in q's dtype."""
    impl = resolve(impl, dtype=q.dtype)
    if impl == "blocked":
        return _heads_last(_dense(_heads_first(q, k.shape[2]), *_kv_heads_first(k, v), key_valid, None))
    return _fused(q, k, v, key_valid, None, impl)


def decode_attention(q, k, v, key_valid, offset: jax.Array) -> jax.Array:
    """Queries at the traced key slots offset + t (a decode step over the cache). Dense on every backend."""
    return _heads_last(_dense(_heads_first(q, k.shape[2]), *_kv_heads_first(k, v), key_valid, offset))


# ------------------------------------------------------------------------------------------------
# "blocked": head-major einsums, query blocks
# ------------------------------------------------------------------------------------------------


def _heads_first(q, kv_heads):
    """[B, T, H, D] -> [B, Kh, G, T, D]: every kv head's query group is one plain batched matmul."""
    b, t, h, d = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)


def _kv_heads_first(k, v):
    return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _heads_last(out):
    """[B, Kh, G, T, D] -> [B, T, H, D]."""
    b, kv_heads, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * g, d)


def _dense(q, k, v, key_valid, offset):
    """q: [B, Kh, G, T, D]; k, v: [B, Kh, S, D] -> [B, Kh, G, T, D]. `offset` None: no causal mask."""
    b, kv_heads, g, t, d = q.shape
    s = k.shape[2]
    visible = key_valid[:, None, :]  # [B, 1, S]
    if offset is not None:
        visible = visible & (jnp.arange(s)[None, :] <= offset + jnp.arange(t)[:, None])[None]
    logits = jnp.einsum(
        "bkqd,bksd->bkqs", q.reshape(b, kv_heads, g * t, d), k, preferred_element_type=jnp.float32
    ).reshape(b, kv_heads, g, t, s)
    logits = logits * (1.0 / math.sqrt(d))
    logits = jnp.where(visible[:, None, None], logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.reshape(b, kv_heads, g * t, s), v)
    return out.reshape(b, kv_heads, g, t, d)


def _blocked_causal(q, k, v, key_valid, offset: int, block_size: int):
    """Query blocks, each over the keys up to its last query only (unrolled: every block is live)."""
    t = q.shape[1]
    qh, (kh, vh) = _heads_first(q, k.shape[2]), _kv_heads_first(k, v)
    if t <= block_size:
        return _heads_last(_dense(qh, kh, vh, key_valid, offset))
    outs = []
    for start in range(0, t, block_size):
        stop = min(start + block_size, t)
        keys = min(offset + stop, k.shape[1])
        outs.append(
            _dense(qh[:, :, :, start:stop], kh[:, :, :keys], vh[:, :, :keys], key_valid[:, :keys], offset + start)
        )
    return _heads_last(jnp.concatenate(outs, axis=3))


def _blocked_memory(q, k, v, key_valid, memory_size: int, block_size: int):
    """New tokens over [memory | themselves], query blocks one after another (`lax.map`): only one block's
    float32 logits [B, H, block, M + T] are alive. Over a long video's memory those logits, not the keys, fill
    the device: with every block live, about 14 of the 16 GB of temporaries of a 7B segment step at 256
    segments were logits (bench/streaming.py)."""
    b, t, h, d = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    n = -(-t // block_size)
    qh = jnp.pad(_heads_first(q, kv_heads), [(0, 0), (0, 0), (0, 0), (0, n * block_size - t), (0, 0)])
    blocks = jnp.moveaxis(qh.reshape(b, kv_heads, g, n, block_size, d), 3, 0)  # [n, B, Kh, G, block, D]
    kh, vh = _kv_heads_first(k, v)

    def one_block(xs):
        i, q_block = xs
        return _dense(q_block, kh, vh, key_valid, memory_size + i * block_size)

    out = jax.lax.map(one_block, (jnp.arange(n), blocks))  # [n, B, Kh, G, block, D]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kv_heads, g, n * block_size, d)[:, :, :, :t]
    return _heads_last(out)


# ------------------------------------------------------------------------------------------------
# Fused kernels: "xla" / "cudnn" (jax.nn.dot_product_attention) and "splash" (Pallas, TPU)
# ------------------------------------------------------------------------------------------------


def _fused(q, k, v, key_valid, offset: int | None, impl: str):
    if impl == "xla":
        return _dot_product(q, k, v, key_valid, offset, impl)
    if impl == "cudnn":
        return _cudnn(q, k, v, key_valid, offset)
    if impl in ("splash", "splash_interpret"):
        return _splash(q, k, v, key_valid, offset, interpret=impl == "splash_interpret")
    raise ValueError(f"unknown attention implementation {impl!r}")


def _dot_product(q, k, v, key_valid, offset: int | None, impl: str):
    """`jax.nn.dot_product_attention` with the mask spelled out, [B, 1, T, S] (float32 logits and softmax inside).
    The mask is broadcast over the queries even without a causal part: cuDNN takes it as a bias of exactly the
    logits' length on both axes."""
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    mask = jnp.broadcast_to(key_valid[:, None, None, :], (b, 1, t, s))
    if offset is not None:
        mask = mask & (np.arange(s)[None, :] <= offset + np.arange(t)[:, None])[None, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def _cudnn(q, k, v, key_valid, offset: int | None):
    """cuDNN's fused attention on sequences padded to even lengths. The mask reaches cuDNN as a bias, and its
    backward with a bias takes only even query and key lengths (jax raises "Unsupported sequence length" when the
    gradient is traced: an odd prompt would stop a GPU run at its first step). Padded keys are invalid; padded
    queries are dropped."""
    t, s = q.shape[1], k.shape[1]
    pad_t, pad_s = t % 2, s % 2
    if pad_t or pad_s:
        q = jnp.pad(q, ((0, 0), (0, pad_t), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, pad_s), (0, 0), (0, 0))) for x in (k, v))
        key_valid = jnp.pad(key_valid, ((0, 0), (0, pad_s)))
    return _dot_product(q, k, v, key_valid, offset, "cudnn")[:, :t]


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, s: int, group: int, offset: int | None, interpret: bool):
    """A splash-attention kernel for one example and one kv head's group of `group` query heads (MQA form)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    one = mask_lib.FullMask((t, s)) if offset is None else mask_lib.CausalMask((t, s), offset=offset)
    blocks = kernel_lib.BlockSizes(
        block_q=BLOCK,
        block_kv=BLOCK,
        block_kv_compute=BLOCK,
        block_q_dkv=BLOCK,
        block_kv_dkv=BLOCK,
        block_kv_dkv_compute=BLOCK,
        block_q_dq=BLOCK,
        block_kv_dq=BLOCK,
    )
    return kernel_lib.make_splash_mqa_single_device(
        mask_lib.MultiHeadMask([one] * group), block_sizes=blocks, interpret=interpret
    )


def _splash(q, k, v, key_valid, offset: int | None, interpret: bool):
    """Sequences padded to whole tiles; padding and invalid keys become segment ids (a query sees a key only when
    both carry the same id), which the kernel ANDs with the static mask. A query's id is that of its own key slot
    (causal) or 1 in a row with any valid key (full), so no row is empty: the kernel requires it."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib

    b, t, h, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    tp, sp = -(-t // BLOCK) * BLOCK, -(-s // BLOCK) * BLOCK
    kv_ids = jnp.pad(key_valid, ((0, 0), (0, sp - s))).astype(jnp.int32)
    if offset is None:
        q_ids = jnp.broadcast_to(jnp.any(key_valid, axis=1, keepdims=True), (b, tp)).astype(jnp.int32)
    else:
        slot = np.minimum(offset + np.arange(tp), sp - 1)
        q_ids = kv_ids[:, slot]
    kernel = _splash_kernel(tp, sp, h // kv_heads, offset, interpret)
    scale = 1.0 / math.sqrt(d)  # the kernel does not scale the logits
    qh = _heads_first(jnp.pad(q * jnp.asarray(scale, q.dtype), ((0, 0), (0, tp - t), (0, 0), (0, 0))), kv_heads)
    kh, vh = _kv_heads_first(*(jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for x in (k, v)))

    def one(q_group, k_head, v_head, q_row, kv_row):  # [G, Tp, D], [Sp, D], [Sp, D], [Tp], [Sp]
        return kernel(q_group, k_head, v_head, segment_ids=kernel_lib.SegmentIds(q=q_row, kv=kv_row))

    per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
    out = jax.vmap(per_head)(qh, kh, vh, q_ids, kv_ids)  # [B, Kh, G, Tp, D]
    return _heads_last(out)[:, :t].astype(q.dtype)
