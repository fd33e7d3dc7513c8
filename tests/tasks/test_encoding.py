"""Frame time texts in the prompt (`encoder.frame_time_text`): each temporal grid its own vision block after
"<t seconds>", positions as transformers' Qwen3-VL computes them for that layout, and streaming refuses it."""

import functools
import types

import numpy as np
import pytest

from jaxgrounding.data.video import Video
from jaxgrounding.model.tiny import build_tiny_checkpoint
from jaxgrounding.tasks.encoding import ChatEncoder, EncoderConfig, StructuralEncoder, frame_time_text

FRAMES = 6  # three temporal grids of two frames, 0.5 s apart


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    texts = ["Find the door.", "a person opens the door"] + [frame_time_text(t) for t in np.arange(0, 4, 0.1)]
    return build_tiny_checkpoint(
        str(tmp_path_factory.mktemp("tiny")), texts, hidden=32, layers=1, vision_depth=1, vision_hidden=16
    )


def _video():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(FRAMES, 56, 56, 3), dtype=np.uint8)
    return Video(frames=frames, timestamps=np.arange(FRAMES) * 0.5, duration=3.0, fps=2.0, backend="pyav")


def _encoder(checkpoint, time_text: bool):
    config = EncoderConfig(
        task="grounding", frame_size=(56, 56), max_tokens=4096, random_instruction=False, seed=0,
        frame_time_text=time_text,
    )
    return ChatEncoder(checkpoint, config)


def test_each_grid_follows_its_start_time(checkpoint):
    encoder = _encoder(checkpoint, time_text=True)
    out = encoder.prompt("Find the door.", _video())
    text = encoder.tokenizer.tokenizer.decode(out["input_ids"])
    tokens_per_grid = (56 // 14) ** 2 // 4
    grid = "<|vision_start|>" + "<|video_pad|>" * tokens_per_grid + "<|vision_end|>"
    assert "<0.0 seconds>" + grid + "<1.0 seconds>" + grid + "<2.0 seconds>" + grid in text
    assert text.count("<|vision_start|>") == 3
    np.testing.assert_allclose(out["grid_times"], [0.0, 1.0, 2.0])
    frames = out["frame_of_token"][out["frame_of_token"] >= 0]
    np.testing.assert_array_equal(frames, np.repeat([0, 1, 2], tokens_per_grid))


def test_without_time_texts_the_video_is_one_block(checkpoint):
    encoder = _encoder(checkpoint, time_text=False)
    text = encoder.tokenizer.tokenizer.decode(encoder.prompt("Find the door.", _video())["input_ids"])
    assert "seconds>" not in text and text.count("<|vision_start|>") == 1


def test_positions_equal_transformers_qwen3_vl(checkpoint):
    """Our per-grid M-RoPE positions against transformers' Qwen3-VL get_rope_index, the model family trained on
    this layout (its code splits a video's grid into [1, h, w] rows, one per time text)."""
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    encoder = _encoder(checkpoint, time_text=True)
    out = encoder.prompt("Find the door.", _video())
    config = encoder.model_config
    ids = torch.from_numpy(out["input_ids"][None].astype(np.int64))
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2))
    )
    fake.get_vision_position_ids = functools.partial(Qwen3VLModel.get_vision_position_ids, fake)
    patches = 56 // config.vision.patch_size
    want, _ = Qwen3VLModel.get_rope_index(
        fake,
        ids,
        mm_token_type_ids=(ids == config.video_token_id).int() * 2,
        video_grid_thw=torch.tensor([[FRAMES // 2, patches, patches]]),
    )
    np.testing.assert_array_equal(out["positions"].T, want[:, 0].numpy())


def test_streaming_refuses_time_texts(checkpoint):
    config = EncoderConfig(
        task="grounding", frame_size=(56, 56), max_tokens=4096, random_instruction=False, seed=0, frame_time_text=True
    )
    with pytest.raises(ValueError, match="frame_time_text"):
        StructuralEncoder(checkpoint, config).video_prefix()
