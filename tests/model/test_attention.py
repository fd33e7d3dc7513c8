"""Attention: every implementation that runs on CPU against a numpy transcription of the masks (values and
gradients), the choice by setting and backend, and the accelerator kernels cross-lowered at Qwen2.5-VL-7B shapes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgrounding.model import attention

CPU_IMPLS = ("blocked", "xla", "splash_interpret")


def numpy_attention(q, k, v, key_valid, offset):
    """float64 softmax(q k^T / sqrt(d)) v over the visible keys: valid, and with `offset` slot <= offset + t."""
    b, t, h, d = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = h // kh
    out = np.zeros_like(q, dtype=np.float64)
    for bi in range(b):
        for hi in range(h):
            logits = q[bi, :, hi].astype(np.float64) @ k[bi, :, hi // g].T.astype(np.float64) / math.sqrt(d)
            mask = np.broadcast_to(key_valid[bi][None], (t, s)).copy()
            if offset is not None:
                mask &= np.arange(s)[None] <= (offset + np.arange(t))[:, None]
            logits = np.where(mask, logits, -1e30)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[bi, :, hi] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, hi // g]
    return out


def case(t, s, seed, memory=0):
    """q [2, t, 4, 8], k/v [2, s, 2, 8]; row 1 left-padded by 7 (or, over a memory, memory slots invalid at
    random and the new tokens valid)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((2, t, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, s, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, s, 2, 8)).astype(np.float32)
    key_valid = np.ones((2, s), bool)
    if memory:
        key_valid[:, :memory] = rng.random((2, memory)) < 0.7
    else:
        key_valid[1, :7] = False
    return q, k, v, key_valid


def rows_seeing_a_key(key_valid, t, offset):
    """Queries that see at least one valid key (the others are unspecified)."""
    if offset is None:
        return np.broadcast_to(key_valid.any(1, keepdims=True), (key_valid.shape[0], t))
    return np.stack([[key_valid[r, : offset + i + 1].any() for i in range(t)] for r in range(key_valid.shape[0])])


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(
    "t,s,offset",
    [(300, 300, 0), (200, 260, 0), (150, 240, 90), (40, 64, 24), (50, 50, None)],
    ids=["prompt", "prefill", "memory", "short-memory", "full"],
)
def test_every_mask_matches_numpy(impl, t, s, offset):
    memory = offset if offset else 0
    q, k, v, key_valid = case(t, s, seed=t + s, memory=memory)
    want = numpy_attention(q, k, v, key_valid, offset)
    if offset is None:
        got = attention.full_attention(q, k, v, key_valid, impl=impl)
    else:
        got = attention.causal_attention(q, k, v, key_valid, offset=offset, impl=impl, block_size=64)
    rows = rows_seeing_a_key(key_valid, t, offset)
    np.testing.assert_allclose(np.asarray(got)[rows], want[rows], atol=2e-5)


@pytest.mark.parametrize("impl", ("xla", "splash_interpret"))
@pytest.mark.parametrize("offset", [0, 24, None], ids=["prompt", "memory", "full"])
def test_gradients_match_the_blocked_path(impl, offset):
    """d(loss)/d(q, k, v) of each implementation equals the blocked path's (which the numpy test pins)."""
    t, s = 40, 40 + (offset or 0)
    q, k, v, key_valid = case(t, s, seed=3, memory=offset or 0)
    rows = jnp.asarray(rows_seeing_a_key(key_valid, t, offset))
    weights = jnp.asarray(np.random.default_rng(4).standard_normal(q.shape), jnp.float32)

    def loss(impl, q, k, v):
        if offset is None:
            out = attention.full_attention(q, k, v, key_valid, impl=impl)
        else:
            out = attention.causal_attention(q, k, v, key_valid, offset=offset, impl=impl)
        return jnp.sum(jnp.where(rows[..., None, None], out * weights, 0.0))

    want = jax.grad(lambda *a: loss("blocked", *a), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, err_msg=name)


def test_decode_attention_at_a_traced_position_equals_the_static_mask():
    q, k, v, key_valid = case(3, 64, seed=5)
    step = jax.jit(lambda q, k, v, at: attention.decode_attention(q, k, v, key_valid, at))
    got = step(q, k, v, jnp.asarray(40))
    want = numpy_attention(q, k, v, key_valid, 40)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_a_traced_offset_is_refused_by_the_static_masks():
    q, k, v, key_valid = case(4, 4, seed=6)
    with pytest.raises(TypeError, match="decode_attention"):
        jax.jit(lambda o: attention.causal_attention(q, k, v, key_valid, offset=o, impl="blocked"))(0)


def test_the_choice_is_explicit_and_auto_follows_the_backend():
    assert [attention.resolve("auto", b) for b in ("cpu", "gpu", "tpu")] == ["blocked", "cudnn", "splash"]
    assert attention.resolve("xla", "tpu") == "xla"  # a named implementation is never overridden
    assert attention.resolve("auto", "gpu", jnp.float32) == "xla"  # cuDNN takes 16-bit inputs only
    with pytest.raises(ValueError, match="'cudnn' takes bfloat16 or float16"):
        attention.resolve("cudnn", "gpu", jnp.float32)
    with pytest.raises(ValueError, match="attention must be one of"):
        attention.resolve("flash")


