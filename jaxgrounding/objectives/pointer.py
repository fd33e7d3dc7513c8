"""Attention pointers: where the state that writes a time should read it from.

A model that writes its answer's times as text (Time-R1's "<answer>12.00 to 17.00</answer>") has to attend, at the
state that writes the start number, to the frames where the event starts, and carry what they show to the LM head. A
pretrained video-LLM brings that circuit; a tiny one trained from scratch for minutes does not find it from the answer
tokens alone. Its answers then follow the query and the video's length (the shuffled-video control of
`evaluation.shuffled_video_metrics` leaves them unchanged), and an auxiliary L_ST between the writing state and the
frames (MeCo's contrastive loss) is no cure: it trains to near zero while the written numbers stay blind, because the
similarity can be met by "this grid is where the event starts" without the state carrying that grid's time.

The pointer loss supervises the attention itself. At the last decoder layer, each head's attention from the state that
predicts a number should fall on the visual tokens of the temporal grid the number names:

    L_ptr = -mean over pointers and heads of log sum_{j in target grid} softmax_j(q_p . k_j / sqrt(d) + mask)

The attention output of that layer is then the target grid's values, and the LM loss alone has to learn to read the
time they show (the synthetic set's burned-in timecode). Used by the warm start of a from-scratch model
(`warm_start.pointer_weight`); a pretrained model needs none.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrounding.model import layers

_NEVER = -1e30


def last_layer_attention_logprobs(
    llm, hidden_in_bte: jax.Array, positions_3bt: jax.Array, key_valid_bt: jax.Array, query_positions_bk: jax.Array
) -> jax.Array:
    """log softmax of the last decoder layer's attention scores, every head, from the query positions: [B, K, H, T].

    hidden_in_bte: the residual stream entering the last layer (`forward(hidden_layers=(-2,))`); positions_3bt: the
    M-RoPE positions; key_valid_bt: the attention mask; query_positions_bk: [B, K] int (clipped into range). Keys after
    a query (causal) and invalid keys get no probability. The same scores the model's attention uses (tested against
    transformers' attention weights)."""
    config = llm.config.text
    graphdef, stacked = nnx.split(llm.decoder.layers)
    last = nnx.merge(graphdef, jax.tree.map(lambda a: a[-1], stacked))
    cos, sin = layers.mrope_cos_sin(positions_3bt, config.head_dim, config.rope_theta, config.mrope_section, jnp.float32)
    normed = last.input_layernorm(hidden_in_bte)
    query_positions_bk = jnp.clip(query_positions_bk, 0, hidden_in_bte.shape[1] - 1)
    # Only the K query rows are projected and rotated.
    rows = jnp.take_along_axis(normed, query_positions_bk[..., None], axis=1)
    row_cos = jnp.take_along_axis(cos, query_positions_bk[..., None], axis=1)
    row_sin = jnp.take_along_axis(sin, query_positions_bk[..., None], axis=1)
    q = layers.apply_rotary(last.self_attn.q_proj(rows), row_cos, row_sin)  # [B, K, H, D]
    k = layers.apply_rotary(last.self_attn.k_proj(normed), cos, sin)  # [B, T, Kh, D]
    k = jnp.repeat(k, config.num_heads // config.num_kv_heads, axis=2)  # grouped-query: head h reads kv head h // g
    scores = jnp.einsum("bkhd,bthd->bkht", q.astype(jnp.float32), k.astype(jnp.float32)) / jnp.sqrt(config.head_dim)
    t = jnp.arange(hidden_in_bte.shape[1])
    allowed = key_valid_bt[:, None, :] & (t[None, None, :] <= query_positions_bk[..., None])
    # A finite floor, not -inf: the loss's masked sums stay finite in value and gradient.
    scores = jnp.where(allowed[:, :, None, :], scores, _NEVER)
    return jax.nn.log_softmax(scores, axis=-1)


def pointer_loss(logprobs_bkht: jax.Array, target_bkt: jax.Array, valid_bk: jax.Array) -> jax.Array:
    """-mean log attention mass on each pointer's target keys, over valid pointers and every head.

    logprobs_bkht: `last_layer_attention_logprobs`; target_bkt: [B, K, T] bool, the keys a pointer should read;
    valid_bk: [B, K] bool (padding pointers, and pointers without a target, count for nothing)."""
    valid = valid_bk & jnp.any(target_bkt, axis=-1)
    mass = jax.nn.logsumexp(jnp.where(target_bkt[:, :, None, :], logprobs_bkht, _NEVER), axis=-1)  # [B, K, H]
    mass = jnp.where(valid[..., None], mass, 0.0)
    heads = logprobs_bkht.shape[2]
    return -jnp.sum(mass) / jnp.maximum(jnp.sum(valid) * heads, 1)


def grid_targets(frame_of_token_bt: jax.Array, ranges_bk2: jax.Array) -> jax.Array:
    """[B, K, T] bool: the visual tokens whose temporal grid lies in each pointer's [first, last] range."""
    frame = frame_of_token_bt[:, None, :]
    return (frame >= 0) & (frame >= ranges_bk2[..., :1]) & (frame <= ranges_bk2[..., 1:])
