"""LoRA adapters: zero-initialised (no change), trainable by type filter, and merged exactly."""

import jax
import numpy as np
from flax import nnx

import jaxgrounding.model as jm
from jaxgrounding.model.lora import apply_lora, merge_lora
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
