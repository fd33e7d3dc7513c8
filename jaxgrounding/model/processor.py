"""Frames -> `pixel_values_videos` / `video_grid_thw` in the Qwen2-VL processor layout, in numpy.

transformers' video processors need torchvision (and torch) at run time; this reimplements
their rules so the training input path is numpy only: resize with `smart_resize` (the data
layer's implementation of the same rule; sides
multiples of patch * merge, pixel count within [min_pixels, max_pixels], bicubic), rescale by
1/255, normalise with the checkpoint's mean/std, pad the frame count to a multiple of the
temporal patch size by repeating the last frame, and cut patches ordered (t, h/m, w/m, m, m)
with each patch flattened as (C, Tp, P, P). Settings come from the checkpoint's
`preprocessor_config.json` / `video_preprocessor_config.json` when present.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image

from jaxgrounding.data.resize import smart_resize

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisualInputs:
    pixel_values: np.ndarray  # [t * h * w, C * Tp * P * P] float32
    grid_thw: np.ndarray  # [3] int64 patch grid
    second_per_grid: float  # seconds spanned by one temporal grid (videos)
    num_tokens: int  # placeholder tokens it takes in the text: one per merge block


@dataclasses.dataclass(frozen=True)
class VisualProcessor:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> VisualProcessor:
        """Reads the checkpoint's video (else image) preprocessor config; defaults otherwise."""
        settings = {**_read_json(path, IMAGE_PROCESSOR_FILE), **_read_json(path, VIDEO_PROCESSOR_FILE)}
        size = settings.get("size") or {}
        kwargs = dict(
            patch_size=settings.get("patch_size", 14),
            temporal_patch_size=settings.get("temporal_patch_size", 2),
            merge_size=settings.get("merge_size", 2),
            image_mean=tuple(settings.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(settings.get("image_std", OPENAI_CLIP_STD)),
            min_pixels=settings.get("min_pixels", size.get("shortest_edge", 56 * 56)),
            max_pixels=settings.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280)),
        )
        return cls(**{**kwargs, **overrides})

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        return smart_resize(
            height,
            width,
            factor=self.patch_size * self.merge_size,
            min_pixels=self.min_pixels,
            max_pixels=self.max_pixels,
        )

    def video(self, frames: np.ndarray, fps: float) -> VisualInputs:
        """frames: [T, H, W, 3] uint8 sampled at `fps` frames per second."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
        if frames.shape[0] == 0:
            raise ValueError("no frames")
        pixels = self._normalise(self._resize(frames))  # [T, C, H, W]
        tp = self.temporal_patch_size
        if pixels.shape[0] % tp:
            pad = np.repeat(pixels[-1:], tp - pixels.shape[0] % tp, axis=0)
            pixels = np.concatenate([pixels, pad])
        return self._inputs(pixels, second_per_grid=tp / fps)

    def image(self, image: np.ndarray) -> VisualInputs:
        """image: [H, W, 3] uint8; repeated over the temporal patch like the HF processor."""
        pixels = self._normalise(self._resize(np.asarray(image)[None]))
        pixels = np.repeat(pixels, self.temporal_patch_size, axis=0)
        return self._inputs(pixels, second_per_grid=0.0)

    def _inputs(self, pixels: np.ndarray, second_per_grid: float) -> VisualInputs:
        patches, grid = self._patchify(pixels)
        return VisualInputs(patches, grid, second_per_grid, int(np.prod(grid)) // self.merge_size**2)

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        height, width = frames.shape[1:3]
        h, w = self.target_size(height, width)
        if (h, w) == (height, width):
            return frames
        return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC)) for f in frames])

    def _normalise(self, frames: np.ndarray) -> np.ndarray:
        x = frames.astype(np.float32) * np.float32(1 / 255)
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return x.transpose(0, 3, 1, 2)  # [T, C, H, W]

    def _patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        t, c, height, width = pixels.shape
        p, tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
        gt, gh, gw = t // tp, height // p, width // p
        x = pixels.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, Tp, P, P)
        return x.reshape(gt * gh * gw, c * tp * p * p), np.array([gt, gh, gw], np.int64)

    def hf_settings(self) -> dict:
        """These settings under the keys transformers' Qwen2-VL image and video processors (and vLLM through them)
        read, so that they preprocess frames as this class does."""
        return {
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_convert_rgb": True,
            "do_resize": True,
            "resample": int(Image.Resampling.BICUBIC),
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
        }


IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"
# The transformers processor of each model type: AutoProcessor finds it under this name.
_PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def write_processor_configs(checkpoint: str, path: str, model_type: str) -> None:
    """Writes the image and video processor configs of a model built from `checkpoint` into the export `path`:
    each is the checkpoint's own file where it has one, with the keys it lacks filled from the settings our
    pipeline preprocesses frames with (which `VisualProcessor.from_pretrained` read from those same files)."""
    settings = VisualProcessor.from_pretrained(checkpoint).hf_settings()
    kinds = (
        (IMAGE_PROCESSOR_FILE, {"image_processor_type": "Qwen2VLImageProcessor"}),
        (VIDEO_PROCESSOR_FILE, {"video_processor_type": "Qwen2VLVideoProcessor"}),
    )
    for name, kind in kinds:
        config = {**kind, "processor_class": _PROCESSOR_CLASS[model_type], **settings, **_read_json(checkpoint, name)}
        with open(os.path.join(path, name), "w") as f:
            json.dump(config, f, indent=2)


def _read_json(directory: str, name: str) -> dict:
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)
