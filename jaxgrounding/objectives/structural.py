"""MeCo's structural-token grounding loss L_ST (MeCo paper eq. 4-5, sec. 3.4).

Each structural token i (`<ent>` for an event, `<tst>` for a transition) is grounded to its window
of frames by a contrastive cross-entropy whose softmax runs over TIME (all frames of the video):

    p(h_t | s_i) = exp(s_i . h_t / tau) / sum_t' exp(s_i . h_t' / tau)                     (eq. 5)
    L_i          = - sum_{t in window_i} target_{i,t} * log p(h_t | s_i)                     (eq. 4)

with s_i and h_t L2-normalised projections of decoder states and target_i uniform over the
window's frames. Eq. 4 writes the weight as 1 / (t_e - t_s); the reference code uses
1 / (number of frames in the window, both ends inclusive), which sums to one and is defined for
one-frame windows. We take the targets as given (`targets_bkf`), built the reference's way by the
data pipeline.

Where the states come from (the caller's job, see REFERENCE.md): frame states are the last decoder
layer's output before the final norm, averaged over each frame's visual tokens
(`pool_frame_states`); a structural token's state is the second-to-last layer's output at the
position that predicts it (`gather_states`). Both go through their own `ProjectorHead`.

Averaging follows the reference code (pangzss/MeCo, `meco_arch.py`), which departs from eq. 4's
single mean over all M + K tokens ("Separating ent and tst losses gives slightly better
performance"): see `structural_loss`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrounding.model.layers import LayerNorm, Linear

# Token kinds in `token_kind_bk`.
PAD, ENT, TST = 0, 1, 2

# CLIP's bound on exp(logit_scale). The reference has no bound; see `StructuralHeads`.
MAX_LOGIT_SCALE = math.log(100.0)

# Finite stand-in for -inf on invalid frames: a sample with no valid frame then gives a finite
# (uniform) log-softmax instead of NaN, and no inf ever meets a zero in the backward pass.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class ProjectorHead(nnx.Module):
    """LayerNorm(H) -> Linear(H, H/2) -> GELU (exact) -> Linear(H/2, H), all in float32.

    Shape and init as the reference's `vid_head` / `frm_head`: linear weights N(0, 0.02), zero
    biases, LayerNorm weight 1 and bias 0 with PyTorch's default eps 1e-5.
    """

    def __init__(self, hidden_size: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(use_bias=True, param_dtype=param_dtype, compute_dtype=jnp.float32, rngs=rngs)
        self.norm = LayerNorm(hidden_size, eps=1e-5, axis_name="embed", param_dtype=param_dtype)
        self.fc1 = Linear(hidden_size, hidden_size // 2, axes=("embed", None), **kw)
        self.fc2 = Linear(hidden_size // 2, hidden_size, axes=(None, "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.norm(x.astype(jnp.float32))
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class StructuralHeads(nnx.Module):
    """The two projector heads and the learnable temperature of eq. 5.

    `logit_scale` holds log(1 / tau), initialised to log(1 / 0.07) as in the reference and CLIP.
    We clamp exp(logit_scale) at 100 as CLIP does; the reference does not clamp. Why: the scale
    multiplies the gradient that reaches the cosine similarities, and nothing else stops it from
    growing once the easy windows are separated, which sharpens the softmax over time until a few
    frames carry all the gradient. At 100 the logits already span [-100, 100], a probability ratio
    of e^200 between the best and the worst frame, so a larger scale buys nothing. Under the
    reference recipe (AdamW moves a parameter by about lr per step: 5,118 steps at 2e-5) the log
    scale drifts by ~0.1 from 2.66, far below log(100) = 4.61, so the clamp never binds when
    reproducing the paper; it guards runs with a larger learning rate or more steps. Above the
    clamp the gradient to logit_scale is 0.
    """

    def __init__(self, hidden_size: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.frame_head = ProjectorHead(hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.token_head = ProjectorHead(hidden_size, param_dtype=param_dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), param_dtype), logical_axes=())

    def __call__(self, token_states_bkh: jax.Array, frame_states_bfh: jax.Array) -> jax.Array:
        """Scaled cosine similarity of every structural token with every frame.

        token_states_bkh: [B, K, H]; frame_states_bfh: [B, F, H]. Returns logits_bkf: [B, K, F]
        float32.
        """
        tokens_bkh = _l2_normalize(self.token_head(token_states_bkh))
        frames_bfh = _l2_normalize(self.frame_head(frame_states_bfh))
        scale = jnp.exp(jnp.minimum(self.logit_scale[...].astype(jnp.float32), MAX_LOGIT_SCALE))
        return scale * jnp.einsum("bkh,bfh->bkf", tokens_bkh, frames_bfh)


def _l2_normalize(x: jax.Array) -> jax.Array:
    # torch.nn.functional.normalize: x / max(||x||, 1e-12), so a zero vector stays zero. Written
    # on the squared norm because the gradient of ||x|| at x = 0 is 0/0 = NaN, and padded frames
    # (zero pooled states through a zero-bias head) are exactly zero vectors.
    squared_norm = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, 1e-24))


def pool_frame_states(hidden_bth: jax.Array, frame_of_token_bt: jax.Array, num_frames: int):
    """Mean of each frame's visual-token states.

    hidden_bth: [B, T, H]; frame_of_token_bt: [B, T] int, the frame index of each visual token and
    -1 for every other token. Returns frame_states_bfh: [B, F, H] float32 (zeros for a frame
    without tokens) and frame_valid_bf: [B, F] bool (False for a frame without tokens).

    Pooling happens before the projector head. The paper projects then pools ("h_t is spatially
    average-pooled from H_t", H_t being projected states); the reference has one token per frame,
    where the two orders agree. With several tokens per frame they differ (the head is nonlinear).
    """
    b, t, h = hidden_bth.shape
    # Non-visual tokens go to an extra bucket that is dropped, so every index is in range.
    bucket_bt = jnp.where(frame_of_token_bt >= 0, frame_of_token_bt, num_frames).astype(jnp.int32)
    # A scatter-add per sample: O(T * H) work and memory, where a one-hot [B, T, F] matmul would
    # cost O(T * F * H); vmap keeps the batch axis a batch axis for sharding.
    segment_sum = jax.vmap(lambda x, idx: jax.ops.segment_sum(x, idx, num_segments=num_frames + 1))
    sums_bfh = segment_sum(hidden_bth.astype(jnp.float32), bucket_bt)[:, :num_frames]
    counts_bf = segment_sum(jnp.ones((b, t), jnp.float32), bucket_bt)[:, :num_frames]
    frame_valid_bf = counts_bf > 0
    return sums_bfh / jnp.maximum(counts_bf, 1.0)[..., None], frame_valid_bf


def gather_states(hidden_bth: jax.Array, positions_bk: jax.Array) -> jax.Array:
    """states_bkh[b, k] = hidden_bth[b, positions_bk[b, k]].

    positions_bk: [B, K] int, for each structural token the position of the token that PREDICTS
    it (the structural token's own position minus 1): under causal attention that is the last
    state that has not seen the structural token itself. Padding entries may hold anything (they
    are clipped into range here and masked by kind 0 in `structural_loss`).
    """
    positions_bk = jnp.clip(positions_bk, 0, hidden_bth.shape[1] - 1)
    return jnp.take_along_axis(hidden_bth, positions_bk[..., None], axis=1)


def structural_loss(
    logits_bkf: jax.Array, token_kind_bk: jax.Array, targets_bkf: jax.Array, frame_valid_bf: jax.Array
) -> dict[str, jax.Array]:
    """L_ST, averaged exactly as the reference code does.

    logits_bkf: [B, K, F] from `StructuralHeads`; token_kind_bk: [B, K] int (0 padding, 1 `<ent>`,
    2 `<tst>`); targets_bkf: [B, K, F] rows uniform over each token's window (summing to 1 over
    the valid frames); frame_valid_bf: [B, F] bool.

    Per token: ce = -sum_f target_f * log_softmax_f(logits), the softmax over the sample's valid
    frames (time), not over tokens.
    Per sample b (the reference's `F.cross_entropy(sim, tgt)` per kind, default reduction 'mean'):
        ent_b = mean of ce over b's <ent> tokens,  tst_b = mean of ce over b's <tst> tokens,
        loss_b = (ent_b + tst_b) / 2 if b has both kinds, else the one it has.
    Batch: loss = mean of loss_b over the samples that have at least one structural token (the
    reference's `avg_factor` counts samples with windows and skips the others). So it is a
    per-sample mean, then a mean over samples; not a per-token mean over the batch. With only one
    kind in the batch, loss is that kind's loss.

    Reported alongside (for logging; `loss` is not their average when samples differ in which
    kinds they have): ent_loss / tst_loss = mean of ent_b / tst_b over the samples that have that
    kind (0 when none does); ent_count / tst_count = number of such tokens in the batch. All
    float32 scalars; a kind absent from the batch contributes 0 and no NaN.
    """
    logits_bkf = logits_bkf.astype(jnp.float32)
    valid_b1f = frame_valid_bf[:, None, :]
    logp_bkf = jax.nn.log_softmax(jnp.where(valid_b1f, logits_bkf, _MASK_VALUE), axis=-1)
    # Target mass on an invalid frame is dropped rather than scored against the mask value.
    targets_bkf = jnp.where(valid_b1f, targets_bkf.astype(jnp.float32), 0.0)
    ce_bk = -jnp.sum(targets_bkf * logp_bkf, axis=-1)

    def per_sample_mean(kind):
        is_kind_bk = (token_kind_bk == kind).astype(jnp.float32)
        count_b = jnp.sum(is_kind_bk, axis=-1)
        mean_b = jnp.sum(ce_bk * is_kind_bk, axis=-1) / jnp.maximum(count_b, 1.0)
        return mean_b, (count_b > 0).astype(jnp.float32), jnp.sum(count_b)

    ent_b, has_ent_b, ent_count = per_sample_mean(ENT)
    tst_b, has_tst_b, tst_count = per_sample_mean(TST)
    kinds_b = has_ent_b + has_tst_b
    loss_b = (ent_b * has_ent_b + tst_b * has_tst_b) / jnp.maximum(kinds_b, 1.0)
    has_any_b = (kinds_b > 0).astype(jnp.float32)

    def mean_over(values_b, mask_b):
        return jnp.sum(values_b * mask_b) / jnp.maximum(jnp.sum(mask_b), 1.0)

    return {
        "loss": mean_over(loss_b, has_any_b),
        "ent_loss": mean_over(ent_b, has_ent_b),
        "tst_loss": mean_over(tst_b, has_tst_b),
        "ent_count": ent_count,
        "tst_count": tst_count,
    }
