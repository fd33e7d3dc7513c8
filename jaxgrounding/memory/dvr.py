"""DVR store: the full-resolution keys and values of every streamed segment, kept off the memory buffer.

TimeScope keeps each segment's DVR (its keys, rotated, and values at full resolution) aside while the
video streams, and reloads the segments a coarse interval picks for the fine stage. Where it lives is a
setting: on device, in pinned host memory (a memory kind of GPU/TPU backends, so reloading is a DMA) or
in host numpy (CPU).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgrounding.model.decoder import Memory


def resolve_placement(placement: str, backend: str | None = None) -> str:
    """ "auto" -> pinned host memory where the backend has memory kinds (GPU, TPU), else host numpy."""
    if placement != "auto":
        return placement
    return "host" if (backend or jax.default_backend()) == "cpu" else "pinned_host"


class DVRStore:
    """The full keys/values of every streamed segment, where `placement` says.

    "device" keeps them as device arrays, "pinned_host" moves them to pinned host memory (a
    `memory_kind` of the same sharding, so reloading is a DMA), "host" copies them to numpy.
    `gather` builds the fine stage's DVR memory for chosen segments per row."""

    def __init__(self, placement: str):
        self.placement = resolve_placement(placement)
        self.segments: list[tuple[Any, Any, Any]] = []

    def add(self, keys: jax.Array, values: jax.Array, valid: jax.Array) -> None:
        if self.placement == "host":
            keys, values, valid = jax.device_get((keys, values, valid))
        elif self.placement == "pinned_host":
            keys, values = (jax.device_put(x, x.sharding.with_memory_kind("pinned_host")) for x in (keys, values))
        self.segments.append((keys, values, valid))

    @property
    def nbytes(self) -> int:
        return sum(int(k.nbytes + v.nbytes) for k, v, _ in self.segments)

    def host_bytes(self) -> int:
        return self.nbytes if self.placement in ("host", "pinned_host") else 0

    def gather(self, segments_br: np.ndarray) -> Memory:
        """segments_br: [B, R] segment indices (-1 = unused slot) -> Memory [L, B, R*S*P, ...]."""
        segments_br = np.asarray(segments_br)
        b, r = segments_br.shape
        rows_k, rows_v, rows_valid = [], [], []
        for row in range(b):
            ks, vs, oks = [], [], []
            for i in range(r):
                seg = int(segments_br[row, i])
                keys, values, valid = self.segments[max(seg, 0)]
                if self.placement == "pinned_host":
                    keys, values = (jax.device_put(x, x.sharding.with_memory_kind("device")) for x in (keys, values))
                ks.append(keys[:, row])
                vs.append(values[:, row])
                oks.append(np.asarray(valid[row]) & (seg >= 0))
            rows_k.append(jnp.concatenate([jnp.asarray(x) for x in ks], axis=1))
            rows_v.append(jnp.concatenate([jnp.asarray(x) for x in vs], axis=1))
            rows_valid.append(np.concatenate(oks))
        return Memory(jnp.stack(rows_k, axis=1), jnp.stack(rows_v, axis=1), jnp.asarray(np.stack(rows_valid)))
