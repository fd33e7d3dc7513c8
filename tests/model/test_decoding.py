"""Prefill + cached one-token decoding equals the full forward pass."""

import numpy as np
import pytest
from flax import nnx

import jaxgrounding.model as jm
from tests.model import hf_reference as ref


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("q25"))
    ref.build_reference("qwen2_5_vl", path)
    return jm.from_pretrained(path)


@pytest.mark.parametrize(
    "samples",
    [
        [[("text", 9)], [("text", 5)]],
        [[("text", 2), ("video", (2, 4, 8), 1.5), ("text", 3)], [("text", 3), ("image", (1, 4, 4)), ("text", 1)]],
    ],
)
def test_cached_decoding_equals_full_forward(model, samples):
    rng = np.random.default_rng(0)
    prompt = ref.make_batch(samples, rng=rng, patch_dim=model.config.vision.patch_dim)
    continuation = rng.integers(3, 280, size=(prompt["input_ids"].shape[0], 4))
    # Full forward over prompt + continuation.
    full = {k: v for k, v in ref.ours_inputs(prompt).items()}
    full["input_ids"] = np.concatenate([prompt["input_ids"], continuation], 1)
    full["attention_mask"] = np.concatenate([prompt["attention_mask"], np.ones_like(continuation)], 1)
    want = np.asarray(model(**full).logits)

    graphdef, state = nnx.split(model)
    inputs = jm.prepare_inputs(model.config, **ref.ours_inputs(prompt))
    cache = jm.KVCache.zeros(model.config, batch=continuation.shape[0], max_length=32)
    full_out = model(**full, hidden_layers=(-2,))
    logits, cache, hidden = jm.prefill(graphdef, state, inputs, cache, (-2,))
    t = prompt["input_ids"].shape[1]
    np.testing.assert_allclose(np.asarray(logits), want[:, t - 1], atol=1e-4)
    valid = prompt["attention_mask"].astype(bool)
    full_hidden = np.asarray(full_out.hidden_states[-2])
    np.testing.assert_allclose(np.asarray(hidden[-2])[valid], full_hidden[:, :t][valid], atol=1e-4)
    for step in range(continuation.shape[1]):
        logits, cache, hidden = jm.decode_step(graphdef, state, continuation[:, step], cache, (-2,))
        np.testing.assert_allclose(np.asarray(logits), want[:, t + step], atol=1e-4)
        np.testing.assert_allclose(np.asarray(hidden[-2]), full_hidden[:, t + step], atol=1e-4)
    assert int(cache.length) == t + continuation.shape[1]


def test_decode_step_compiles_once(model):
    graphdef, state = nnx.split(model)
    batch = ref.make_batch([[("text", 4)]], rng=np.random.default_rng(1), patch_dim=model.config.vision.patch_dim)
    cache = jm.KVCache.zeros(model.config, batch=1, max_length=16)
    _, cache, _ = jm.prefill(graphdef, state, jm.prepare_inputs(model.config, **ref.ours_inputs(batch)), cache)
    before = jm.decode_step._cache_size()
    for token in (5, 6, 7):
        _, cache, _ = jm.decode_step(graphdef, state, np.array([token]), cache)
    assert jm.decode_step._cache_size() - before <= 1
