"""M-RoPE position ids for a batch of token sequences with images and videos (host side, numpy).

Text tokens advance all three streams (t, h, w) together. A vision block of llm grid
(t, h, w) = (T, H/m, W/m) starting at position s gets
    t-stream: s + floor(i_t * interval), h-stream: s + i_h, w-stream: s + i_w,
with interval = tokens_per_second * second_per_grid_t for Qwen2.5-VL videos (absolute time:
one temporal grid spans `second_per_grid_t` seconds) and 1 for images and Qwen2-VL. The next
text token starts one past the largest position used so far. Padding (attention_mask == 0) is
skipped and gets position 0.

This is the rule of the released Qwen2-VL / Qwen2.5-VL code (transformers <= 5.2, vLLM), with
which the checkpoints were trained. transformers 5.3+ restarts text after a vision block at
s + max(H, W) / m instead, which differs once a video's temporal extent exceeds its spatial
extent; pass `position_ids` explicitly to reproduce that behaviour.
"""

from __future__ import annotations

import numpy as np

from jaxgrounding.model.config import ModelConfig


def rope_positions(
    input_ids: np.ndarray,
    config: ModelConfig,
    attention_mask: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns positions [3, B, T] int32 and next_position [B] int32 (first position after the
    sequence; decoding continues from there)."""
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    m = config.vision.spatial_merge_size
    images = iter(np.asarray(image_grid_thw).reshape(-1, 3)) if image_grid_thw is not None else iter(())
    videos = iter(np.asarray(video_grid_thw).reshape(-1, 3)) if video_grid_thw is not None else iter(())
    seconds = (
        iter(np.asarray(second_per_grid_ts, dtype=np.float64).reshape(-1)) if second_per_grid_ts is not None else None
    )

    positions = np.zeros((3, batch, length), dtype=np.int64)
    next_position = np.zeros((batch,), dtype=np.int64)
    for b in range(batch):
        ids = input_ids[b][mask[b]]
        out = np.zeros((3, ids.shape[0]), dtype=np.int64)
        start, i = 0, 0
        while i < ids.shape[0]:
            token = ids[i]
            if token not in (config.image_token_id, config.video_token_id):
                out[:, i] = start
                start, i = start + 1, i + 1
                continue
            is_video = token == config.video_token_id
            grid = next(videos if is_video else images, None)
            if grid is None:
                kind = "video" if is_video else "image"
                raise ValueError(f"sample {b}: more {kind} placeholder blocks than {kind}_grid_thw rows")
            t, h, w = (int(grid[0]), int(grid[1]) // m, int(grid[2]) // m)
            n = t * h * w
            block = ids[i : i + n]
            if block.shape[0] != n or np.any(block != token):
                raise ValueError(
                    f"sample {b}: a {'video' if is_video else 'image'} block of grid {tuple(grid)} needs {n} "
                    f"consecutive placeholder tokens, found {int(np.sum(block == token))}"
                )
            if is_video and config.vision.tokens_per_second is not None:
                per_grid = next(seconds, 1.0) if seconds is not None else 1.0
                interval = config.vision.tokens_per_second * per_grid
            else:
                interval = 1.0
            # float64 then truncation toward zero, as torch's `.long()` of the float product.
            ti = (np.arange(t, dtype=np.float64) * interval).astype(np.int64)
            tt, hh, ww = np.meshgrid(ti, np.arange(h), np.arange(w), indexing="ij")
            out[:, i : i + n] = np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + start
            start = int(out[:, i : i + n].max()) + 1
            i += n
        positions[:, b, mask[b]] = out
        next_position[b] = start
    return positions.astype(np.int32), next_position.astype(np.int32)
