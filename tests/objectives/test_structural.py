"""L_ST (MeCo eq. 4-5) against a direct numpy transcription, plus heads, pooling and gathering."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgrounding.objectives.structural import (
    ENT,
    PAD,
    TST,
    StructuralHeads,
    gather_states,
    pool_frame_states,
    structural_loss,
)
from jaxgrounding.parallel import LOGICAL_AXIS_RULES

# ----------------------------------------------------------------------------------------------
# numpy references
# ----------------------------------------------------------------------------------------------


def numpy_l_st(logits, kinds, windows, frame_valid):
    """Eq. 4-5 per token, averaged as the reference code does.

    windows[b][k] = (s, e): inclusive indices into sample b's valid frames. For token i,
    p(h_t | s_i) = softmax over the valid frames t' (eq. 5) and
    L_i = -sum_{t in window} log p(h_t | s_i) / (number of window frames) (eq. 4 with the
    reference's inclusive frame count). Per sample: mean over <ent> tokens, mean over <tst>
    tokens, averaged over the kinds present; then the mean over samples that have any token.
    """
    logits = logits.astype(np.float64)
    sample_losses, ent_means, tst_means = [], [], []
    for b in range(logits.shape[0]):
        valid_idx = np.flatnonzero(frame_valid[b])
        per_kind = {ENT: [], TST: []}
        for k in range(logits.shape[1]):
            if kinds[b, k] == PAD:
                continue
            z = logits[b, k, valid_idx]
            log_p = z - (np.log(np.exp(z - z.max()).sum()) + z.max())  # eq. 5
            s, e = windows[b][k]
            per_kind[kinds[b, k]].append(-log_p[s : e + 1].sum() / (e - s + 1))  # eq. 4
        means = {kind: np.mean(v) for kind, v in per_kind.items() if v}
        if ENT in means:
            ent_means.append(means[ENT])
        if TST in means:
            tst_means.append(means[TST])
        if means:
            sample_losses.append(np.mean(list(means.values())))
    mean = lambda v: float(np.mean(v)) if v else 0.0
    return {"loss": mean(sample_losses), "ent_loss": mean(ent_means), "tst_loss": mean(tst_means)}


def make_case(seed, *, batch=4, tokens=6, frames=9, kinds_allowed=(ENT, TST)):
    """Random logits with padding tokens, invalid frames and one sample without any token."""
    rng = np.random.default_rng(seed)
    logits = (5 * rng.standard_normal((batch, tokens, frames))).astype(np.float32)
    frame_valid = rng.random((batch, frames)) > 0.25
    frame_valid[:, :2] = True  # at least two valid frames per sample
    kinds = rng.choice([PAD, *kinds_allowed], size=(batch, tokens))
    kinds[0] = PAD  # a sample without windows
    windows = [[None] * tokens for _ in range(batch)]
    targets = np.zeros((batch, tokens, frames), np.float32)
    for b in range(batch):
        valid_idx = np.flatnonzero(frame_valid[b])
        for k in range(tokens):
            if kinds[b, k] == PAD:
                continue
            s = int(rng.integers(0, len(valid_idx)))
            e = int(rng.integers(s, len(valid_idx)))
            windows[b][k] = (s, e)
            targets[b, k, valid_idx[s : e + 1]] = 1.0 / (e - s + 1)  # uniform over the window
    return logits, kinds, targets, frame_valid, windows


def numpy_layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def numpy_head(head, x):
    g = lambda v: np.asarray(v[...], np.float64)
    x = numpy_layer_norm(x.astype(np.float64), g(head.norm.weight), g(head.norm.bias))
    x = x @ g(head.fc1.kernel) + g(head.fc1.bias)
    x = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))  # exact GELU
    return x @ g(head.fc2.kernel) + g(head.fc2.bias)


# ----------------------------------------------------------------------------------------------
# the loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_loss_matches_numpy_eq_4_5(seed):
    logits, kinds, targets, frame_valid, windows = make_case(seed)
    got = jax.jit(structural_loss)(logits, kinds, targets, frame_valid)
    want = numpy_l_st(logits, kinds, windows, frame_valid)
    for key in ("loss", "ent_loss", "tst_loss"):
        np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, err_msg=key)
        assert got[key].dtype == jnp.float32
    assert float(got["ent_count"]) == (kinds == ENT).sum()
    assert float(got["tst_count"]) == (kinds == TST).sum()


def test_per_sample_mean_differs_from_token_mean():
    """Sample 0: one <ent> (loss log 2); sample 1: three <ent> (loss log 4 each). Per-sample mean
    then over samples: (log 2 + log 4) / 2 = 1.5 log 2; a token mean would give 1.75 log 2."""
    logits = np.zeros((2, 3, 4), np.float32)
    frame_valid = np.array([[True, True, False, False], [True] * 4])
    kinds = np.array([[ENT, PAD, PAD], [ENT, ENT, ENT]])
    targets = np.zeros((2, 3, 4), np.float32)
    targets[0, 0, 0] = 1.0
    targets[1, :, 2] = 1.0
    got = structural_loss(logits, kinds, targets, frame_valid)
    np.testing.assert_allclose(float(got["loss"]), 1.5 * math.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(got["ent_loss"]), 1.5 * math.log(2), rtol=1e-6)
    assert float(got["tst_loss"]) == 0.0 and float(got["tst_count"]) == 0.0


@pytest.mark.parametrize("seed", [5, 6])
def test_only_ent_batch_total_is_ent_loss(seed):
    logits, kinds, targets, frame_valid, windows = make_case(seed, kinds_allowed=(ENT,))
    got = structural_loss(logits, kinds, targets, frame_valid)
    want = numpy_l_st(logits, kinds, windows, frame_valid)
    np.testing.assert_allclose(float(got["loss"]), want["loss"], rtol=1e-5)
    np.testing.assert_allclose(float(got["loss"]), float(got["ent_loss"]), rtol=1e-6)
    assert float(got["tst_loss"]) == 0.0
    grads = jax.grad(lambda x: structural_loss(x, kinds, targets, frame_valid)["loss"])(jnp.asarray(logits))
    assert np.isfinite(np.asarray(grads)).all()


def test_no_structural_tokens_gives_zero_and_finite_grads():
    logits, _, targets, frame_valid, _ = make_case(7)
    kinds = np.zeros(logits.shape[:2], np.int32)
    frame_valid[1] = False  # even a sample without any valid frame stays finite
    got = structural_loss(logits, kinds, targets * 0, frame_valid)
    assert all(float(v) == 0.0 for v in got.values())
    grads = jax.grad(lambda x: structural_loss(x, kinds, targets * 0, frame_valid)["loss"])(jnp.asarray(logits))
    assert np.isfinite(np.asarray(grads)).all() and not np.asarray(grads).any()


def test_padding_and_invalid_frames_do_not_matter():
    logits, kinds, targets, frame_valid, _ = make_case(8)
    loss = lambda x: structural_loss(x, kinds, targets, frame_valid)["loss"]
    grads = np.asarray(jax.grad(loss)(jnp.asarray(logits)))
    assert np.isfinite(grads).all()
    assert not grads[kinds == PAD].any()
    assert not grads.transpose(0, 2, 1)[~frame_valid].any()
    assert np.abs(grads).sum() > 0
    # Garbage at padding tokens and invalid frames (even huge values) leaves the loss unchanged.
    noisy = logits.copy()
    noisy[kinds == PAD] = 1e6
    noisy.transpose(0, 2, 1)[~frame_valid] = -3e4
    np.testing.assert_allclose(float(loss(noisy)), float(loss(logits)), rtol=1e-6)


def test_loss_casts_bf16_to_float32():
    logits, kinds, targets, frame_valid, windows = make_case(9)
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    got = structural_loss(logits_bf16, kinds, jnp.asarray(targets, jnp.bfloat16), frame_valid)
    assert got["loss"].dtype == jnp.float32
    want = numpy_l_st(np.asarray(logits_bf16.astype(jnp.float32)), kinds, windows, frame_valid)
    np.testing.assert_allclose(float(got["loss"]), want["loss"], rtol=2e-2)


# ----------------------------------------------------------------------------------------------
# pooling and gathering
# ----------------------------------------------------------------------------------------------


def test_pool_frame_states_matches_numpy_loop():
    rng = np.random.default_rng(10)
    b, t, h, f = 2, 13, 4, 5
    hidden = rng.standard_normal((b, t, h)).astype(np.float32)
    frame_of_token = rng.integers(-1, f, (b, t)).astype(np.int32)
    frame_of_token[0][frame_of_token[0] == 3] = -1  # frame 3 of sample 0 has no token
    got_states, got_valid = jax.jit(pool_frame_states, static_argnums=2)(
        jnp.asarray(hidden, jnp.bfloat16), frame_of_token, f
    )
    assert got_states.dtype == jnp.float32
    hidden_bf16 = np.asarray(jnp.asarray(hidden, jnp.bfloat16).astype(jnp.float32))
    for bi in range(b):
        for fi in range(f):
            members = hidden_bf16[bi][frame_of_token[bi] == fi]
            assert bool(got_valid[bi, fi]) == (len(members) > 0)
            want = members.mean(0) if len(members) else np.zeros(h)
            np.testing.assert_allclose(np.asarray(got_states[bi, fi]), want, rtol=1e-6, atol=1e-6)
    assert not bool(got_valid[0, 3])


def test_gather_states_matches_numpy_loop():
    rng = np.random.default_rng(11)
    hidden = rng.standard_normal((2, 10, 3)).astype(np.float32)
    positions = np.array([[4, 0, 9, -1], [2, 2, 7, 100]])  # the last column is padding
    got = np.asarray(gather_states(jnp.asarray(hidden), positions))
    for bi in range(2):
        for k in range(3):
            np.testing.assert_array_equal(got[bi, k], hidden[bi, positions[bi, k]])
    assert np.isfinite(got).all()


# ----------------------------------------------------------------------------------------------
# heads
# ----------------------------------------------------------------------------------------------


def test_heads_init_statistics_and_metadata():
    heads = StructuralHeads(512, rngs=nnx.Rngs(0))
    assert float(heads.logit_scale[...]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    for head in (heads.frame_head, heads.token_head):
        assert head.fc1.kernel.shape == (512, 256) and head.fc2.kernel.shape == (256, 512)
        for linear in (head.fc1, head.fc2):
            kernel = np.asarray(linear.kernel[...])
            assert abs(kernel.std() - 0.02) < 5e-4 and abs(kernel.mean()) < 5e-4
            assert not np.asarray(linear.bias[...]).any()
        np.testing.assert_array_equal(np.asarray(head.norm.weight[...]), np.ones(512))
        assert not np.asarray(head.norm.bias[...]).any()
    # separate weights, not one shared head
    assert not np.allclose(np.asarray(heads.frame_head.fc1.kernel[...]), np.asarray(heads.token_head.fc1.kernel[...]))
    for path, var in nnx.to_flat_state(nnx.state(heads, nnx.Param)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.get_value().ndim, path
        assert all(a is None or a in LOGICAL_AXIS_RULES for a in axes), path


def test_heads_match_numpy_and_clamp():
    rng = np.random.default_rng(12)
    heads = StructuralHeads(16, rngs=nnx.Rngs(1))
    # Non-trivial norm parameters so the numpy check covers them.
    heads.token_head.norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32)
    heads.frame_head.norm.bias[...] = jnp.asarray(rng.standard_normal(16), jnp.float32)
    tokens = rng.standard_normal((2, 3, 16)).astype(np.float32)
    frames = rng.standard_normal((2, 5, 16)).astype(np.float32)

    def want(scale):
        s = numpy_head(heads.token_head, tokens)
        h = numpy_head(heads.frame_head, frames)
        s /= np.linalg.norm(s, axis=-1, keepdims=True)
        h /= np.linalg.norm(h, axis=-1, keepdims=True)
        return scale * np.einsum("bkh,bfh->bkf", s, h)

    np.testing.assert_allclose(np.asarray(heads(tokens, frames)), want(1 / 0.07), rtol=1e-4, atol=1e-4)
    # bf16 states are cast to float32 inside the heads.
    got_bf16 = heads(jnp.asarray(tokens, jnp.bfloat16), jnp.asarray(frames, jnp.bfloat16))
    assert got_bf16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got_bf16), want(1 / 0.07), atol=0.3)

    scale_grad = lambda m: nnx.grad(lambda m: m(tokens, frames).sum())(m).logit_scale[...]
    assert float(scale_grad(heads)) != 0.0
    heads.logit_scale[...] = jnp.asarray(10.0)  # exp(10) >> 100: clamped
    np.testing.assert_allclose(np.asarray(heads(tokens, frames)), want(100.0), rtol=1e-4, atol=1e-3)
    assert float(scale_grad(heads)) == 0.0


@pytest.mark.parametrize("seed", [13, 14])
def test_end_to_end_grads_finite(seed):
    """hidden states -> pool / gather -> heads -> L_ST; matches numpy and differentiates."""
    rng = np.random.default_rng(seed)
    b, t, hdim, f = 2, 24, 16, 6
    hidden_last = rng.standard_normal((b, t, hdim)).astype(np.float32)
    hidden_prev = rng.standard_normal((b, t, hdim)).astype(np.float32)
    frame_of_token = np.full((b, t), -1, np.int32)
    frame_of_token[:, 2:14] = np.repeat(np.arange(f), 2)  # two visual tokens per frame
    frame_of_token[1, 12:14] = -1  # sample 1 has only 5 frames
    positions = np.array([[15, 18, 20], [16, 19, 0]])  # token before each structural token
    kinds = np.array([[TST, ENT, TST], [ENT, TST, PAD]])
    windows = [[(0, 1), (2, 3), (4, 5)], [(0, 2), (3, 4), None]]
    targets = np.zeros((b, 3, f), np.float32)
    for bi in range(b):
        for k, w in enumerate(windows[bi]):
            if w is not None:
                targets[bi, k, w[0] : w[1] + 1] = 1 / (w[1] - w[0] + 1)
    heads = StructuralHeads(hdim, rngs=nnx.Rngs(seed))

    def loss_fn(heads):
        frames_bfh, valid_bf = pool_frame_states(jnp.asarray(hidden_last), frame_of_token, f)
        tokens_bkh = gather_states(jnp.asarray(hidden_prev), positions)
        return structural_loss(heads(tokens_bkh, frames_bfh), kinds, targets, valid_bf)["loss"]

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(heads)

    # numpy: pool (two tokens per frame; sample 1's frame 5 is padding, a zero state), gather,
    # project, then eq. 4-5.
    frame_valid = np.array([[True] * 6, [True] * 5 + [False]])
    frames = np.zeros((b, f, hdim))
    for bi, fi in zip(*np.nonzero(frame_valid)):
        frames[bi, fi] = hidden_last[bi][frame_of_token[bi] == fi].mean(0)
    tokens = np.stack([hidden_prev[bi][positions[bi]] for bi in range(b)])
    s = numpy_head(heads.token_head, tokens)
    h = numpy_head(heads.frame_head, frames)
    s /= np.linalg.norm(s, axis=-1, keepdims=True)
    h /= np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)  # torch's F.normalize
    logits = np.einsum("bkh,bfh->bkf", s, h) / 0.07
    np.testing.assert_allclose(float(loss), numpy_l_st(logits, kinds, windows, frame_valid)["loss"], rtol=1e-4)

    leaves = jax.tree.leaves(nnx.state(grads))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert np.abs(np.asarray(grads.frame_head.fc1.kernel[...])).sum() > 0
    assert np.abs(np.asarray(grads.token_head.fc2.kernel[...])).sum() > 0
    assert float(grads.logit_scale[...]) != 0.0
