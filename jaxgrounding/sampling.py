"""Token generation for evaluation and RL rollouts: prefill each prompt once, fan out samples.

`generate` prefills every prompt once (video, or a streamed video's `Memory`, included), then
draws `num_samples` (G) completions per prompt in one jitted `lax.while_loop` of one-token decode
steps, which stops when every row has produced an end token (or after `max_new_tokens`). Rows are
prompt-major: row p * G + g is sample g of prompt p.

Shared prompt KV. The prompt's keys and values, after the memory's when there is one, form one
read-only *context* per prompt, head-major ([L, B, Kh, D, C] keys, [L, B, Kh, C, D] values), which
the G samples of the prompt attend to together: their queries are stacked into the rows of one
batched matmul per prompt and KV head. Neither the prompt nor the memory is run, copied or stored
G times: the memory is copied once per prompt, into the prefill cache and on into the context, and
is never re-streamed. Each row owns only a small decode cache of its own tokens, [R, Kh, N, D] per
layer, written in place at one slot per step; attention joins the two under one softmax. The
context is a loop invariant, so the loop carries and updates only the decode caches (the earlier
decode step copied the whole preallocated cache every step), which also makes G = 1 (evaluation)
faster.

The prefill is `VideoLLM.prefill` (so prompts may be left- or right-padded); decoding runs the
model's own modules (norms, output projection, MLP) and weights layer by layer, unrolled, with
everything that does not change between steps prepared once per call: LoRA adapters folded into
their kernels (or dropped, under `lora.adapters_disabled`), each layer's weights sliced from the
stacked layers, its query / key / value kernels concatenated into one matmul, and the LM head laid
out vocabulary-major (`_vocab_major_head`). Unrolling costs compile time with depth (28 layers:
9 s against 2.5 s for the earlier scanned decode step on 2 CPU cores), and buys per-layer caches
updated in place and no per-step weight slicing.

Sampling: greedy (temperature 0), or temperature with top-k and top-p (nucleus) filtering; logits
are float32. Sampling settings are always explicit arguments: nothing is read from a checkpoint's
generation_config. Keys: `rng` is split into G sample keys (or is G keys already); sample g of
prompt p draws step i with `fold_in(fold_in(sample_key[g], p), i)`, so a row's draws do not depend
on the other rows, and row p * G + g equals row p of a `num_samples=1` call given
`rng=sample_keys[g:g + 1]` (`sample_keys(rng, G)` returns them).

Log-probabilities (`return_logprobs`): of each generated token under softmax(logits / temperature),
before top-k / top-p truncation (TRL's and Tunix's convention; raw logits at temperature 0), by
`logprobs_from_logits`, the rule the teacher-forced `objectives.lm.token_logprobs` also applies.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.model import layers
from jaxgrounding.model.decoder import KVCache, Memory
from jaxgrounding.model.video_llm import ModelInputs

# Added to attention logits where a key must not be seen (as `model.attention` does).
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Built from the config's `sampling` section (its values are the defaults: configs/meco.py); top_k is
    in no config (no recipe filters by rank)."""

    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_p: float
    top_k: int = 0  # 0 = no top-k filter

    @classmethod
    def from_config(cls, config) -> SamplingConfig:
        s = config.sampling
        return cls(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p)


def logprobs_from_logits(
    logits: jax.Array, targets: jax.Array, temperature: float = 1.0, *, axis: int = -1
) -> jax.Array:
    """log softmax(logits / temperature) at `targets`, float32: the log-probability of a token under
    the distribution a sampler at `temperature` draws from, before top-k / top-p truncation (TRL's
    and Tunix's convention), raw logits at temperature <= 0 (greedy). logits [..., V, ...] with the
    vocabulary on `axis`; targets int, logits' shape without that axis. The one definition: the
    decode loop applies it to its step logits, `objectives.lm.token_logprobs` to teacher-forced
    logits chunk by chunk (the LM loss and GRPO's policy and reference terms)."""
    logits = logits.astype(jnp.float32)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    target_logit = jnp.take_along_axis(logits, jnp.expand_dims(targets, axis), axis=axis).squeeze(axis)
    return target_logit - jax.nn.logsumexp(logits, axis=axis)


