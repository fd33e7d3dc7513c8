"""Vision tower of Qwen2-VL / Qwen2.5-VL: patch embedding, 2D-rotary ViT blocks, patch merger.

Input is the HF processor layout: `pixel_values` [N, C * Tp * P * P], one row per patch, patches
ordered (grid, t, h/m, w/m, m, m) so that every m x m merge block is contiguous; `grid_thw`
[G, 3] gives each image's or video's patch grid. Output: one embedding per merge block,
[N / m^2, out_hidden_size].

Attention never crosses a frame: Qwen2-VL blocks and Qwen2.5-VL's full-attention blocks attend
within each temporal patch frame, Qwen2.5-VL's other blocks within windows of
`window_size / patch_size` patches. transformers permutes the sequence so that windows are
contiguous and uses varlen attention; here the host builds, once per grid shape, gather indices
that pack every frame (or window) into a padded row `[segments, max_len]`, so attention is one
dense batched einsum with static shapes and the sequence order never changes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding import parallel
from jaxgrounding.model import attention, layers
from jaxgrounding.model.config import VisionConfig


@dataclasses.dataclass(frozen=True)
class Segments:
    """A packing of N tokens into padded attention segments.

    index: [S, L] int32 token index of each slot (N for an empty slot, which reads a zero row);
    valid: [S, L] bool; inverse: [N] int32 flat slot (s * L + l) of each token.
    """

    index: np.ndarray
    valid: np.ndarray
    inverse: np.ndarray


@dataclasses.dataclass(frozen=True)
class VisionPlan:
    """Everything about a batch of grids the tower needs besides pixels; numpy, built on the host."""

    positions: np.ndarray  # [N, 2] patch (row, col) for the 2D rotary
    frames: Segments  # one segment per temporal patch frame
    windows: Segments | None  # one segment per attention window (Qwen2.5-VL)

    def as_arrays(self) -> dict:
        out = {
            "positions": self.positions,
            "frame_index": self.frames.index,
            "frame_valid": self.frames.valid,
            "frame_inverse": self.frames.inverse,
        }
        if self.windows is not None:
            out |= {
                "window_index": self.windows.index,
                "window_valid": self.windows.valid,
                "window_inverse": self.windows.inverse,
            }
        return out


def _pack(segment_of_token: np.ndarray) -> Segments:
    """Packs tokens by segment id (ids need not be sorted) into padded rows."""
    n = segment_of_token.shape[0]
    order = np.argsort(segment_of_token, kind="stable")
    ids, starts, counts = np.unique(segment_of_token[order], return_index=True, return_counts=True)
    s, length = len(ids), int(counts.max())
    index = np.full((s, length), n, dtype=np.int32)
    valid = np.zeros((s, length), dtype=bool)
    inverse = np.empty((n,), dtype=np.int32)
    for row, (start, count) in enumerate(zip(starts, counts)):
        tokens = order[start : start + count]
        index[row, :count] = tokens
        valid[row, :count] = True
        inverse[tokens] = row * length + np.arange(count, dtype=np.int32)
    return Segments(index, valid, inverse)


@functools.lru_cache(maxsize=32)
def uniform_plan(batch: int, grids: int, grid_h: int, grid_w: int, config: VisionConfig) -> dict:
    """`vision_plan(...).as_arrays()` for `batch` videos of `grids` temporal grids of
    grid_h x grid_w patches each (a bucketed training batch, one streaming segment per row),
    built once per shape on the host."""
    return vision_plan(np.array([[grids, grid_h, grid_w]] * batch), config).as_arrays()


def vision_plan(grid_thw: np.ndarray, config: VisionConfig) -> VisionPlan:
    """Host-side layout of the patches described by `grid_thw` [G, 3]."""
    grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    m = config.spatial_merge_size
    positions, frame_ids, window_ids = [], [], []
    next_frame = next_window = 0
    for t, h, w in grid_thw.tolist():
        if h % m or w % m:
            raise ValueError(f"grid {(t, h, w)}: height and width must be multiples of spatial_merge_size {m}")
        # Row/col of every patch in processor order (h/m, w/m, m, m), repeated over frames.
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // m, m, w // m, m)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        positions.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
        per_frame = h * w
        frame_ids.append(np.repeat(np.arange(next_frame, next_frame + t), per_frame))
        next_frame += t
        if config.window_size is not None:
            # Windows tile the grid of merge blocks in squares of `side` blocks.
            side = config.window_size // m // config.patch_size
            bh, bw = rows // m, cols // m  # merge-block coordinates of each patch
            n_wins_w = -(-(w // m) // side)
            n_wins = -(-(h // m) // side) * n_wins_w
            win_in_frame = (bh // side) * n_wins_w + (bw // side)
            win = np.concatenate([win_in_frame + next_window + f * n_wins for f in range(t)])
            window_ids.append(win)
            next_window += t * n_wins
    positions = np.concatenate(positions).astype(np.int32)
    frames = _pack(np.concatenate(frame_ids))
    windows = _pack(np.concatenate(window_ids)) if config.window_size is not None else None
    return VisionPlan(positions, frames, windows)


def _segment_attention(q, k, v, index, valid, inverse, impl: str):
    """Attention within segments. q, k, v: [N, H, D] -> [N, H, D]."""
    zero = jnp.zeros((1, *q.shape[1:]), q.dtype)

    def gather(x):  # [S, L, H, D], the segments split over the batch axes like the patches
        return parallel.constrain(jnp.concatenate([x, zero], 0)[index], ("batch", None, "vision_heads", None))

    out = attention.full_attention(gather(q), gather(k), gather(v), valid, impl=impl)
    out = out.reshape(-1, *q.shape[1:])
    return parallel.constrain(out[inverse], ("batch", "vision_heads", None))


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, *, param_dtype, compute_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.impl = attention_impl
        d, h = config.hidden_size, config.num_heads
        self.qkv = layers.Linear(
            d,
            (3, h, d // h),
            axes=("vision_embed", None, "vision_heads", None),
            use_bias=True,
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            rngs=rngs,
        )
        self.proj = layers.OutLinear(
            (h, d // h),
            d,
            axes=("vision_heads", None, "vision_embed"),
            use_bias=True,
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            rngs=rngs,
        )

    def __call__(self, x, cos, sin, segments):
        qkv = self.qkv(x)  # [N, 3, H, D]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # Rotated in float32 and cast back (`layers.apply_rotary`), as transformers does.
        q = layers.apply_rotary(q[None], cos[None], sin[None])[0]
        k = layers.apply_rotary(k[None], cos[None], sin[None])[0]
        return self.proj(_segment_attention(q, k, v, *segments, self.impl))


class VisionBlock(nnx.Module):
    def __init__(self, config: VisionConfig, *, param_dtype, compute_dtype, attention_impl: str, rngs: nnx.Rngs):
        d = config.hidden_size
        norm = layers.RMSNorm if config.norm == "rms" else layers.LayerNorm
        self.norm1 = norm(d, eps=1e-6, axis_name="vision_embed", param_dtype=param_dtype)
        self.norm2 = norm(d, eps=1e-6, axis_name="vision_embed", param_dtype=param_dtype)
        self.attn = VisionAttention(
            config, param_dtype=param_dtype, compute_dtype=compute_dtype, attention_impl=attention_impl, rngs=rngs
        )
        kw = dict(
            act=config.hidden_act,
            axes=("vision_embed", "vision_mlp"),
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            rngs=rngs,
        )
        if config.gated_mlp:
            self.mlp = layers.GatedMLP(d, config.intermediate_size, use_bias=True, **kw)
        else:
            self.mlp = layers.PlainMLP(d, config.intermediate_size, **kw)

    def __call__(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Norm, then an MLP over each m x m block of patches concatenated: [N, D] -> [N / m^2, out]."""

    def __init__(self, config: VisionConfig, *, param_dtype, compute_dtype, rngs: nnx.Rngs):
        d = config.hidden_size
        merged = d * config.spatial_merge_size**2
        norm = layers.RMSNorm if config.norm == "rms" else layers.LayerNorm
        self.merged = merged
        self.ln_q = norm(d, eps=1e-6, axis_name="vision_embed", param_dtype=param_dtype)
        kw = dict(use_bias=True, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)
        self.fc1 = layers.Linear(merged, merged, axes=("vision_mlp", "vision_mlp_out"), **kw)
        self.fc2 = layers.Linear(merged, config.out_hidden_size, axes=("vision_mlp_out", "embed"), **kw)

    def __call__(self, x):
        x = self.ln_q(x).reshape(-1, self.merged)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, config: VisionConfig, *, param_dtype, compute_dtype, attention_impl: str, rngs: nnx.Rngs):
        self.config = config
        self.compute_dtype = compute_dtype
        self.patch_embed = layers.Linear(
            config.patch_dim,
            config.hidden_size,
            axes=(None, "vision_embed"),
            use_bias=False,
            param_dtype=param_dtype,
            compute_dtype=compute_dtype,
            rngs=rngs,
        )

        @nnx.split_rngs(splits=config.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs):
            return VisionBlock(
                config, param_dtype=param_dtype, compute_dtype=compute_dtype, attention_impl=attention_impl, rngs=rngs
            )

        self.blocks = make_blocks(rngs)
        mark_stacked(self.blocks)
        self.merger = PatchMerger(config, param_dtype=param_dtype, compute_dtype=compute_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, plan: dict) -> jax.Array:
        """pixel_values: [N, patch_dim]; plan: `VisionPlan.as_arrays()` (host or device arrays)."""
        cfg = self.config
        # The patches of a batch, flattened [N, ...], stay split over the batch axes of the mesh: without the
        # constraint XLA runs the whole batch's tower on every device (bench/accelerator.py).
        x = parallel.constrain(self.patch_embed(pixel_values.astype(self.compute_dtype)), ("batch", None))
        cos, sin = layers.vision_cos_sin(plan["positions"], cfg.head_dim, cfg.rope_theta)
        frames = (plan["frame_index"], plan["frame_valid"], plan["frame_inverse"])
        windows = (plan["window_index"], plan["window_valid"], plan["window_inverse"]) if cfg.window_size else None
        full = np.zeros((cfg.depth,), bool)
        full[list(i for i in cfg.fullatt_block_indexes if i < cfg.depth)] = True
        if windows is None:
            full[:] = True

        graphdef, stacked = nnx.split(self.blocks)

        def body(h, xs):
            block_state, is_full = xs
            block = nnx.merge(graphdef, block_state)
            if windows is None:
                return block(h, cos, sin, frames), None
            h = jax.lax.cond(is_full, lambda h: block(h, cos, sin, frames), lambda h: block(h, cos, sin, windows), h)
            return parallel.constrain(h, ("batch", None)), None

        x, _ = jax.lax.scan(body, x, (stacked, jnp.asarray(full)))
        return self.merger(x)


def mark_stacked(module: nnx.Module) -> None:
    """Prefixes the logical axes of every parameter of a vmapped stack with "layers"."""
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable):
            axes = var.get_metadata().get("logical_axes")
            if axes is not None and (len(axes) == 0 or axes[0] != "layers"):
                var.set_metadata(logical_axes=("layers", *axes))
