"""The batch schema, written once: every key a pipeline example carries, its dtype, per-sample shape and meaning.

A transform (`pipeline.Transform`) returns one example; `padding.pad_and_stack` pads the axis 0 of every key
whose first axis is variable (a name in `VARIABLE_AXES`) to a bucket size, adds `{key}_mask` [B, size] bool,
stacks the examples into [B, ...] and adds `valid` [B] bool (`batch_keys`). Shapes below are per example, axes
named:

    text        tokens of the whole prompt + response                      (variable)
    patches     visual patches of the video, grids * patches_per_grid       (variable)
    grids       temporal grids ("frames" of the model: temporal_patch_size sampled frames each)  (variable)
    structural  structural tokens of the response (<ent>/<tst>)              (variable)
    windows     ground-truth windows                                        (variable)
    frames      decoded frames (GRPO builds its prompts from them)          (variable)
    segments    streamed segments of segment_frames grids each             (variable)
    segment_grids  segments * segment_frames                               (variable)
    suffix      tokens after the video: instruction and response           (variable)
    prefix      tokens before the video (system turn and <|vision_start|>): the same for every prompt
    patch_dim, segment_patches (segment_frames * patches_per_grid), segment_tokens (segment_frames * visual tokens
    per grid), height, width: fixed by the model and the frame size; integers are literal sizes.

The tables: `PROMPT` (what inference and GRPO prompts carry), `SUPERVISED` (a MeCo training example: the prompt,
the response and its structural targets), `STREAMED` (a TimeScope training example: the same prompt cut into
prefix / segments / suffix for streaming, with the coarse-to-fine reload draw), `DECODED` (GRPO: decoded frames).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Field:
    dtype: str  # numpy dtype name; "str" for strings
    shape: tuple[str | int, ...]  # per example
    meaning: str


VARIABLE_AXES = ("text", "patches", "grids", "structural", "windows", "frames", "segments", "segment_grids", "suffix")

PROMPT = {
    "input_ids": Field("int32", ("text",), "token ids, one <|video_pad|> per visual token"),
    "positions": Field("int32", ("text", 3), "M-RoPE (temporal, height, width) position of each token"),
    "frame_of_token": Field("int32", ("text",), "the grid a visual token belongs to; -1 for text"),
    "pixel_values": Field("float32", ("patches", "patch_dim"), "flattened Qwen-VL patches, grid-major"),
    "grid_times": Field("float32", ("grids",), "start time (s) of each grid"),
    "grid_duration": Field("float32", (), "seconds one grid spans"),
}

_TARGETS = {
    "struct_kinds": Field("int32", ("structural",), "kind of each structural token: 1 <ent>, 2 <tst> (0 padding)"),
    "struct_ranges": Field("int32", ("structural", 2), "first and last grid each structural token's window covers"),
    "windows": Field("float32", ("windows", 2), "ground-truth windows (s)"),
    "duration": Field("float32", (), "annotated video duration (s)"),
    "id": Field("str", (), "sample id"),
}

SUPERVISED = (
    PROMPT
    | {
        "loss_mask": Field("bool", ("text",), "the response tokens the LM loss covers"),
        "struct_positions": Field("int32", ("structural",), "index of the state that predicts each structural token"),
    }
    | _TARGETS
)

STREAMED = {
    "prefix_ids": Field("int32", ("prefix",), "token ids before the video"),
    "prefix_positions": Field("int32", ("prefix", 3), "their M-RoPE positions"),
    "prefix_valid": Field("bool", ("prefix",), "real prefix tokens"),
    "segment_pixels": Field("float32", ("segments", "segment_patches", "patch_dim"), "each segment's patches"),
    "segment_positions": Field("int32", ("segments", 3, "segment_tokens"), "M-RoPE positions of its visual tokens"),
    "segment_valid": Field("bool", ("segments", "segment_tokens"), "real visual tokens (a last segment may be short)"),
    "frame_valid": Field("bool", ("segment_grids",), "real grids"),
    "suffix_ids": Field("int32", ("suffix",), "token ids after the video: instruction and response"),
    "suffix_positions": Field("int32", ("suffix", 3), "their M-RoPE positions"),
    "suffix_valid": Field("bool", ("suffix",), "real suffix tokens"),
    "suffix_start": Field("int32", (), "index of the first suffix token in the whole prompt"),
    "suffix_loss_mask": Field("bool", ("suffix",), "the response tokens the LM loss covers"),
    "suffix_struct_positions": Field("int32", ("structural",), "struct_positions, indexed in the suffix"),
    "reloaded": Field("bool", ("segments",), "segments whose full-resolution memory (DVR) the answer attends to"),
} | _TARGETS

DECODED = {
    "frames": Field("uint8", ("frames", "height", "width", 3), "decoded RGB frames"),
    "timestamps": Field("float32", ("frames",), "time (s) of each frame"),
    "fps": Field("float32", (), "sampling rate the frames were decoded at (0: unknown)"),
    "duration": Field("float32", (), "decoded video duration (s)"),
    "sample_index": Field("int32", (), "index of the sample in the training samples"),
    "id": Field("str", (), "sample id"),
}


def variable_axis(field: Field) -> str | None:
    """The name of `field`'s padded axis 0, or None for a fixed shape."""
    return field.shape[0] if field.shape and field.shape[0] in VARIABLE_AXES else None


def buckets(table: dict[str, Field], ladders: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """{key: bucket sizes} of `table`'s variable keys, from one ladder of sizes per axis name."""
    return {key: ladders[axis] for key, field in table.items() if (axis := variable_axis(field))}


def batch_keys(table: dict[str, Field]) -> dict[str, tuple[str, int]]:
    """{key: (dtype, rank)} of a padded batch of `table`'s examples: each key with a leading batch axis, a
    `{key}_mask` per variable key, and `valid`."""
    out = {key: (field.dtype, len(field.shape) + 1) for key, field in table.items()}
    out |= {f"{key}_mask": ("bool", 2) for key, field in table.items() if variable_axis(field)}
    return out | {"valid": ("bool", 1)}