def _sortable(logits: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (sign bit flipped for positives, all bits for negatives)."""
    bits = jax.lax.bitcast_convert_type(logits.astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _largest_threshold(keys: jax.Array, enough) -> jax.Array:
    """Per column of keys [V, R] (uint32, `_sortable`), the largest t with enough(keys >= t) true,
    by bisection over the 32 bits (exact, no sort). `enough` must be monotone: true at the column's
    smallest key, and false, once false, for every larger t. Returns [R]."""
    lo, hi = jnp.min(keys, axis=0), jnp.max(keys, axis=0)

    def body(_, bounds):
        lo, hi = bounds
        width = hi - lo
        mid = lo + (width >> 1) + (width & 1)  # upper middle, without overflowing uint32
        ok = enough(keys >= mid) & (hi > lo)
        return jnp.where(ok, mid, lo), jnp.where(ok | (hi <= lo), hi, mid - 1)

    return jax.lax.fori_loop(0, 32, body, (lo, hi))[0]


def _filter(logits_vr: jax.Array, config: SamplingConfig) -> jax.Array:
    """Vocabulary-major float32 logits [V, R] / temperature, tokens outside top-k and top-p at -inf.

    top-k keeps the logits >= the k-th largest (ties included); top-p keeps the most probable
    tokens whose mass, before the last one kept, is under top_p (of the top-k renormalised). Both
    find their threshold by bisection over the float bits, a few dozen passes over the logits: on
    XLA:CPU `lax.top_k` and `argsort` over [32, 32000] take 0.2 to 0.3 s, the whole of a decode
    step 10 times over. At a tie on the top-p boundary every tied token is kept.
    """
    logits = logits_vr.astype(jnp.float32) / config.temperature
    if config.top_k > 0:
        keys = _sortable(logits)
        kth = _largest_threshold(keys, lambda kept: jnp.sum(kept, axis=0) >= config.top_k)
        logits = jnp.where(keys >= kth, logits, -jnp.inf)
    if config.top_p < 1.0:
        keys = _sortable(logits)
        probs = jax.nn.softmax(logits, axis=0)
        # Token j is kept iff the tokens above it hold less than top_p: the largest threshold
        # whose kept mass still reaches top_p.
        cut = _largest_threshold(keys, lambda kept: jnp.sum(jnp.where(kept, probs, 0.0), axis=0) >= config.top_p)
        logits = jnp.where(keys >= cut, logits, -jnp.inf)
    return logits


def greedy_tokens(logits: jax.Array, axis: int = -1) -> jax.Array:
    """argmax over the vocabulary `axis` (the first maximum on ties), as two plain reductions:
    XLA:CPU runs `jnp.argmax`'s (value, index) reduction unvectorised, 4 ms of a 40 ms decode step at
    [32, 32000] against 0.5 ms for max + first index. A NaN maximum gives the last token."""
    v = logits.shape[axis]
    top = jnp.max(logits, axis=axis, keepdims=True)
    index = jnp.expand_dims(jnp.arange(v, dtype=jnp.int32), tuple(range(1, logits.ndim - axis % logits.ndim)))
    first = jnp.min(jnp.where(logits == top, index, v), axis=axis)
    return jnp.minimum(first, v - 1)


@functools.partial(jax.jit, static_argnames="config")
def _sample_columns(logits_vr: jax.Array, column_keys: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token per column of vocabulary-major logits [V, R], column r drawing with its own key:
    Gumbel-max (argmax of logits + Gumbel noise, an exact draw from their softmax) with the fast
    first-maximum reduction, 3x cheaper than `jax.random.categorical` here."""
    if config.temperature <= 0:
        return greedy_tokens(logits_vr, axis=0)
    v = logits_vr.shape[0]
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (v,), jnp.float32), out_axes=1)(column_keys)
    return greedy_tokens(_filter(logits_vr, config) + noise, axis=0)


def sample_keys(rng, num_samples: int) -> jax.Array:
    """The G per-sample keys `generate` uses: `rng` split G ways, or `rng` itself when it is already
    G keys (shape [G]). Raw uint32 keys (`jax.random.PRNGKey`) are accepted."""
    rng = jax.random.key(0) if rng is None else jnp.asarray(rng)
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.wrap_key_data(rng)
    if rng.ndim == 0:
        return jax.random.split(rng, num_samples)
    if rng.shape != (num_samples,):
        raise ValueError(f"rng must be one key or num_samples={num_samples} keys, got key shape {rng.shape}")
    return rng


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Generation:
    """R = B * G rows, row p * G + g being sample g of prompt p.

    tokens: [R, N] (after a row's end: its end token repeated); lengths: [R] tokens up to and
    including the end token (N when it never came); mask: [R, N] bool, the completion mask
    (n < lengths); logprobs: [R, N] float32 log-probability of each token under the sampling
    distribution (0 after the end), or None when not asked for; predicting: {layer: [R, N, E]}
    state that predicted token n (0 after the end); prompt_hidden: {layer: [B, T, E]} prefill
    states of `prompt_layers`, per prompt."""

    tokens: jax.Array
    lengths: jax.Array
    mask: jax.Array
    logprobs: jax.Array | None
    predicting: dict
    prompt_hidden: dict


