"""LoRA adapters: zero-initialised (no change), trainable by type filter, merged exactly, and switched off
(the base model from the same parameters)."""

import jax
import numpy as np
from flax import nnx

import jaxgrounding.model as jm
from jaxgrounding.model.lora import adapters_disabled, apply_lora, merge_lora
from tests.model import hf_reference as ref


def test_lora_starts_as_identity_and_merges_exactly(tmp_path):
    ref.build_reference("qwen2_5_vl", str(tmp_path))
    model = jm.from_pretrained(str(tmp_path))
    ids = np.random.default_rng(0).integers(3, 280, size=(2, 9))
    base = np.asarray(model(input_ids=ids).logits)
    apply_lora(model, rank=4, alpha=8.0)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids).logits), base, atol=1e-6)

    adapters = nnx.state(model, nnx.LoRAParam)
    names = {".".join(map(str, k)) for k, _ in nnx.to_flat_state(adapters)}
    assert len(names) == 8  # a and b for q, k, v, o
    # perturb the adapters: the model changes, and merging reproduces the adapted model
    nnx.update(model, jax.tree.map(lambda x: x + 0.05, adapters))
    adapted = np.asarray(model(input_ids=ids).logits)
    assert np.abs(adapted - base).max() > 1e-3
    merge_lora(model)
    assert not nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(np.asarray(model(input_ids=ids).logits), adapted, atol=1e-4)
    # and the merged model exports as a plain checkpoint
    jm.save_pretrained(model, str(tmp_path / "merged"))
    np.testing.assert_allclose(
        np.asarray(jm.from_pretrained(str(tmp_path / "merged"))(input_ids=ids).logits), adapted, atol=1e-4
    )


def _adapted_linears(rate):
    """A Linear and an OutLinear with random adapters (scale 2) and LoRA input dropout `rate`."""
    from jaxgrounding.model import layers

    rngs = nnx.Rngs(0)
    kw = dict(use_bias=True, param_dtype=np.float32, compute_dtype=np.float32, rngs=rngs)
    linear = layers.Linear(6, (2, 3), axes=("embed", "heads", None), **kw)
    out_linear = layers.OutLinear((2, 3), 5, axes=("heads", None, "embed"), **kw)
    rng = np.random.default_rng(1)
    for module, a_shape, b_shape in ((linear, (6, 4), (4, 2, 3)), (out_linear, (2, 3, 4), (4, 5))):
        module.lora_a = nnx.LoRAParam(rng.standard_normal(a_shape).astype(np.float32))
        module.lora_b = nnx.LoRAParam(rng.standard_normal(b_shape).astype(np.float32))
        module.lora_scale = 2.0
        module.lora_dropout = rate
    return linear, out_linear


def test_lora_dropout_drops_the_adapter_input_only_in_training():
    x = np.random.default_rng(2).standard_normal((7, 6)).astype(np.float32)
    h = np.random.default_rng(3).standard_normal((7, 2, 3)).astype(np.float32)
    for module, inputs in zip(_adapted_linears(0.5), (x, h)):
        folded = np.asarray(module(inputs))
        # No key (evaluation, generation): the adapter is folded into the kernel, no dropout.
        no_drop = _adapted_linears(0.0)[0 if inputs is x else 1]
        np.testing.assert_allclose(folded, np.asarray(no_drop(inputs, jax.random.key(0))), atol=1e-5)
        key = jax.random.key(7)
        dropped = np.asarray(module(inputs, key))
        assert np.abs(dropped - folded).max() > 1e-3
        np.testing.assert_array_equal(dropped, np.asarray(module(inputs, key)))  # same key, same mask
        # The same mask by hand: base path on x, adapter path on the kept inputs scaled by 1 / (1 - p).
        flat = inputs.reshape(inputs.shape[0], -1)
        keep = np.asarray(jax.random.bernoulli(key, 0.5, flat.shape))
        kernel = np.asarray(module.kernel[...])
        a = np.asarray(module.lora_a[...]).reshape(flat.shape[1], -1)
        b = np.asarray(module.lora_b[...]).reshape(a.shape[1], -1)
        want = flat @ kernel.reshape(flat.shape[1], -1) + 2.0 * ((keep * flat / 0.5) @ a @ b)
        want = want + np.asarray(module.bias[...]).reshape(-1)
        np.testing.assert_allclose(dropped.reshape(want.shape), want, atol=1e-4)


def test_adapters_disabled_runs_the_base_model_inside_and_outside_jit(tmp_path):
    ref.build_reference("qwen2_5_vl", str(tmp_path))
    base_model = jm.from_pretrained(str(tmp_path))
    ids = np.random.default_rng(0).integers(3, 280, size=(2, 9))
    base = np.asarray(base_model(input_ids=ids).logits)
    model = jm.from_pretrained(str(tmp_path))
    apply_lora(model, rank=4, alpha=8.0)
    nnx.update(model, jax.tree.map(lambda x: x + 0.05, nnx.state(model, nnx.LoRAParam)))  # nonzero B
    adapted = np.asarray(model(input_ids=ids).logits)
    assert np.abs(adapted - base).max() > 1e-3
    with adapters_disabled(model):
        np.testing.assert_allclose(np.asarray(model(input_ids=ids).logits), base, atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids).logits), adapted, atol=1e-6)  # switched back on

    # In one jitted function (a GRPO step: policy and reference from the same parameters).
    graphdef, state = nnx.split(model)
    inputs = jm.prepare_inputs(model.config, ids)

    @jax.jit
    def policy_and_reference(state):
        m = nnx.merge(graphdef, state)
        policy = m.forward(inputs).logits
        with adapters_disabled(m):
            reference = m.forward(inputs).logits
        return policy, reference

    policy, reference = policy_and_reference(state)
    np.testing.assert_allclose(np.asarray(policy), adapted, atol=1e-5)
    np.testing.assert_allclose(np.asarray(reference), base, atol=1e-5)
