"""Tiny Qwen2-VL / Qwen2.5-VL checkpoints built and saved by transformers itself, and batches in
the HF processor layout, for parity tests against the PyTorch implementation."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

IMAGE, VIDEO, START, END = 290, 291, 292, 293
VOCAB = 300
TOKENS = dict(
    image_token_id=IMAGE,
    video_token_id=VIDEO,
    vision_start_token_id=START,
    vision_end_token_id=END,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def text_config(layers=2, hidden=64, heads=4, kv_heads=2, mrope=(2, 3, 3), tie=False):
    return dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "mrope_section": list(mrope), "rope_theta": 10000.0},
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def build_reference(
    kind: str, path: str, *, seed: int = 0, text: dict | None = None, vision: dict | None = None, tie: bool = False
):
    """Builds a random tiny model with transformers, saves it to `path`, returns the torch model."""
    torch.manual_seed(seed)
    text = text or text_config(tie=tie)
    if kind == "qwen2_5_vl":
        vision = vision or dict(
            depth=3,
            hidden_size=32,
            intermediate_size=48,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **TOKENS)
        model = Qwen2_5_VLForConditionalGeneration(config)
    elif kind == "qwen2_vl":
        vision = vision or dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **TOKENS)
        model = Qwen2VLForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    # Random init leaves norms at 1 and biases at 0; perturb them so the parity test sees them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model.eval()


def make_batch(samples, *, rng: np.random.Generator, patch_dim: int, merge: int = 2, pad_to: int | None = None):
    """samples: list of lists of segments ("text", n) | ("image", (t, h, w)) | ("video", (t, h, w), seconds).

    Returns HF-style numpy inputs (left padded) plus `mm_token_type_ids`.
    """
    rows, images, videos, seconds = [], [], [], []
    for segments in samples:
        ids = []
        for seg in segments:
            if seg[0] == "text":
                ids += list(rng.integers(3, 280, size=seg[1]))
            else:
                t, h, w = seg[1]
                token = IMAGE if seg[0] == "image" else VIDEO
                ids += [START] + [token] * (t * h * w // merge**2) + [END]
                (images if seg[0] == "image" else videos).append(seg[1])
                if seg[0] == "video":
                    seconds.append(seg[2])
        rows.append(ids)
    length = pad_to or max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r) :] = r
        mask[b, length - len(r) :] = 1
    batch = dict(input_ids=input_ids, attention_mask=mask)
    if images:
        grid = np.array(images, np.int64)
        batch["image_grid_thw"] = grid
        batch["pixel_values"] = rng.standard_normal((int(grid.prod(1).sum()), patch_dim)).astype(np.float32)
    if videos:
        grid = np.array(videos, np.int64)
        batch["video_grid_thw"] = grid
        batch["pixel_values_videos"] = rng.standard_normal((int(grid.prod(1).sum()), patch_dim)).astype(np.float32)
        batch["second_per_grid_ts"] = np.array(seconds, np.float32)
    batch["mm_token_type_ids"] = np.where(input_ids == IMAGE, 1, np.where(input_ids == VIDEO, 2, 0))
    return batch


def torch_forward(model, batch, position_ids: np.ndarray | None = None):
    """Runs the reference; returns (logits, hidden_states) as numpy."""
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    if position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(position_ids, np.int64))
    if "second_per_grid_ts" in kwargs and isinstance(model, Qwen2VLForConditionalGeneration):
        kwargs.pop("second_per_grid_ts")
    with torch.no_grad():
        out = model(**kwargs, output_hidden_states=True)
    return out.logits.float().numpy(), [h.float().numpy() for h in out.hidden_states]


def ours_inputs(batch):
    """The batch without the torch-only `mm_token_type_ids`."""
    return {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