def _fold_adapters(model) -> None:
    """Folds each active LoRA adapter into its kernel (in the compute dtype, as `layers.Linear`
    does per call) and drops switched-off ones, on a model merged inside the trace: decoding then
    runs plain kernels, and the fold happens once per call instead of once per layer per step."""
    for _, module in nnx.iter_graph(model):
        if not isinstance(module, (layers.Linear, layers.OutLinear)) or module.lora_a is None:
            continue
        if module.lora_enabled:
            dtype = module.compute_dtype
            a, b = module.lora_a[...].astype(dtype), module.lora_b[...].astype(dtype)
            if isinstance(module, layers.OutLinear):
                delta = jnp.einsum("l...r,lro->l...o", a, b)
            else:
                delta = jnp.einsum("lir,lr...->li...", a, b)
            module.kernel.set_value(module.kernel[...].astype(dtype) + module.lora_scale * delta)
        module.lora_a = nnx.data(None)
        module.lora_b = nnx.data(None)


def _decode_attention(q, context, decode, step: jax.Array, num_samples: int):
    """Attention of one new token per row over [its prompt's context | its own decode cache].

    q: [R, H, D] with R = B * G (row p * G + g); context: (keys [B, Kh, D, C], values [B, Kh, C, D],
    valid [B, C]), shared by a prompt's G rows (keys stored transposed, so that both context matmuls
    read their right operand as stored: [B, Kh, C, D] keys made the score matmul 2x slower); decode:
    (keys, values [R, Kh, N, D]), slots <= step visible. One softmax over both parts, logits and
    statistics in float32 (as `model.attention`). Returns [R, H, D].
    """
    ctx_k, ctx_v, ctx_valid = context
    dec_k, dec_v = decode
    r, h, d = q.shape
    b, kv_heads, _, c = ctx_k.shape
    g, group, n = num_samples, h // kv_heads, dec_k.shape[2]
    # The context matmul takes the G samples' query heads as rows: [B, Kh, G * group, D].
    q_ctx = q.reshape(b, g, kv_heads, group, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, g * group, d)
    s_ctx = jnp.einsum("bkmd,bkdc->bkmc", q_ctx, ctx_k, preferred_element_type=jnp.float32)
    q_dec = q.reshape(r, kv_heads, group, d)
    s_dec = jnp.einsum("rkhd,rknd->rkhn", q_dec, dec_k, preferred_element_type=jnp.float32)
    s_dec = s_dec.reshape(b, g, kv_heads, group, n).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, g * group, n)
    logits = jnp.concatenate([s_ctx, s_dec], axis=-1) * (1.0 / math.sqrt(d))
    visible = jnp.concatenate(
        [ctx_valid[:, None, None, :], jnp.broadcast_to(jnp.arange(n) <= step, (b, 1, 1, n))], axis=-1
    )
    probs = jax.nn.softmax(jnp.where(visible, logits, _MASK_VALUE), axis=-1).astype(ctx_v.dtype)
    out = jnp.einsum("bkmc,bkcd->bkmd", probs[..., :c], ctx_v)  # [B, Kh, G * group, D]
    out = out.reshape(b, kv_heads, g, group, d).transpose(0, 2, 1, 3, 4).reshape(r, kv_heads, group, d)
    p_dec = probs[..., c:].reshape(b, kv_heads, g, group, n).transpose(0, 2, 1, 3, 4).reshape(r, kv_heads, group, n)
    out = out + jnp.einsum("rkhn,rknd->rkhd", p_dec, dec_v)
    return out.reshape(r, h, d)


