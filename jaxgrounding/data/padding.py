"""Pads variable-length examples to a few fixed shapes and stacks them into a batch.

Jitted steps recompile for every new input shape, so each variable axis is padded up
to the smallest of a handful of bucket sizes, and the batch axis itself is always
``batch_size`` (a short last batch is padded and marked invalid).
"""

from typing import Mapping, Sequence

import numpy as np

Example = Mapping[str, np.ndarray]


def bucket_size(length: int, buckets: Sequence[int], key: str) -> int:
    for size in sorted(buckets):
        if length <= size:
            return size
    raise ValueError(
        f"{key!r} has length {length}, above the largest bucket {max(buckets)}; "
        "add a bucket or cap the length (e.g. max_frames)"
    )


def pad_and_stack(
    examples: Sequence[Example], batch_size: int, buckets: Mapping[str, Sequence[int]]
) -> dict[str, np.ndarray]:
    """Stacks ``examples`` (at most ``batch_size``) into fixed-shape arrays.

    Keys listed in ``buckets`` are padded with zeros along axis 0 to a bucket size and
    get a ``{key}_mask`` [B, size] bool; other keys must agree in shape. ``valid`` [B]
    marks the real examples.
    """
    if not examples or len(examples) > batch_size:
        raise ValueError(f"need 1..{batch_size} examples, got {len(examples)}")
    batch: dict[str, np.ndarray] = {}
    for key in examples[0]:
        values = [np.asarray(e[key]) for e in examples]
        if key in buckets:
            size = bucket_size(max(v.shape[0] for v in values), buckets[key], key)
            tail = values[0].shape[1:]
            out = np.zeros((batch_size, size, *tail), values[0].dtype)
            mask = np.zeros((batch_size, size), bool)
            for i, v in enumerate(values):
                if v.shape[1:] != tail:
                    raise ValueError(f"{key!r}: trailing shapes differ: {v.shape} vs {tail}")
                out[i, : len(v)] = v
                mask[i, : len(v)] = True
            batch[key], batch[f"{key}_mask"] = out, mask
        else:
            shapes = {v.shape for v in values}
            if len(shapes) > 1:
                raise ValueError(f"{key!r} has shapes {shapes}; give it a bucket to pad it")
            # np.stack finds the common dtype: strings of different lengths keep their longest width.
            stacked = np.stack(values)
            out = np.zeros((batch_size, *values[0].shape), stacked.dtype)
            out[: len(values)] = stacked
            batch[key] = out
    valid = np.zeros((batch_size,), bool)
    valid[: len(examples)] = True
    batch["valid"] = valid
    return batch
