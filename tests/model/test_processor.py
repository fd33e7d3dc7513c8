"""Our numpy patchifier against transformers' Qwen2-VL image processor, and video layout checks."""

import numpy as np
import pytest
from transformers import Qwen2VLImageProcessorPil

from jaxgrounding.model.processor import VisualProcessor


@pytest.mark.parametrize("shape", [(56, 84), (100, 150), (37, 300), (448, 448)])
def test_image_matches_transformers(shape):
    image = np.random.default_rng(0).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    hf = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 64)
    want = hf(images=[image], return_tensors="np")
    ours = VisualProcessor(max_pixels=28 * 28 * 64).image(image)
    np.testing.assert_array_equal(ours.grid_thw, want["image_grid_thw"][0])
    np.testing.assert_allclose(ours.pixel_values, want["pixel_values"], atol=1e-5)


def test_video_layout_and_odd_frame_count():
    """Frame f of the output lands in temporal grid f // 2, slot f % 2 of each patch; an odd
    count repeats the last frame."""
    t, h, w = 5, 56, 84
    frames = np.zeros((t, h, w, 3), np.uint8)
    for f in range(t):
        frames[f] = 40 * f  # each frame a constant colour
    proc = VisualProcessor()
    out = proc.video(frames, fps=2.0)
    assert out.grid_thw.tolist() == [3, 4, 6]
    assert out.second_per_grid == pytest.approx(1.0)
    assert out.num_tokens == 3 * 4 * 6 // 4
    patches = out.pixel_values.reshape(3, 4 * 6, 3, 2, 14 * 14)
    mean, std = np.array(proc.image_mean), np.array(proc.image_std)
    for f in range(6):
        source = min(f, t - 1)
        want = (40 * source / 255 - mean) / std
        np.testing.assert_allclose(patches[f // 2, :, :, f % 2].mean(axis=(0, 2)), want, atol=1e-5)


def test_video_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        VisualProcessor().video(np.zeros((4, 56, 56), np.uint8), fps=1)
