"""GRPO advantages and loss against a direct numpy transcription of the formulas (values and gradients),
plus the properties a trainer relies on: ratio 1 without clipping when old == current, zero-variance
groups and masked tokens contribute nothing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrounding.objectives import grpo
from jaxgrounding.objectives.grpo import group_advantages, grpo_loss

# ----------------------------------------------------------------------------------------------
# numpy references (float64, one sequence at a time)
# ----------------------------------------------------------------------------------------------


def numpy_advantages(rewards, g, estimator, scale, eps=1e-4):
    rewards = np.asarray(rewards, np.float64)
    out, zero = [], []
    for p in range(len(rewards) // g):
        group = rewards[p * g : (p + 1) * g]
        zero.append(bool(np.all(group == group[0])))
        if estimator == "grpo":
            centred = group - group.mean()
        else:
            centred = np.array([group[i] - np.mean(np.delete(group, i)) for i in range(g)])
        if scale == "group":
            centred = centred / (np.std(group, ddof=1) + eps)
        elif scale == "batch":
            centred = centred / (np.std(rewards, ddof=1) + eps)
        out.append(np.zeros(g) if zero[-1] else centred)
    return np.concatenate(out), np.array(zero)


def numpy_loss(logps, old, ref, adv, mask, beta, eps_low, eps_high, kl, loss_type, level, num_items, max_len):
    b, n = logps.shape
    per_token = np.zeros((b, n))
    for i in range(b):
        valid = mask[i] > 0
        if level == "sequence":
            seq_log_ratio = np.sum((logps[i] - old[i])[valid]) / max(valid.sum(), 1)
        for t in range(n):
            if not valid[t]:
                continue
            log_ratio = seq_log_ratio if level == "sequence" else logps[i, t] - old[i, t]
            ratio = np.exp(log_ratio)
            surrogate = -min(ratio * adv[i], np.clip(ratio, 1 - eps_low, 1 + eps_high) * adv[i])
            if kl == "k3":
                d = np.clip(ref[i, t] - logps[i, t], -20, 20)
                penalty = np.exp(d) - d - 1
            elif kl == "k1":
                penalty = logps[i, t] - ref[i, t]
            else:
                penalty = 0.5 * (logps[i, t] - ref[i, t]) ** 2
            per_token[i, t] = surrogate + beta * penalty
    tokens = mask.sum(axis=1)
    if loss_type == "grpo":
        return np.mean([per_token[i].sum() / max(tokens[i], 1) for i in range(b)])
    if loss_type == "bnpo":
        return per_token.sum() / max(tokens.sum(), 1)
    if loss_type == "dr_grpo":
        return per_token.sum() / (b * max_len)
    return per_token.sum() / num_items


def numpy_clip_fractions(logps, old, adv, mask, eps_low, eps_high, level):
    """(low, high, region): share of units (tokens; sequences with tokens for "sequence") whose ratio is
    clipped where the clip binds: below with A < 0, above with A > 0."""
    flags = []
    for i in range(logps.shape[0]):
        valid = mask[i] > 0
        ratios = np.exp((logps[i] - old[i])[valid])
        if level == "sequence":
            ratios = np.exp([np.mean(np.log(ratios))]) if valid.any() else np.array([])
        flags += [(r < 1 - eps_low and adv[i] < 0, r > 1 + eps_high and adv[i] > 0) for r in ratios]
    flags = np.array(flags, bool)
    return flags[:, 0].mean(), flags[:, 1].mean(), (flags[:, 0] | flags[:, 1]).mean()


def _inputs(seed=0, b=4, n=7):
    rng = np.random.default_rng(seed)
    logps = -rng.uniform(0.05, 3.0, size=(b, n))
    old = logps + rng.normal(0, 0.3, size=(b, n))  # ratios on both sides of the clip range
    ref = logps + rng.normal(0, 0.5, size=(b, n))
    adv = np.abs(rng.normal(size=b)) * np.where(np.arange(b) % 2, -1.0, 1.0)  # both signs
    mask = (rng.random((b, n)) < 0.75).astype(np.float64)
    mask[:, 0] = 1.0
    mask[-1] = 0.0  # a padding row
    return logps, old, ref, adv, mask


# ----------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------


def test_advantages_by_hand():
    rewards = [1.0, 0.0, 1.0, 0.0, 0.3, 0.3, 0.3, 0.3]
    adv, zero = group_advantages(jnp.asarray(rewards), 4)
    # Mean 0.5, unbiased std sqrt(1/3): +-0.5 / (0.57735 + 1e-4).
    np.testing.assert_allclose(adv, [0.8658754] * 1 + [-0.8658754] + [0.8658754, -0.8658754] + [0.0] * 4, rtol=1e-6)
    assert zero.tolist() == [False, True]
    rloo, _ = group_advantages(jnp.asarray(rewards), 4, estimator="rloo", scale="none")
    # 1 - mean(0, 1, 0) = 2/3.
    np.testing.assert_allclose(rloo, [2 / 3, -2 / 3, 2 / 3, -2 / 3, 0, 0, 0, 0], rtol=1e-6)


@pytest.mark.parametrize("estimator,scale", list(itertools.product(("grpo", "rloo"), grpo.SCALES)))
def test_advantages_match_numpy(estimator, scale):
    rng = np.random.default_rng(1)
    rewards = rng.uniform(0, 2, size=6 * 8)
    rewards[8:16] = 1.25  # a zero-variance group
    rewards[24:32] = np.round(rewards[24:32])  # ties inside a group
    adv, zero = group_advantages(jnp.asarray(rewards, jnp.float32), 8, estimator=estimator, scale=scale)
    want, want_zero = numpy_advantages(rewards.astype(np.float32), 8, estimator, scale)
    assert adv.dtype == jnp.float32 and adv.shape == (48,)
    np.testing.assert_allclose(adv, want, rtol=2e-5, atol=2e-6)
    assert zero.tolist() == want_zero.tolist() == [False, True, False, False, False, False]
    assert np.all(np.asarray(adv)[8:16] == 0.0)  # exactly, not rounding noise / eps


def test_zero_variance_is_exactly_zero_even_when_the_mean_rounds():
    # 0.1 * 3 / 3 != 0.1 in floating point; the group must still give exact zeros.
    adv, zero = group_advantages(jnp.full((3,), 0.1), 3)
    assert zero.tolist() == [True] and np.all(np.asarray(adv) == 0.0)


def test_lone_completions_and_bad_arguments():
    adv, zero = group_advantages(jnp.asarray([1.0, 0.0, 2.0]), 1)
    assert np.all(np.asarray(adv) == 0.0) and zero.tolist() == [True, True, True]
    for kwargs in (dict(estimator="ppo"), dict(scale="global")):
        with pytest.raises(ValueError):
            group_advantages(jnp.zeros(4), 2, **kwargs)
    with pytest.raises(ValueError):
        group_advantages(jnp.zeros(5), 2)


def test_estimators_are_registered_by_name():
    assert {"grpo", "rloo"} <= set(grpo.ADVANTAGE_ESTIMATORS)
    with pytest.raises(ValueError):
        grpo.register_advantage_estimator("grpo")(lambda r: r)


# ----------------------------------------------------------------------------------------------
# loss
# ----------------------------------------------------------------------------------------------

MODES = list(itertools.product(grpo.KL_ESTIMATORS, grpo.LOSS_TYPES, grpo.IMPORTANCE_SAMPLING))


def _options(kl, loss_type, level, mask):
    return dict(
        beta=0.04,
        epsilon_low=0.2,
        epsilon_high=0.28,
        kl=kl,
        loss_type=loss_type,
        importance_sampling=level,
        num_items_in_batch=float(mask.sum()) * 2.0,  # as if this were half of the batch
        max_completion_length=10,
    )


@pytest.mark.parametrize("kl,loss_type,level", MODES)
def test_loss_and_gradient_match_numpy(kl, loss_type, level):
    logps, old, ref, adv, mask = _inputs()
    options = _options(kl, loss_type, level, mask)
    others = [jnp.asarray(x, jnp.float32) for x in (old, ref, adv, mask)]

    def loss_of(lp):
        return grpo_loss(lp, *others, **options)[0]

    value, grad = jax.value_and_grad(loss_of)(jnp.asarray(logps, jnp.float32))
    _, metrics = grpo_loss(jnp.asarray(logps, jnp.float32), *others, **options)
    low, high, region = numpy_clip_fractions(logps, old, adv, mask, 0.2, 0.28, level)
    np.testing.assert_allclose(
        [metrics["clip_ratio_low"], metrics["clip_ratio_high"], metrics["clip_ratio_region"]], [low, high, region]
    )
    if level == "token":
        assert 0 < low < region and 0 < high < region  # both sides occur: the comparison means something

    def reference(lp):
        return numpy_loss(
            lp, old, ref, adv, mask, 0.04, 0.2, 0.28, kl, loss_type, level, options["num_items_in_batch"], 10
        )

    np.testing.assert_allclose(value, reference(logps), rtol=1e-5, atol=1e-6)
    # Central differences of the float64 reference.
    h = 1e-6
    want = np.zeros_like(logps)
    for index in np.ndindex(*logps.shape):
        step = np.zeros_like(logps)
        step[index] = h
        want[index] = (reference(logps + step) - reference(logps - step)) / (2 * h)
    np.testing.assert_allclose(grad, want, rtol=2e-4, atol=2e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)
    # The inputs do clip (on both sides), so the clipped branches were compared too.
    ratio = np.exp(logps - old)
    assert np.any((ratio < 0.8) & (mask > 0)) and np.any((ratio > 1.28) & (mask > 0))


@pytest.mark.parametrize("kl,loss_type,level", MODES)
def test_old_equals_current_gives_ratio_one_and_no_clipping(kl, loss_type, level):
    logps, _, ref, adv, mask = _inputs(seed=3)
    options = _options(kl, loss_type, level, mask)
    args = [jnp.asarray(x, jnp.float32) for x in (logps, logps, ref, adv, mask)]
    loss, metrics = grpo_loss(*args, **options)
    assert float(metrics["ratio_mean"]) == 1.0
    assert float(metrics["clip_ratio_region"]) == float(metrics["clip_ratio_low"]) == 0.0
    assert float(metrics["clip_ratio_high"]) == 0.0
    # Without the KL term the loss is then -A summed over the tokens, normalised as loss_type says.
    pg, _ = grpo_loss(*args, **(options | dict(beta=0.0)))
    want = numpy_loss(
        logps, logps, ref, adv, mask, 0.0, 0.2, 0.28, kl, loss_type, level, options["num_items_in_batch"], 10
    )
    np.testing.assert_allclose(pg, want, rtol=1e-5, atol=1e-7)
    # The metrics report the KL the loss used.
    kl_tokens = []
    for i, t in zip(*np.nonzero(mask)):
        d = ref[i, t] - logps[i, t]
        kl_tokens.append({"k3": np.exp(d) - d - 1, "k1": -d, "k2": 0.5 * d * d}[kl])
    np.testing.assert_allclose(metrics["kl"], np.mean(kl_tokens), rtol=1e-5, atol=1e-7)


def test_clip_metrics_by_hand():
    # Token ratios [[0.5, 2.0], [2.0, 1.0]]; a ratio counts as clipped only on the side where the clip
    # binds: below 1 - eps with A < 0, above 1 + eps with A > 0.
    logps = jnp.log(jnp.asarray([[0.5, 2.0], [2.0, 1.0]], jnp.float32))
    old = jnp.zeros((2, 2), jnp.float32)
    mask = jnp.ones((2, 2))
    # A = (1, -1): only row 0's 2.0 (A > 0) binds.
    _, m = grpo_loss(logps, old, old, jnp.asarray([1.0, -1.0]), mask, beta=0.0)
    assert (float(m["clip_ratio_low"]), float(m["clip_ratio_high"]), float(m["clip_ratio_region"])) == (0, 0.25, 0.25)
    # A = (-1, 1): row 0's 0.5 binds low, row 1's 2.0 binds high.
    _, m = grpo_loss(logps, old, old, jnp.asarray([-1.0, 1.0]), mask, beta=0.0)
    assert (float(m["clip_ratio_low"]), float(m["clip_ratio_high"]), float(m["clip_ratio_region"])) == (0.25, 0.25, 0.5)
    np.testing.assert_allclose(m["ratio_mean"], (0.5 + 2.0 + 2.0 + 1.0) / 4, rtol=1e-6)
    # Asymmetric bounds (DAPO's clip-higher): 2.0 is inside [0.8, 2.5], 0.5 still below.
    _, m = grpo_loss(logps, old, old, jnp.asarray([-1.0, 1.0]), mask, beta=0.0, epsilon_high=1.5)
    assert (float(m["clip_ratio_low"]), float(m["clip_ratio_high"]), float(m["clip_ratio_region"])) == (0.25, 0, 0.25)
    _, m = grpo_loss(logps, old, old, jnp.asarray([-1.0, 1.0]), mask, beta=0.0, epsilon_low=0.6)
    assert (float(m["clip_ratio_low"]), float(m["clip_ratio_high"]), float(m["clip_ratio_region"])) == (0, 0.25, 0.25)


def test_zero_variance_groups_contribute_nothing():
    logps, old, ref, _, mask = _inputs(seed=5, b=4)
    mask[-1] = 1.0
    rewards = jnp.asarray([0.2, 0.9, 0.5, 0.5])  # groups of 2: the second has no variance
    adv, zero = group_advantages(rewards, 2)
    assert zero.tolist() == [False, True]

    def loss_of(lp):
        return grpo_loss(
            lp, jnp.asarray(old, jnp.float32), jnp.asarray(ref, jnp.float32), adv, jnp.asarray(mask), beta=0.0
        )[0]

    grad = np.asarray(jax.grad(loss_of)(jnp.asarray(logps, jnp.float32)))
    assert np.all(grad[2:] == 0.0) and np.any(grad[:2] != 0.0)


@pytest.mark.parametrize("kl,loss_type,level", MODES)
def test_masked_tokens_contribute_nothing(kl, loss_type, level):
    logps, old, ref, adv, mask = _inputs(seed=7)
    options = _options(kl, loss_type, level, mask)
    garbage = [np.where(mask > 0, x, fill) for x, fill in ((logps, -np.inf), (old, np.nan), (ref, 1e30))]

    def loss_and_grad(lp, o, r):
        def f(x):
            others = [jnp.asarray(v, jnp.float32) for v in (o, r, adv, mask)]
            return grpo_loss(x, *others, **options)[0]

        return jax.value_and_grad(f)(jnp.asarray(lp, jnp.float32))

    clean_value, clean_grad = loss_and_grad(
        np.where(mask > 0, logps, 0.0), np.where(mask > 0, old, 0.0), np.where(mask > 0, ref, 0.0)
    )
    value, grad = loss_and_grad(*garbage)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert float(value) == float(clean_value)
    np.testing.assert_array_equal(grad, clean_grad)
    assert np.all(np.asarray(grad)[mask == 0] == 0.0)


def test_dapo_micro_batches_sum_to_the_token_mean_of_the_batch():
    logps, old, ref, adv, mask = [jnp.asarray(x, jnp.float32) for x in _inputs(seed=9, b=6)]
    total = float(mask.sum())
    kwargs = dict(loss_type="dapo", num_items_in_batch=total)
    halves = sum(
        float(grpo_loss(*(x[s] for x in (logps, old, ref, adv, mask)), **kwargs)[0]) for s in (slice(0, 3), slice(3, 6))
    )
    whole, _ = grpo_loss(logps, old, ref, adv, mask, loss_type="bnpo")
    np.testing.assert_allclose(halves, whole, rtol=1e-5)


def test_k3_exponent_is_clamped():
    logps = jnp.asarray([[-1.0, -200.0]], jnp.float32)
    ref = jnp.asarray([[-1.0, -0.0]], jnp.float32)  # ref - logp = 200: exp overflows float32 unclamped
    loss, metrics = grpo_loss(logps, logps, ref, jnp.asarray([0.5]), jnp.ones((1, 2)))
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(metrics["kl"], (np.exp(20.0) - 20.0 - 1.0) / 2, rtol=1e-5)


def test_bad_arguments():
    x = jnp.zeros((2, 3))
    a = jnp.zeros(2)
    for kwargs in (
        dict(kl="k4"),
        dict(loss_type="ppo"),
        dict(importance_sampling="segment"),
        dict(loss_type="dr_grpo"),  # needs max_completion_length
        dict(loss_type="dapo"),  # needs num_items_in_batch
    ):
        with pytest.raises(ValueError):
            grpo_loss(x, x, x, a, x, **kwargs)
    with pytest.raises(ValueError):
        grpo_loss(x, x, x, jnp.zeros(3), x)
    with pytest.raises(ValueError):
        grpo_loss(x, x[:, :2], x, a, x)
