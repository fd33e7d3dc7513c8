"""Attention pointers: the last layer's attention as transformers computes it, and the loss on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxgrounding.model as jm
from jaxgrounding.model.positions import rope_positions
from jaxgrounding.objectives import pointer
from tests.model import hf_reference as ref


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pointer"))
    torch_model = ref.build_reference("qwen2_5_vl", path)
    torch_model.set_attn_implementation("eager")  # the one that returns attention weights
    return torch_model, jm.from_pretrained(path)


def test_attention_logprobs_equal_transformers_attention_weights(pair):
    torch_model, model = pair
    segments = [
        [("text", 3), ("video", (4, 6, 8), 1.0), ("text", 5)],
        [("text", 2), ("video", (2, 4, 4), 0.5), ("text", 4)],  # left padded
    ]
    batch = ref.make_batch(segments, rng=np.random.default_rng(0), patch_dim=model.config.vision.patch_dim)
    positions, _ = rope_positions(
        batch["input_ids"], model.config, batch["attention_mask"], None, batch["video_grid_thw"], batch["second_per_grid_ts"]
    )
    out = model(**ref.ours_inputs(batch), hidden_layers=(-2,))
    t = batch["input_ids"].shape[1]
    queries = np.array([[t - 1, t - 3, 10], [t - 1, t - 2, t - 4]])
    mask = jnp.asarray(batch["attention_mask"].astype(bool))
    got = np.exp(
        np.asarray(pointer.last_layer_attention_logprobs(model, out.hidden_states[-2], jnp.asarray(positions), mask, queries))
    )
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    kwargs["position_ids"] = torch.from_numpy(np.asarray(positions, np.int64))
    with torch.no_grad():
        weights = torch_model(**kwargs, output_attentions=True).attentions[-1].float().numpy()  # [B, H, T, T]
    want = np.stack([weights[b][:, queries[b]].transpose(1, 0, 2) for b in range(2)])  # [B, K, H, T]
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5)
    # Causal: nothing after the query; padding keys get nothing.
    assert got[0, 2, :, 11:].max() == 0.0
    assert got[1][..., batch["attention_mask"][1] == 0].max() == 0.0


def _reference_loss(logprobs, targets, valid):
    """-mean over valid pointers (with a target) and heads of log sum_{target keys} p."""
    total, count = 0.0, 0
    b_, k_, h_, _ = logprobs.shape
    for b in range(b_):
        for k in range(k_):
            if not valid[b, k] or not targets[b, k].any():
                continue
            for h in range(h_):
                total -= np.log(np.exp(logprobs[b, k, h][targets[b, k]]).sum())
                count += 1
    return total / max(count, 1)


def test_pointer_loss_equals_its_formula_and_has_finite_gradients():
    rng = np.random.default_rng(3)
    logprobs = np.asarray(jax.nn.log_softmax(jnp.asarray(rng.standard_normal((2, 3, 4, 7))), axis=-1))
    targets = rng.random((2, 3, 7)) < 0.3
    targets[1, 2] = False  # a pointer with nothing to point at
    valid = np.array([[True, True, False], [True, False, True]])
    got = pointer.pointer_loss(jnp.asarray(logprobs), jnp.asarray(targets), jnp.asarray(valid))
    assert float(got) == pytest.approx(_reference_loss(logprobs, targets, valid), rel=1e-5)
    grad = jax.grad(lambda x: pointer.pointer_loss(x, jnp.asarray(targets), jnp.asarray(valid)))(jnp.asarray(logprobs))
    assert np.isfinite(np.asarray(grad)).all()
    # All mass on the targets: zero loss.
    sure = np.where(targets[:, :, None, :], 0.0, -1e30) - np.log(np.maximum(targets.sum(-1), 1))[:, :, None, None]
    assert float(pointer.pointer_loss(jnp.asarray(sure), jnp.asarray(targets), jnp.asarray(valid))) == pytest.approx(0.0, abs=1e-6)


def test_grid_targets_cover_the_grids_of_each_range():
    frame_of_token = jnp.asarray([[-1, 0, 0, 1, 1, -1, 2, 2, -1]])
    ranges = jnp.asarray([[[1, 1], [0, 2]]])
    got = np.asarray(pointer.grid_targets(frame_of_token, ranges))
    assert got[0, 0].tolist() == [False, False, False, True, True, False, False, False, False]
    assert got[0, 1].tolist() == [False, True, True, True, True, False, True, True, False]
