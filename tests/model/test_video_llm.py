"""Parity of the whole VideoLLM with transformers' PyTorch Qwen2-VL / Qwen2.5-VL (float32, <= 1e-4)."""

import jax
import numpy as np
import pytest

import jaxgrounding.model as jm
from jaxgrounding.model.positions import rope_positions
from tests.model import hf_reference as ref

TOL = 1e-4
KINDS = ("qwen2_vl", "qwen2_5_vl")

BATCHES = {
    # left padding everywhere: the second sample is shorter
    "text": [[("text", 11)], [("text", 6)]],
    "image": [[("text", 3), ("image", (1, 8, 8)), ("text", 4)], [("text", 2), ("image", (1, 6, 10)), ("text", 2)]],
    "video": [
        [("text", 3), ("video", (4, 6, 8), 1.0), ("text", 3)],
        [("text", 2), ("video", (2, 4, 4), 0.5), ("text", 5)],
    ],
    # longer than one attention block (128): exercises the block-causal path
    "long": [[("text", 150), ("video", (2, 4, 8), 1.0), ("text", 120)], [("text", 231)]],
    "mixed": [
        [("text", 2), ("image", (1, 4, 6)), ("text", 2), ("video", (2, 6, 6), 2.0), ("text", 3)],
        [("text", 4), ("video", (2, 4, 8), 1.0), ("text", 2)],
    ],
}


@pytest.fixture(scope="module", params=KINDS)
def pair(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(request.param))
    torch_model = ref.build_reference(request.param, path)
    return request.param, torch_model, jm.from_pretrained(path), path


def _patch_dim(model):
    return model.config.vision.patch_dim


@pytest.mark.parametrize("batch_name", list(BATCHES))
def test_logits_match_transformers(pair, batch_name):
    kind, torch_model, model, _ = pair
    batch = ref.make_batch(BATCHES[batch_name], rng=np.random.default_rng(1), patch_dim=_patch_dim(model))
    inputs = ref.ours_inputs(batch)
    positions, _ = rope_positions(
        batch["input_ids"],
        model.config,
        batch["attention_mask"],
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        batch.get("second_per_grid_ts"),
    )
    out = model(**inputs, hidden_layers=(0, -2, -1))
    # Positions are checked against transformers' get_rope_index separately (test_positions.py);
    # here both models get the same ones, so only the network is compared.
    want_logits, want_hidden = ref.torch_forward(torch_model, batch, positions)
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(out.logits) - want_logits)[valid].max() <= TOL
    assert np.abs(np.asarray(out.hidden_states[0]) - want_hidden[0])[valid].max() <= TOL
    assert np.abs(np.asarray(out.hidden_states[-2]) - want_hidden[-2])[valid].max() <= TOL
    # transformers' last hidden state is after the final norm; ours is the residual stream.
    normed = np.asarray(model.decoder.norm(out.hidden_states[-1]))
    assert np.abs(normed - want_hidden[-1])[valid].max() <= TOL


def test_positions_default_to_transformers_when_rules_agree(pair):
    """With images and short videos, our positions are transformers' own (its get_rope_index)."""
    kind, torch_model, model, _ = pair
    import torch

    samples = [
        [("text", 2), ("image", (1, 4, 6)), ("text", 2), ("video", (2, 6, 6), 0.5), ("text", 3)],
        [("text", 4), ("video", (2, 4, 8), 1.0), ("text", 2)],
    ]
    batch = ref.make_batch(samples, rng=np.random.default_rng(2), patch_dim=_patch_dim(model))
    t = {
        k: torch.from_numpy(np.asarray(v))
        for k, v in batch.items()
        if k != "pixel_values" and k != "pixel_values_videos"
    }
    if kind == "qwen2_vl":
        t.pop("second_per_grid_ts")
    want, _ = torch_model.model.get_rope_index(**t)
    got, _ = rope_positions(
        batch["input_ids"],
        model.config,
        batch["attention_mask"],
        batch["image_grid_thw"],
        batch["video_grid_thw"],
        batch.get("second_per_grid_ts"),
    )
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(got[:, valid], want.numpy()[:, valid])


