"""Named model shapes: the released checkpoints' parameter counts, and the configs' preset names."""

import math

import jax
import pytest
from flax import nnx

from configs import invert4tvg, meco, timescope
from jaxgrounding.model import presets
from jaxgrounding.model.video_llm import VideoLLM


def _parameters(name: str) -> int:
    config = presets.model_config(name)
    abstract = nnx.eval_shape(lambda: VideoLLM(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract)))


@pytest.mark.parametrize(
    "name, count",
    # The safetensors totals of Qwen2.5-VL-3B-Instruct and -7B-Instruct (3B ties its LM head to the embeddings).
    [("qwen2_5_vl_3b", 3_754_622_976), ("qwen2_5_vl_7b", 8_292_166_656)],
)
def test_released_shapes_have_the_checkpoints_parameter_counts(name, count):
    assert _parameters(name) == count


def test_tiny_preset_is_the_default_configs_model():
    assert dict(meco.get_config().model.tiny) == presets.TINY_SIZES
    config = presets.model_config("tiny")
    assert (config.text.hidden_size, config.text.num_layers) == (
        presets.TINY_SIZES["hidden"],
        presets.TINY_SIZES["layers"],
    )
    assert config.vision.depth == presets.TINY_SIZES["vision_depth"]
    assert presets.tiny(hidden=64, layers=2)["text_config"]["num_hidden_layers"] == 2


def test_every_model_preset_of_the_configs_is_a_named_shape():
    for module in (meco, timescope, invert4tvg):
        assert set(module.PRESETS["model"]) <= set(presets.PRESETS), module.__name__


def test_presets_are_fresh_copies():
    presets.hf_config("qwen2_5_vl_7b")["vision_config"]["depth"] = 1
    assert presets.hf_config("qwen2_5_vl_7b")["vision_config"]["depth"] == 32
    with pytest.raises(ValueError, match="unknown model preset"):
        presets.hf_config("qwen3_vl")