def test_bfloat16_inputs_keep_float32_statistics():
    """bf16 q/k/v: every implementation stays within bf16 rounding of the float32 result and returns bf16."""
    q, k, v, key_valid = case(64, 64, seed=7)
    want = numpy_attention(q, k, v, key_valid, 0)
    rows = rows_seeing_a_key(key_valid, 64, 0)
    for impl in CPU_IMPLS:
        q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
        got = attention.causal_attention(q16, k16, v16, key_valid, offset=0, impl=impl)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32)[rows], want[rows], atol=3e-2, err_msg=impl)


# Qwen2.5-VL-7B's attention: the decoder's 28 query heads over 4 kv heads of 128 (a 2048-token prompt; a segment
# of 1024 visual tokens over a 4096-slot memory buffer), the vision tower's 16 heads of 80 (a frame of 1024 patches).
SEVEN_B = {"prompt": (2048, 2048, 0), "memory": (1024, 5120, 4096), "vision": (1024, 1024, None)}


@pytest.mark.parametrize("shape", SEVEN_B)
def test_splash_lowers_for_tpu_at_7b_shapes(monkeypatch, shape):
    """Cross-lowers the compiled splash kernel, forward and backward, on a CPU-only machine (Mosaic's block rules
    apply at lowering); it does not compile or run."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    t, s, offset = SEVEN_B[shape]
    heads, kv_heads, d = (16, 16, 80) if offset is None else (28, 4, 128)
    q = jax.ShapeDtypeStruct((1, t, heads, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, s, kv_heads, d), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((1, s), jnp.bool_)

    def loss(q, k, v, valid):
        if offset is None:
            out = attention.full_attention(q, k, v, valid, impl="auto")
        else:
            out = attention.causal_attention(q, k, v, valid, offset=offset, impl="auto")
        return jnp.sum(out.astype(jnp.float32))

    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, valid)
    text = traced.lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") >= 2  # the forward and the backward kernels


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
    """implementation="cudnn" runs XLA's attention: the cudnn path's own code (padding, mask) runs on CPU."""
    dot_product_attention = jax.nn.dot_product_attention

    def on_cpu(*args, implementation=None, **kwargs):
        return dot_product_attention(*args, implementation="xla" if implementation == "cudnn" else implementation,
                                     **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", on_cpu)


@pytest.mark.parametrize("t,s,offset", [(41, 41, 0), (40, 63, 23), (33, 33, None)], ids=["prompt", "memory", "full"])
def test_cudnn_path_pads_odd_lengths_without_changing_the_result(cudnn_on_cpu, t, s, offset):
    """cuDNN's backward with a mask takes only even lengths: the cudnn path pads queries and keys, values and
    gradients equal XLA's unpadded attention on the rows that see a key (in bf16: cuDNN takes 16-bit inputs)."""
    q, k, v, key_valid = case(t, s, seed=5, memory=offset or 0)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    rows = jnp.asarray(rows_seeing_a_key(key_valid, t, offset))
    weights = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.float32)

    def loss(impl, q, k, v):
        if offset is None:
            out = attention.full_attention(q, k, v, key_valid, impl=impl)
        else:
            out = attention.causal_attention(q, k, v, key_valid, offset=offset, impl=impl)
        return jnp.sum(jnp.where(rows[..., None, None], out * weights, 0.0)), out

    (_, want), want_grads = jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (_, got), got_grads = jax.value_and_grad(lambda *a: loss("cudnn", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert got.shape == q.shape
    seen = np.asarray(rows)
    np.testing.assert_allclose(np.asarray(got, np.float32)[seen], np.asarray(want, np.float32)[seen], atol=1e-6)
    for name, g, w in zip("qkv", got_grads, want_grads):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), atol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape", SEVEN_B | {"odd-prompt": (2047, 2047, 0)})
def test_cudnn_lowers_for_gpu_at_7b_shapes(monkeypatch, shape):
    """Cross-lowers the cuDNN path, forward and backward, for CUDA on a CPU-only machine: jax's cuDNN rules
    (head dim, GQA, mask as bias, even lengths in the backward) apply when the calls are traced. The probe of the
    installed cuDNN's version is answered with 9.10 (no cuDNN library here); nothing compiles or runs."""
    from jax._src.cudnn import fused_attention_stablehlo

    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    t, s, offset = (SEVEN_B | {"odd-prompt": (2047, 2047, 0)})[shape]
    heads, kv_heads, d = (16, 16, 80) if offset is None else (28, 4, 128)
    q = jax.ShapeDtypeStruct((1, t, heads, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((1, s, kv_heads, d), jnp.bfloat16)
    valid = jax.ShapeDtypeStruct((1, s), jnp.bool_)

    def loss(q, k, v, valid):
        if offset is None:
            out = attention.full_attention(q, k, v, valid, impl="auto")
        else:
            out = attention.causal_attention(q, k, v, valid, offset=offset, impl="auto")
        return jnp.sum(out.astype(jnp.float32))

    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, valid)
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
    assert "__cudnn$fmhaScaleBiasSoftmax" in text and "__cudnn$fmhaScaleBiasSoftmaxBackward" in text