def _vocab_major_head(model):
    """h [R, E] (after the final norm) -> logits [V, R] float32, as `Decoder.logits` computes them
    but vocabulary-major. XLA:CPU hands a dot to YNNPACK, which repacks its right operand on every
    call: [R, E] x [E, V] repacks the whole LM head every step, [V, E] x [E, R] reads it as stored
    (6.5 instead of 8.3 ms of a batch-32 step, profiled), and the greedy and log-prob reductions
    over a leading vocabulary axis vectorise over the rows. With the fused q/k/v matmul of
    `_qkv`, a decode step (bench/rollout.py model) took 19.0 instead of 20.8 ms at batch 32 and 7.9
    instead of 8.3 at batch 8. An untied head is transposed once per call for that, on CPU only:
    other backends read a transposed operand in place, and a copy would cost their memory."""
    decoder, dtype = model.decoder, model.config.compute_dtype
    if decoder.lm_head is None:
        table = decoder.embed_tokens[...].astype(dtype)  # tied: already [V, E]
        return lambda h: jnp.dot(table, h.T.astype(dtype), preferred_element_type=jnp.float32)
    head = decoder.lm_head
    if head.bias is not None or head.lora_a is not None:
        raise ValueError("decoding supports an LM head without bias or adapter")
    kernel = head.kernel[...].astype(dtype)  # [E, V]
    if jax.default_backend() == "cpu":
        kernel_t = kernel.T
        return lambda h: jnp.dot(kernel_t, h.T.astype(dtype), preferred_element_type=jnp.float32)
    return lambda h: jnp.einsum("ev,re->vr", kernel, h.astype(dtype), preferred_element_type=jnp.float32)


def _qkv(attn):
    """One [E, (H + 2 Kh) * D] kernel and bias for the query, key and value projections of a layer
    (adapters already folded): one matmul instead of three (0.25 ms instead of 0.54 at batch 32 and
    E = 512, timed alone)."""
    kernels, biases = [], []
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        kernel = proj.kernel[...].astype(proj.compute_dtype)
        kernels.append(kernel.reshape(kernel.shape[0], -1))
        bias = jnp.zeros(kernel.shape[1:], kernel.dtype) if proj.bias is None else proj.bias[...]
        biases.append(bias.reshape(-1).astype(proj.compute_dtype))
    return jnp.concatenate(kernels, axis=1), jnp.concatenate(biases)


def _decode_step(model, decode_layers, head, tokens, positions, contexts, caches, step, num_samples, captured):
    """Runs tokens [R] at `positions` [R] through the decoder, writing their keys and values at
    decode slot `step`. decode_layers: per layer (module, fused qkv kernel and bias); head:
    `_vocab_major_head`; contexts: per layer (keys, values, valid) as `_decode_attention`; caches:
    per layer (keys, values) [R, Kh, N, D]; captured: residual-stream indices (0 = embeddings, i =
    output of layer i) to return. Returns (logits [V, R] float32, caches, {index: [R, E]})."""
    cfg = model.config
    t = cfg.text
    r = tokens.shape[0]
    x = model.decoder.embed(tokens[:, None])  # [R, 1, E]
    pos = jnp.broadcast_to(positions[None, :, None], (3, r, 1))
    cos, sin = layers.mrope_cos_sin(pos, t.head_dim, t.rope_theta, t.mrope_section, jnp.float32)
    states = {0: x} if 0 in captured else {}
    new_caches = []
    for i, ((layer, qkv_kernel, qkv_bias), context, (cache_k, cache_v)) in enumerate(
        zip(decode_layers, contexts, caches)
    ):
        attn = layer.self_attn
        normed = layer.input_layernorm(x)[:, 0].astype(qkv_kernel.dtype)
        qkv = jnp.dot(normed, qkv_kernel) + qkv_bias
        q, k, v = jnp.split(qkv, [t.num_heads * t.head_dim, (t.num_heads + t.num_kv_heads) * t.head_dim], axis=-1)
        q = layers.apply_rotary(q.reshape(r, 1, t.num_heads, t.head_dim), cos, sin)[:, 0]  # [R, H, D]
        k = layers.apply_rotary(k.reshape(r, 1, t.num_kv_heads, t.head_dim), cos, sin)[:, 0]  # [R, Kh, D]
        v = v.reshape(r, t.num_kv_heads, t.head_dim)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[:, :, None].astype(cache_k.dtype), (0, 0, step, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[:, :, None].astype(cache_v.dtype), (0, 0, step, 0))
        new_caches.append((cache_k, cache_v))
        out = _decode_attention(q, context, (cache_k.astype(q.dtype), cache_v.astype(q.dtype)), step, num_samples)
        x = x + attn.o_proj(out[:, None])
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = parallel.constrain(x, ("batch", None, "embed"))
        if i + 1 in captured:
            states[i + 1] = x
    logits = head(model.decoder.norm(x)[:, 0])
    return logits, tuple(new_caches), {k: v[:, 0] for k, v in states.items()}


