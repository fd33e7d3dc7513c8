"""Checkpoint loading errors, export round trip, and transformers reading our export."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgrounding.model as jm
from jaxgrounding.model import weights
from jaxgrounding.model.positions import rope_positions
from tests.model import hf_reference as ref


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("q25"))
    ref.build_reference("qwen2_5_vl", path)
    return path


def _params(model):
    return {".".join(map(str, k)): np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model))}


def test_export_round_trip_is_exact(checkpoint, tmp_path):
    model = jm.from_pretrained(checkpoint)
    jm.save_pretrained(model, str(tmp_path))
    again = jm.from_pretrained(str(tmp_path))
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Byte-identical tensors to what transformers wrote.
    src = weights.read_safetensors(os.path.join(checkpoint, "model.safetensors"))
    out = weights.read_safetensors(os.path.join(str(tmp_path), "model.safetensors"))
    assert sorted(src) == sorted(out)
    assert weights.open_safetensors(str(tmp_path / "model.safetensors")).metadata() == {"format": "pt"}  # transformers'
    for k in src:
        np.testing.assert_array_equal(src[k], out[k], err_msg=k)


def test_transformers_loads_our_export(checkpoint, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = jm.from_pretrained(checkpoint)
    jm.save_pretrained(model, str(tmp_path), max_shard_bytes=40_000)  # force a sharded export
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    torch_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    batch = ref.make_batch(
        [[("text", 2), ("image", (1, 4, 4)), ("text", 3)]],
        rng=np.random.default_rng(0),
        patch_dim=model.config.vision.patch_dim,
    )
    positions, _ = rope_positions(batch["input_ids"], model.config, image_grid_thw=batch["image_grid_thw"])
    want, _ = ref.torch_forward(torch_model, batch, positions)
    np.testing.assert_allclose(np.asarray(model(**ref.ours_inputs(batch)).logits), want, atol=1e-4)
    # and our loader reads the sharded export back
    again = jm.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(_params(again)["decoder.embed_tokens"], _params(model)["decoder.embed_tokens"])


def test_bfloat16_export_round_trip(checkpoint, tmp_path):
    model = jm.from_pretrained(checkpoint, dtype=jnp.bfloat16)
    jm.save_pretrained(model, str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    again = jm.from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(v, _params(again)[k], err_msg=k)


def _copy(checkpoint, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dst)
    return dst


def _rewrite(dst, edit):
    tensors = weights.read_safetensors(str(dst / "model.safetensors"))
    edit(tensors)
    weights.write_safetensors(str(dst / "model.safetensors"), tensors)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    dst = _copy(checkpoint, tmp_path)
    _rewrite(dst, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(jm.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        jm.from_pretrained(str(dst))


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    dst = _copy(checkpoint, tmp_path)
    _rewrite(dst, lambda t: t.__setitem__("model.layers.7.mlp.up_proj.weight", np.zeros((2, 2), np.float32)))
    with pytest.raises(jm.CheckpointError, match=r"model\.layers\.7\.mlp\.up_proj\.weight \(model\.safetensors\)"):
        jm.from_pretrained(str(dst))


def test_shape_mismatch_names_file_and_tensor(checkpoint, tmp_path):
    dst = _copy(checkpoint, tmp_path)
    config = json.load(open(dst / "config.json"))
    config["text_config"]["intermediate_size"] = 96
    json.dump(config, open(dst / "config.json", "w"))
    with pytest.raises(jm.CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\..*shape"):
        jm.from_pretrained(str(dst))


def test_missing_files_and_bad_configs(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        jm.from_pretrained(str(tmp_path / "nowhere"))
    dst = _copy(checkpoint, tmp_path)
    os.remove(dst / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        jm.from_pretrained(str(dst))
    config = json.load(open(dst / "config.json"))
    config["model_type"] = "llava"
    json.dump(config, open(dst / "config.json", "w"))
    with pytest.raises(jm.ConfigError, match="unsupported model_type 'llava'"):
        jm.from_pretrained(str(dst))


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_safetensors_is_reported(checkpoint, tmp_path, damage):
    dst = _copy(checkpoint, tmp_path)
    data = open(dst / "model.safetensors", "rb").read()
    # corrupt: a header length past the end of the file
    damaged = data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:]
    open(dst / "model.safetensors", "wb").write(damaged)
    with pytest.raises(weights.SafetensorsError, match=r"ckpt/model\.safetensors: .*truncated or corrupt"):
        jm.from_pretrained(str(dst))


@pytest.mark.parametrize(
    "transform, shape, index",
    [
        (weights.Transposed(1), (6, 2, 3), (slice(2, 4), slice(1, 2), slice(None))),  # rows and columns: one range
        (weights.Transposed(1), (6, 2, 3), (slice(None), slice(None), slice(1, 3))),  # output rows cut: not one
        (weights.Transposed(2), (2, 3, 4), (slice(1, 2), slice(None), slice(0, 2))),
        (weights.Reshaped(), (4, 3), (slice(1, 3), slice(None))),
        (weights.Reshaped(), (4, 3), (slice(1, 3), slice(0, 2))),  # not one range of the flat HF tensor
        (weights.Same(), (4, 3), (slice(2, 4), slice(1, 3))),
    ],
)
def test_a_block_read_equals_the_block_of_the_whole(tmp_path, transform, shape, index):
    """Sharded loading reads each device's block straight from the file (get_slice); it must be that block of the
    whole parameter, whether it is one range of the HF tensor or not."""
    ours = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    hf_shape = transform.hf_shape(shape, None)
    weights.write_safetensors(str(tmp_path / "t.safetensors"), {"t": transform.to_hf(ours, hf_shape)})
    view = weights.open_safetensors(str(tmp_path / "t.safetensors")).get_slice("t")
    np.testing.assert_array_equal(transform.read(view, index, shape), ours[index])


def test_nested_transformers5_names_are_accepted(checkpoint, tmp_path):
    dst = _copy(checkpoint, tmp_path)

    def nest(t):
        for k in list(t):
            if k.startswith("model."):
                t["model.language_model." + k[len("model.") :]] = t.pop(k)
            elif k.startswith("visual."):
                t["model." + k] = t.pop(k)

    _rewrite(dst, nest)
    a, b = _params(jm.from_pretrained(checkpoint)), _params(jm.from_pretrained(str(dst)))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_hub_style_flat_config(checkpoint, tmp_path):
    """Hub config.json files are flat with rope_scaling {type: mrope}; they parse the same."""
    config = json.load(open(os.path.join(checkpoint, "config.json")))
    flat = {**config, **config.pop("text_config")}
    flat.pop("rope_parameters")
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    flat["rope_theta"] = 10000.0
    flat["model_type"] = "qwen2_5_vl"
    a = jm.ModelConfig.from_pretrained(checkpoint)
    b = jm.ModelConfig.from_hf_dict(flat)
    assert a.text == b.text and a.vision == b.vision
