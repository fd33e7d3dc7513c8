"""Frame-size rules for video LLM inputs: Qwen2-VL's "smart resize" pixel budget.

Qwen2-VL / Qwen2.5-VL cut frames into 14 px patches and merge 2x2 of them, so both
sides must be multiples of 28 (``factor``), and the number of pixels per frame is kept
inside ``[min_pixels, max_pixels]`` while preserving the aspect ratio as well as the
rounding allows. This is a re-implementation of the rule in the Qwen2-VL image
processor (``smart_resize``), including its use of Python's ``round`` (half to even)
so that grids match the reference processor exactly.
"""

import math

# The reference processor refuses extreme aspect ratios; keep the same limit so a frame
# size accepted here is accepted there.
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Returns ``(height, width)``, multiples of ``factor``, with area in the budget."""
    if height <= 0 or width <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio must be below {MAX_ASPECT_RATIO}, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_max_pixels(
    num_frames: int,
    total_pixels: int,
    *,
    min_pixels: int,
    max_pixels: int,
    frames_per_group: int = 2,
) -> int:
    """Per-frame pixel cap from a whole-video budget, as Qwen2.5-VL's video reader does.

    The budget is shared by temporal groups of ``frames_per_group`` frames (Qwen2.5-VL
    merges frame pairs), and never goes below ~``min_pixels`` so tiny videos stay legible.
    """
    per_frame = total_pixels / max(num_frames, 1) * frames_per_group
    return int(max(min(max_pixels, per_frame), min_pixels * 1.05))