def _decode_loop(model, cache, g, n, draw, ends, token, tokens, logprobs, lengths, predicting, hidden_layers):
    """Tokens 1 .. n - 1 of every row, in a `lax.while_loop` of one-token decode steps over the
    prompts' prefill `cache` (see the module docstring), until every row has ended. Returns
    (tokens, logprobs, lengths, predicting), updated."""
    text = model.config.text
    r = token.shape[0]
    # Head-major context, keys [L, B, Kh, D, C] and values [L, B, Kh, C, D]: transposed once here,
    # read by every step and sample.
    ctx_k = cache.keys.transpose(0, 1, 3, 4, 2)
    ctx_v = cache.values.transpose(0, 1, 3, 2, 4)
    contexts = tuple((ctx_k[i], ctx_v[i], cache.key_valid) for i in range(text.num_layers))
    positions = jnp.repeat(cache.next_position, g)  # [R]: position of generated token 0
    # Per-layer modules and fused q/k/v kernels, sliced from the stacked layers once: loop
    # invariants, like the vocabulary-major head.
    layer_graphdef, stacked = nnx.split(model.decoder.layers)
    decode_layers = []
    for i in range(text.num_layers):
        layer = nnx.merge(layer_graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
        decode_layers.append((layer, *_qkv(layer.self_attn)))
    head = _vocab_major_head(model)
    # Each row's own decode cache: the last token is sampled, never decoded.
    caches = tuple(
        tuple(jnp.zeros((r, text.num_kv_heads, n - 1, text.head_dim), a.dtype) for a in (cache.keys, cache.values))
        for _ in range(text.num_layers)
    )
    captured = tuple(sorted({i % (text.num_layers + 1) for i in hidden_layers}))

    def cond(carry):
        i, _, _, _, _, done, _, _ = carry
        return (i < n) & ~jnp.all(done)

    def body(carry):
        i, previous, caches, tokens, logprobs, done, lengths, predicting = carry
        # Token i - 1 enters at decode slot i - 1; its states predict token i.
        logits, caches, states = _decode_step(
            model, decode_layers, head, previous, positions + i - 1, contexts, caches, i - 1, g, captured
        )
        predicting = {k: v.at[:, i].set(states[k % (text.num_layers + 1)]) for k, v in predicting.items()}
        token, logprob = draw(logits, i, done, previous)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, i))
        if logprobs is not None:
            logprobs = jax.lax.dynamic_update_slice(logprobs, logprob[:, None], (0, i))
        lengths = jnp.where(done, lengths, i + 1)
        done = done | jnp.isin(token, ends)
        return i + 1, token, caches, tokens, logprobs, done, lengths, predicting

    carry = (1, token, caches, tokens, logprobs, jnp.isin(token, ends), lengths, predicting)
    _, _, _, tokens, logprobs, _, lengths, predicting = jax.lax.while_loop(cond, body, carry)
    return tokens, logprobs, lengths, predicting


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "config",
        "end_ids",
        "num_samples",
        "return_logprobs",
        "hidden_layers",
        "prompt_layers",
    ),
)
def _generate(
    graphdef,
    state,
    inputs,
    keys,
    memory,
    *,
    config,
    end_ids,
    num_samples,
    return_logprobs,
    hidden_layers,
    prompt_layers,
):
    model = nnx.merge(graphdef, state)
    _fold_adapters(model)
    text = model.config.text
    b, t = inputs.input_ids.shape
    g, n = num_samples, config.max_new_tokens
    r = b * g

    # Prefill, once per prompt: the cache starts with the memory (keys already rotated, any order).
    start = 0 if memory is None else memory.size
    cache = KVCache.zeros(model.config, b, start + t)
    if memory is not None:
        cache = dataclasses.replace(
            cache,
            keys=cache.keys.at[:, :, :start].set(memory.keys.astype(cache.keys.dtype)),
            values=cache.values.at[:, :, :start].set(memory.values.astype(cache.values.dtype)),
            key_valid=cache.key_valid.at[:, :start].set(memory.valid),
        )
    wanted = tuple(sorted(set(hidden_layers) | set(prompt_layers)))
    logits, cache, hidden = model.prefill(inputs, cache, wanted, start=start)

    # Row p * G + g draws with fold_in(fold_in(keys[g], p), step).
    row_keys = jax.vmap(jax.vmap(jax.random.fold_in, (0, None)), (None, 0))(keys, jnp.arange(b)).reshape(r)
    ends = jnp.asarray(end_ids, jnp.int32)

    def draw(logits_vr, i, done, previous):
        """Token i of every row from vocabulary-major logits [V, R]."""
        token = _sample_columns(logits_vr, jax.vmap(jax.random.fold_in, (0, None))(row_keys, i), config)
        token = jnp.where(done, previous, token)  # after its end a row repeats its end token
        logprob = None
        if return_logprobs:
            logprob = logprobs_from_logits(logits_vr, token, config.temperature, axis=0)
            logprob = jnp.where(done, 0.0, logprob)
        return token, logprob

    # Token 0 of every sample from its prompt's prefill logits.
    token, logprob = draw(jnp.repeat(logits, g, axis=0).T, 0, jnp.zeros((r,), bool), jnp.zeros((r,), jnp.int32))
    tokens = jnp.zeros((r, n), jnp.int32).at[:, 0].set(token)
    logprobs = None if logprob is None else jnp.zeros((r, n), jnp.float32).at[:, 0].set(logprob)
    last = jnp.max(jnp.where(inputs.attention_mask, jnp.arange(t), -1), axis=1)
    predicting = {}
    for k in hidden_layers:
        first = jnp.repeat(hidden[k][jnp.arange(b), last], g, axis=0)
        predicting[k] = jnp.zeros((r, n, text.hidden_size), jnp.float32).at[:, 0].set(first)
    lengths = jnp.ones((r,), jnp.int32)
    if n > 1:
        tokens, logprobs, lengths, predicting = _decode_loop(
            model, cache, g, n, draw, ends, token, tokens, logprobs, lengths, predicting, hidden_layers
        )
    # The loop stops once every row has ended; pad each row after its end with its last token.
    mask = jnp.arange(n)[None, :] < lengths[:, None]
    last_token = tokens[jnp.arange(r), lengths - 1]
    tokens = jnp.where(mask, tokens, last_token[:, None])
    if logprobs is not None:
        logprobs = jnp.where(mask, logprobs, 0.0)
    # After its end a row's states depend on how long the other rows ran: zero them.
    predicting = {k: jnp.where(mask[:, :, None], v, 0.0) for k, v in predicting.items()}
    return Generation(
        tokens=tokens,
        lengths=lengths,
        mask=mask,
        logprobs=logprobs,
        predicting=predicting,
        prompt_hidden={k: hidden[k] for k in prompt_layers},
    )