def test_positions_of_long_video_follow_the_release_rule(pair):
    """Hand-computed: text after a video resumes one past the largest position (Qwen2.5-VL as
    released and trained; transformers >= 5.3 restarts at start + max(h, w) instead)."""
    kind, _, model, _ = pair
    m = 2
    ids = np.array([[5, 6] + [ref.VIDEO] * (3 * 2 * 2) + [7]])
    grid = np.array([[3, 2 * m, 2 * m]])
    pos, next_pos = rope_positions(ids, model.config, video_grid_thw=grid, second_per_grid_ts=np.array([1.5]))
    interval = 2 * 1.5 if kind == "qwen2_5_vl" else 1  # tokens_per_second = 2 in the tiny config
    t = (np.arange(3) * interval).astype(int)
    want_t = np.concatenate([[0, 1], np.repeat(t + 2, 4), [2 + t.max() + 1]])
    want_h = np.concatenate([[0, 1], np.tile([2, 2, 3, 3], 3), [2 + t.max() + 1]])
    want_w = np.concatenate([[0, 1], np.tile([2, 3, 2, 3], 3), [2 + t.max() + 1]])
    np.testing.assert_array_equal(pos[:, 0], np.stack([want_t, want_h, want_w]))
    assert next_pos[0] == want_t[-1] + 1


def test_visual_embeddings_match_transformers(pair):
    kind, torch_model, model, _ = pair
    import torch
    from jaxgrounding.model.vision import vision_plan

    grid = np.array([[2, 6, 10], [1, 8, 4]])
    pixels = np.random.default_rng(3).standard_normal((int(grid.prod(1).sum()), _patch_dim(model)), np.float32)
    with torch.no_grad():
        want = torch_model.model.visual(torch.from_numpy(pixels), grid_thw=torch.from_numpy(grid)).pooler_output
    got = model.visual(pixels, vision_plan(grid, model.config.vision).as_arrays())
    assert np.abs(np.asarray(got) - want.numpy()).max() <= TOL


def test_mismatched_placeholders_raise(pair):
    _, _, model, _ = pair
    batch = ref.ours_inputs(ref.make_batch(BATCHES["image"], rng=np.random.default_rng(4), patch_dim=_patch_dim(model)))
    batch["image_grid_thw"] = batch["image_grid_thw"].copy()
    batch["image_grid_thw"][0] = (1, 8, 10)
    batch["pixel_values"] = np.zeros((80 + 60, _patch_dim(model)), np.float32)
    with pytest.raises(ValueError, match="do not match|placeholder"):
        model(**batch)


def test_tied_embeddings(tmp_path):
    torch_model = ref.build_reference("qwen2_5_vl", str(tmp_path), tie=True)
    model = jm.from_pretrained(str(tmp_path))
    assert model.decoder.lm_head is None
    batch = ref.make_batch(BATCHES["image"], rng=np.random.default_rng(5), patch_dim=_patch_dim(model))
    positions, _ = rope_positions(batch["input_ids"], model.config, batch["attention_mask"], batch["image_grid_thw"])
    want, _ = ref.torch_forward(torch_model, batch, positions)
    got = model(**ref.ours_inputs(batch)).logits
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(got) - want)[valid].max() <= TOL


def test_unseen_shapes_load_and_match(tmp_path):
    """A tiny Qwen2.5-VL with shapes no other test uses (3 layers, 6 heads, MQA, head_dim 8,
    window covering 3 merge blocks, two full-attention blocks) loads and matches."""
    text = ref.text_config(layers=3, hidden=48, heads=6, kv_heads=1, mrope=(2, 1, 1))
    vision = dict(
        depth=4,
        hidden_size=24,
        intermediate_size=40,
        num_heads=3,
        out_hidden_size=48,
        patch_size=14,
        window_size=84,
        fullatt_block_indexes=[0, 3],
        tokens_per_second=3,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    torch_model = ref.build_reference("qwen2_5_vl", str(tmp_path), text=text, vision=vision, seed=7)
    model = jm.from_pretrained(str(tmp_path))
    samples = [[("text", 2), ("video", (3, 10, 14), 0.5), ("image", (1, 6, 6)), ("text", 2)], [("text", 9)]]
    batch = ref.make_batch(samples, rng=np.random.default_rng(6), patch_dim=model.config.vision.patch_dim)
    positions, _ = rope_positions(
        batch["input_ids"],
        model.config,
        batch["attention_mask"],
        batch["image_grid_thw"],
        batch["video_grid_thw"],
        batch["second_per_grid_ts"],
    )
    want, _ = ref.torch_forward(torch_model, batch, positions)
    got = model(**ref.ours_inputs(batch)).logits
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(got) - want)[valid].max() <= TOL


def test_bfloat16_params_run_close_to_float32(pair):
    _, _, model32, path = pair
    import jax.numpy as jnp

    model16 = jm.from_pretrained(path, dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    batch = ref.ours_inputs(
        ref.make_batch(BATCHES["video"], rng=np.random.default_rng(8), patch_dim=_patch_dim(model32))
    )
    a = np.asarray(model32(**batch).logits)
    b = np.asarray(model16(**batch).logits, np.float32)
    assert jax.tree.leaves(model16)[0].dtype == jnp.bfloat16
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(a - b)[valid].max() < 0.1 * np.abs(a).max()
