"""Which parameters train under each setting, and masking of embedding rows."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgrounding.model as jm
from jaxgrounding.model.lora import apply_lora
from jaxgrounding.training import optim
from jaxgrounding.grounding_model import GroundingModel
from tests.model import hf_reference as ref


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("q25"))
    ref.build_reference("qwen2_5_vl", path)
    return path


def _names(model, config):
    state = nnx.state(model, optim.trainable_filter(config))
    return {".".join(map(str, k)) for k, _ in nnx.to_flat_state(state)}


def test_trainable_groups(checkpoint):
    model = GroundingModel(jm.from_pretrained(checkpoint), rngs=nnx.Rngs(0))
    full = _names(model, optim.TrainableConfig(llm="full", vision=False, embeddings="new_tokens"))
    assert "llm.decoder.layers.mlp.up_proj.kernel" in full and "heads.logit_scale" in full
    assert "llm.visual.merger.fc1.kernel" in full and "llm.visual.blocks.attn.qkv.kernel" not in full
    assert "llm.visual.blocks.attn.qkv.kernel" in _names(
        model, optim.TrainableConfig(vision=True, llm="full", embeddings="new_tokens")
    )

    apply_lora(model.llm, rank=2, alpha=4.0)
    lora = _names(model, optim.TrainableConfig(llm="lora", vision=False, embeddings="new_tokens"))
    assert "llm.decoder.layers.self_attn.q_proj.lora_a" in lora
    assert "llm.decoder.layers.self_attn.q_proj.kernel" not in lora
    assert "llm.decoder.embed_tokens" in lora  # only its new rows will move (mask_token_rows)
    assert "llm.decoder.layers.self_attn.q_proj.lora_a" not in _names(
        model, optim.TrainableConfig(llm="full", vision=False, embeddings="new_tokens")
    )
    with pytest.raises(ValueError, match="llm mode"):
        optim.trainable_filter(optim.TrainableConfig(llm="half", vision=False, embeddings="new_tokens"))


def test_mask_token_rows_keeps_only_new_rows(checkpoint):
    model = GroundingModel(jm.from_pretrained(checkpoint), rngs=nnx.Rngs(0))
    grads = nnx.state(
        model, optim.trainable_filter(optim.TrainableConfig(llm="full", vision=False, embeddings="new_tokens"))
    )
    grads = nnx.from_flat_state([(k, v.replace(jnp.ones_like(v.get_value()))) for k, v in nnx.to_flat_state(grads)])
    masked = dict(nnx.to_flat_state(optim.mask_token_rows(grads, [3, 7], True)))
    embed = np.asarray(masked[("llm", "decoder", "embed_tokens")].get_value())
    head = np.asarray(masked[("llm", "decoder", "lm_head", "kernel")].get_value())
    assert embed[[3, 7]].all() and embed.sum() == 2 * embed.shape[1]
    assert head[:, [3, 7]].all() and head.sum() == 2 * head.shape[0]
    other = np.asarray(masked[("llm", "decoder", "norm", "weight")].get_value())
    assert other.all()  # other parameters untouched


def test_optimizer_groups_lora_at_its_own_rate(checkpoint):
    model = GroundingModel(jm.from_pretrained(checkpoint), rngs=nnx.Rngs(0))
    apply_lora(model.llm, rank=2, alpha=4.0)
    params = nnx.state(
        model, optim.trainable_filter(optim.TrainableConfig(llm="lora", vision=False, embeddings="new_tokens"))
    )
    config = optim.OptimizerConfig(
        learning_rate=1e-3,
        lora_learning_rate=1e-1,
        total_steps=10,
        warmup_fraction=0.0,
        weight_decay=0.0,
        grad_clip=1.0,
    )
    tx = optim.make_optimizer(config, params)
    grads = nnx.from_flat_state([(k, v.replace(jnp.ones_like(v.get_value()))) for k, v in nnx.to_flat_state(params)])
    # the schedule warms up from 0 at step 0; compare the second step's updates
    _, state = tx.update(grads, tx.init(params), params)
    updates, _ = tx.update(grads, state, params)
    flat = {".".join(map(str, k)): np.abs(np.asarray(v.get_value())).max() for k, v in nnx.to_flat_state(updates)}
    lora = flat["llm.decoder.layers.self_attn.q_proj.lora_b"]
    base = flat["heads.logit_scale"]
    assert lora / base == pytest.approx(100.0, rel=1e-3)