def generate(
    model,
    inputs: ModelInputs,
    config: SamplingConfig,
    *,
    end_ids: Sequence[int],
    rng=None,
    num_samples: int = 1,
    return_logprobs: bool = False,
    memory: Memory | None = None,
    hidden_layers: Sequence[int] = (),
    prompt_layers: Sequence[int] = (),
) -> Generation:
    """Generates up to `config.max_new_tokens` tokens, `num_samples` times, after each prompt of
    `inputs` (see the module docstring); with a `memory` (a streamed video,
    `jaxgrounding.memory.streaming`, one row per prompt) the prompt continues it.

    rng: one key (split into the G sample keys) or G keys; None means `jax.random.key(0)`.
    hidden_layers: residual-stream layers whose state that predicted each token is returned;
    prompt_layers: layers whose prefill states are returned. Run it under
    `lora.adapters_disabled(model)` to sample from the base model (GRPO's reference policy).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if config.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {config.max_new_tokens}")
    b = inputs.input_ids.shape[0]
    if memory is not None and memory.valid.shape[0] != b:
        raise ValueError(f"memory has {memory.valid.shape[0]} rows for {b} prompts; it needs one per prompt")
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef,
        state,
        inputs,
        sample_keys(rng, num_samples),
        memory,
        config=config,
        end_ids=tuple(int(i) for i in end_ids),
        num_samples=int(num_samples),
        return_logprobs=bool(return_logprobs),
        hidden_layers=tuple(hidden_layers),
        prompt_layers=tuple(prompt_layers),
    )
