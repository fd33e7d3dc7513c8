"""Device memory and speed of TimeScope's streaming prefill against the full-attention forward pass.

    python bench/streaming.py --frames 256,2048            # tiny decoder, 224x224 frames, then the 7B estimate
    python bench/streaming.py --frames 64 --no-estimate-24gb   # a quick look

Prints one JSON line per (mode, frames), then one "estimate" line.

mode "streaming": the library's own streaming inference, `jaxgrounding.memory.streaming`: the prompt
(a one-row pipeline batch) is cut by `split_batch` into prefix / segments of `--segment-frames` temporal
grids (one grid = 2 video frames for Qwen) / suffix, and `stream_prompt` runs it: the jitted
`stream_start` on the text prefix, then the jitted `stream_segment` (vision tower on the segment +
decoder against the fixed-size memory buffer, HVR pooled into it) once per segment, the memory buffer
donated from step to step, the DVR handed to `DVRStore`. The two steps are compiled first (their
memory analysis is the figure; `stream_prompt` then reuses the compiled programs). The buffer is
preallocated for `max_segments` = ceil(grids / segment_frames): just what this video needs, so the peak
reflects the video length.
mode "full": the whole prompt (prefix + every visual token + a short suffix), vision tower over
all frames and decoder over the whole sequence, compiled only (it would not run at 2048 frames
here), "seconds": null and "compiled_only": true. It is `VideoLLM.forward` with two changes:
 - the decoder's attention is `model.attention = "xla"` by default: one masked [T, T] logit matrix
   per head, what the PyTorch reference computes with its dense mask. The CPU default ("blocked")
   unrolls T/128 Python-level query blocks (512 at 2048 frames), each slicing its own key prefix,
   and the program and its compile time grow with them;
 - logits only at the last token (as `VideoLLM.prefill`): [T, vocab] float32 logits would only
   make the baseline larger.
--full-attention blocked compiles the blocked path instead (smaller temp, e.g. 0.89 GB instead of
2.4 GB at 256 frames with the default model, but 14 s of compile there and growing with T).

Figures (all bytes):
 - peak_bytes: the largest compiled step's argument + output + temp - alias bytes from
   `memory_analysis()` (alias = the donated memory buffer, which the step's output reuses, so it is
   counted once), plus `resident_bytes`: buffers kept on device between steps that are not
   arguments of the step (the DVR of past segments with --dvr-placement device; 0 otherwise).
   Parameters are arguments of every step, so they are included (`params_bytes` shows how much).
   `step` holds the raw memory_analysis fields of the peak step.
 - host_bytes: the DVR (full-resolution keys + values of every segment) moved off the device after
   each step by `streaming.DVRStore` (--dvr-placement auto = numpy on CPU, pinned host memory on
   GPU/TPU); 0 with device, where it is in resident_bytes instead.
 - seconds (streaming): wall time of `stream_prompt` (the prefix and every segment, DVR moved to
   its placement, frame states fetched) on this machine after compilation (compile time separately
   in compile_seconds), batch 1, all-zero pixels (the programs do the same work for any pixels);
   seconds_per_segment = seconds / segments.
 - ratio_to_full: streaming peak / full peak at the same frames (on the full line too).
 - growth_vs_first: peak(frames) / peak(first --frames value), next to frames_ratio, the ratio of
   the frame counts: streaming should grow far slower than the frames (only the buffer grows),
   full attention quadratically.

Estimate (--estimate-24gb, on by default; --no-estimate-24gb skips it): a Qwen2.5-VL-7B-shaped
model (`--estimate-model`, a `jaxgrounding.model.presets` name; abstract parameters via `nnx.eval_shape`:
nothing allocated),
bfloat16 parameters and compute, 252x448 frames (144 tokens per grid), the same segment / HVR
settings, DVR on the host. `stream_segment` is compiled (not run) for each --estimate-segments
value; its peak (parameters included: they are arguments of the step and live on device) is
linear in max_segments (the buffer and the attention over it), so peak = a + b * max_segments is
fitted (fit_max_residual_bytes: the worst point's distance from the line) and solved for the
longest video (frames = max_segments * segment_frames * 2) whose step fits 24 GiB and 80 GiB
(2^30 bytes). 80 GiB compares with Video-XL-2's claim of more than 10,000 frames on one 80 GB GPU;
host_bytes_per_frame is what the DVR of one frame costs in host RAM.
The numbers come from XLA:CPU's memory analysis, a proxy for the GPU's. XLA:CPU has no native
bf16 dot: it upcasts bf16 operands to float32 and loop-invariant code motion hoists the upcasts of
the stacked weights (and of the memory buffer) out of the layer scan, ~29 GB of float32 copies no
GPU compile makes. So the headline figures ("fit", frames_in_24gb, frames_in_80gb) come from a
child process compiling with `--xla_disable_hlo_passes=while-loop-invariant-code-motion` (upcasts
stay inside the loop: one layer's weights at a time, still slightly pessimistic); "cpu_raw" is the
same fit with XLA:CPU as is, and "floor_params_plus_buffer" the bound no activation can beat
(parameters + buffer only). Most of the slope b is not the buffer but float32 attention logits over
it: the attention (`model.attention`) materialises [kv_heads, group, 128, buffer] logits per 128-query block, and
XLA keeps several blocks' logits live at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgrounding.memory import streaming
from jaxgrounding.memory.hvr import HVRConfig
from jaxgrounding.model import presets
from jaxgrounding.model.config import ModelConfig
from jaxgrounding.model.decoder import Memory
from jaxgrounding.model.positions import rope_positions
from jaxgrounding.model.video_llm import ModelInputs, VideoLLM
from jaxgrounding.model.vision import vision_plan

GIB = 1 << 30
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def nbytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of a pytree."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis for compiled programs")
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    # The donated buffer is both an argument and an output: count it once.
    out["step_bytes"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def tiny_config(args) -> ModelConfig:
    hf = presets.tiny(
        hidden=args.hidden,
        layers=args.layers,
        vision_depth=args.vision_depth,
        vision_hidden=args.vision_hidden,
    )
    # Qwen2.5-VL's real window (112 px = 4x4 merged tokens) instead of the tiny config's whole
    # 56 px frame, so the tower's windowed attention has the real shape on realistic frames.
    hf["vision_config"]["window_size"] = 112
    dtype = DTYPES[args.dtype]
    return ModelConfig.from_hf_dict(hf, param_dtype=dtype, compute_dtype=dtype)


def frame_geometry(config: ModelConfig, frame_size) -> tuple[int, int]:
    """(patches per temporal grid, merged tokens per grid) of a frame size."""
    v = config.vision
    unit = v.patch_size * v.spatial_merge_size
    h, w = frame_size
    if h % unit or w % unit:
        raise ValueError(f"frame size {h}x{w} must be a multiple of patch_size * spatial_merge_size = {unit}")
    patches = (h // v.patch_size) * (w // v.patch_size)
    return patches, patches // v.spatial_merge_size**2


def grids_of(config: ModelConfig, frames: int) -> int:
    tp = config.vision.temporal_patch_size
    if frames <= 0 or frames % tp:
        raise ValueError(f"--frames {frames}: need a positive multiple of temporal_patch_size={tp}")
    return frames // tp


def prompt(config: ModelConfig, grids: int, frame_size, prefix: int, suffix: int):
    """Token ids [1, T] and M-RoPE positions [3, 1, T] of `[prefix text, <vision_start>][video][<vision_end>,
    suffix text]`, positions computed once for the whole prompt (as the host does)."""
    if prefix < 1 or suffix < 1:
        raise ValueError("--prefix-tokens and --suffix-tokens must be >= 1 (vision start / end tokens)")
    v = config.vision
    _, per_grid = frame_geometry(config, frame_size)
    rng = np.random.default_rng(0)
    text = lambda n: rng.integers(0, min(presets.TINY_TOKEN_IDS.values()), size=n)  # noqa: E731
    vision_end = int(config.hf_config.get("vision_end_token_id", config.vision_start_token_id + 1))
    ids = np.concatenate(
        [
            text(prefix - 1),
            [config.vision_start_token_id],
            np.full(grids * per_grid, config.video_token_id),
            [vision_end],
            text(suffix - 1),
        ]
    ).astype(np.int32)[None]
    grid_thw = np.array([[grids, frame_size[0] // v.patch_size, frame_size[1] // v.patch_size]])
    positions, next_position = rope_positions(ids, config, video_grid_thw=grid_thw)
    return ids, positions, next_position, grid_thw


# ------------------------------------------------------------------------------------------------
# Streaming
# ------------------------------------------------------------------------------------------------


def streaming_config(args, max_segments: int, dvr_placement: str) -> streaming.StreamingConfig:
    return streaming.StreamingConfig(
        segment_frames=args.segment_frames,
        hvr=HVRConfig(temporal=args.temporal, spatial=args.spatial, impl="auto"),
        recent_segments=args.recent_segments,
        max_segments=max_segments,
        dvr_placement=dvr_placement,
    )


def segment_memory(config: ModelConfig, layout: streaming.BufferLayout, batch: int = 1) -> Memory:
    """The abstract memory buffer `stream_start` returns and `stream_segment` takes."""
    t = config.text
    shape = (t.num_layers, batch, layout.size, t.num_kv_heads, t.head_dim)
    return Memory(
        keys=jax.ShapeDtypeStruct(shape, config.compute_dtype),
        values=jax.ShapeDtypeStruct(shape, config.compute_dtype),
        valid=jax.ShapeDtypeStruct((batch, layout.size), jnp.bool_),
    )


def segment_args(config: ModelConfig, cfg: streaming.StreamingConfig, layout, frame_size, batch: int = 1) -> tuple:
    """Abstract (memory, index, pixels, plan, positions, valid) of one `stream_segment` call."""
    patches, _ = frame_geometry(config, frame_size)
    tokens = cfg.segment_frames * layout.tokens_per_frame
    return (
        segment_memory(config, layout, batch),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((batch, cfg.segment_frames * patches, config.vision.patch_dim), jnp.float32),
        streaming.plan_for(config, cfg, frame_size, batch),
        jax.ShapeDtypeStruct((3, batch, tokens), jnp.int32),
        jax.ShapeDtypeStruct((batch, tokens), jnp.bool_),
    )


def video_batch(config: ModelConfig, grids: int, frame_size, prefix: int, suffix: int) -> dict:
    """The one-row pipeline batch of the prompt (`streaming.split_batch`'s input). Its pixel_values hold no
    patch: `split_batch` pads every segment's pixels with zeros, so a 2048-frame video costs no host memory
    for pixels (1.2 GB of float32 patches at 224 x 224) and the steps do the same work as for any pixels."""
    ids, positions, _, _ = prompt(config, grids, frame_size, prefix, suffix)
    return {
        "input_ids": ids,
        "input_ids_mask": np.ones_like(ids, bool),
        "valid": np.ones((1,), bool),
        "positions": np.moveaxis(positions, 0, -1),  # [1, T, 3]
        "grid_times": np.zeros((1, grids), np.float32),
        "pixel_values": np.zeros((1, 0, config.vision.patch_dim), np.float32),
    }


def run_streaming(llm: VideoLLM, frames: int, args) -> dict:
    config = llm.config
    frame_size = tuple(args.frame_size)
    grids = grids_of(config, frames)
    n = -(-grids // args.segment_frames)
    cfg = streaming_config(args, max_segments=n, dvr_placement=args.dvr_placement)
    _, per_grid = frame_geometry(config, frame_size)
    arrays = streaming.split_batch(
        video_batch(config, grids, frame_size, args.prefix_tokens, args.suffix_tokens), config, cfg, frame_size
    )
    layout = streaming.BufferLayout.build(cfg, args.prefix_tokens, per_grid)

    # Compile the library's two steps for the arguments `stream_prompt` passes them; it then runs these programs.
    graphdef, state = nnx.split(llm)
    prefix_args = (
        jnp.asarray(arrays["prefix_ids"]),
        jnp.asarray(np.moveaxis(arrays["prefix_positions"], -1, 0)),
        jnp.asarray(arrays["prefix_valid"]),
    )
    tic = time.perf_counter()
    start = streaming.stream_start.lower(graphdef, state, layout, *prefix_args).compile()
    segment = streaming.stream_segment.lower(
        graphdef, state, layout, cfg.hvr, *segment_args(config, cfg, layout, frame_size)
    ).compile()
    compile_seconds = time.perf_counter() - tic
    steps = {"start": analysis(start), "segment": analysis(segment)}

    tic = time.perf_counter()
    video = streaming.stream_prompt(llm, arrays, cfg, frame_size)
    jax.block_until_ready((video.memory, video.dvr.segments))
    seconds = time.perf_counter() - tic

    # At the last step the DVR of the n - 1 earlier segments sits on device besides the step's own
    # arguments and outputs (device placement only).
    dvr_segment_bytes = nbytes(video.dvr.segments[0][:2])
    resident = (n - 1) * dvr_segment_bytes if video.dvr.placement == "device" else 0
    peak_step = max(steps, key=lambda k: steps[k]["step_bytes"])
    return {
        "mode": "streaming",
        "frames": frames,
        "grids": grids,
        "tokens_per_grid": per_grid,
        "visual_tokens": grids * per_grid,
        "segments": n,
        "max_segments": n,
        "buffer_slots": layout.size,
        "buffer_bytes": nbytes(video.memory),
        "peak_bytes": steps[peak_step]["step_bytes"] + resident,
        "peak_step": peak_step,
        "step": steps[peak_step],
        "resident_bytes": resident,
        "params_bytes": nbytes(state),
        "params_included": True,
        "dvr_placement": video.dvr.placement,
        "host_bytes": video.dvr.host_bytes(),
        "dvr_bytes_per_segment": dvr_segment_bytes,
        "seconds": seconds,
        "seconds_per_segment": seconds / n,
        "compile_seconds": compile_seconds,
        "frame_states_shape": list(video.frame_states.shape),
    }


# ------------------------------------------------------------------------------------------------
# Full attention (compile only)
# ------------------------------------------------------------------------------------------------


def full_step(graphdef):
    def forward(state, inputs: ModelInputs):
        llm = nnx.merge(graphdef, state)
        embeds = llm.embed_inputs(inputs)
        final, _, _ = llm.decoder(embeds, inputs.positions, inputs.attention_mask, None, ())
        return llm.decoder.logits(final[:, -1])

    return jax.jit(forward, keep_unused=True)


def compile_full(llm: VideoLLM, frames: int, args) -> dict:
    config = llm.config.replace(attention=args.full_attention)
    frame_size = tuple(args.frame_size)
    grids = grids_of(config, frames)
    patches, per_grid = frame_geometry(config, frame_size)
    ids, positions, next_position, grid_thw = prompt(config, grids, frame_size, args.prefix_tokens, args.suffix_tokens)
    plan = vision_plan(grid_thw, config.vision).as_arrays()
    t = ids.shape[1]
    inputs = ModelInputs(
        input_ids=ids,
        attention_mask=np.ones_like(ids, bool),
        positions=positions,
        next_position=next_position,
        pixel_values=jax.ShapeDtypeStruct((grids * patches, config.vision.patch_dim), jnp.float32),
        vision=abstract(plan),
        visual_slots=np.arange(args.prefix_tokens, args.prefix_tokens + grids * per_grid, dtype=np.int32),
    )
    inputs = abstract(inputs)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VideoLLM(config, rngs=nnx.Rngs(0))))
    tic = time.perf_counter()
    compiled = full_step(graphdef).lower(abstract(state), inputs).compile()
    compile_seconds = time.perf_counter() - tic
    step = analysis(compiled)
    return {
        "mode": "full",
        "frames": frames,
        "grids": grids,
        "tokens_per_grid": per_grid,
        "visual_tokens": grids * per_grid,
        "seq_len": t,
        "attention": args.full_attention,
        "peak_bytes": step["step_bytes"],
        "step": step,
        "resident_bytes": 0,
        "params_bytes": nbytes(state),
        "params_included": True,
        "host_bytes": 0,
        "seconds": None,
        "compiled_only": True,
        "compile_seconds": compile_seconds,
    }


# ------------------------------------------------------------------------------------------------
# Qwen2.5-VL-7B estimate (compile only)
# ------------------------------------------------------------------------------------------------


def estimate_config(args) -> ModelConfig:
    return presets.model_config(args.estimate_model, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)


# XLA:CPU has no native bfloat16 dot: it upcasts every bf16 operand to float32, and loop-invariant
# code motion then hoists the upcasts of the stacked layer weights out of the layer scan, so the
# compiled step holds a float32 copy of all 7B weights (~29 GB of temp) that no GPU compile has.
# Disabling that pass keeps the upcasts inside the loop (one layer's weights at a time).
NO_LICM_FLAG = "--xla_disable_hlo_passes=while-loop-invariant-code-motion"


def estimate_points(args) -> list[dict]:
    """Compiles `stream_segment` at --estimate-model's shape for each --estimate-segments value (nothing is
    allocated)."""
    config = estimate_config(args)
    frame_size = tuple(args.estimate_frame_size)
    _, per_grid = frame_geometry(config, frame_size)
    llm = nnx.eval_shape(lambda: VideoLLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(llm)
    points = []
    for max_segments in args.estimate_segments:
        cfg = streaming_config(args, max_segments=max_segments, dvr_placement="host")
        layout = streaming.BufferLayout.build(cfg, args.prefix_tokens, per_grid)
        step_args = segment_args(config, cfg, layout, frame_size)
        tic = time.perf_counter()
        step = analysis(streaming.stream_segment.lower(graphdef, state, layout, cfg.hvr, *step_args).compile())
        points.append(
            {
                "max_segments": max_segments,
                "buffer_slots": layout.size,
                "peak_bytes": step["step_bytes"],
                "compile_seconds": time.perf_counter() - tic,
                **{k: step[k] for k in ("argument", "output", "temp", "alias")},
            }
        )
    return points


def points_without_licm(args) -> list[dict]:
    """`estimate_points` in a child process whose XLA runs without loop-invariant code motion (XLA
    flags are read once, when the backend starts, so it cannot be switched in this process)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {NO_LICM_FLAG}".strip()
    command = [sys.executable, os.path.abspath(__file__), "--estimate-points-only", *sys_args(args)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the 7B compile without LICM failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sys_args(args) -> list[str]:
    """The estimate's own flags, to hand to the child process."""
    return [
        "--estimate-model",
        args.estimate_model,
        "--estimate-frame-size",
        *map(str, args.estimate_frame_size),
        "--estimate-segments",
        ",".join(map(str, args.estimate_segments)),
        "--segment-frames",
        str(args.segment_frames),
        "--temporal",
        str(args.temporal),
        "--spatial",
        str(args.spatial),
        "--recent-segments",
        str(args.recent_segments),
        "--prefix-tokens",
        str(args.prefix_tokens),
    ]


def fit_budgets(points: list[dict], frames_per_segment: int) -> dict:
    """peak = a + b * max_segments through the points, solved for 24 GiB and 80 GiB."""
    m = np.array([p["max_segments"] for p in points], float)
    y = np.array([p["peak_bytes"] for p in points], float)
    b, a = np.polyfit(m, y, 1)
    out = {
        "a_bytes": float(a),
        "b_bytes_per_segment": float(b),
        "fit_max_residual_bytes": float(np.max(np.abs(y - (a + b * m)))),
        "points": points,
    }
    for gib in (24, 80):
        segments = max(0, int((gib * GIB - a) // b))
        out[f"max_segments_{gib}gb"] = segments
        out[f"frames_in_{gib}gb"] = segments * frames_per_segment
    return out


def estimate(args) -> dict:
    config = estimate_config(args)
    t, v = config.text, config.vision
    frame_size = tuple(args.estimate_frame_size)
    _, per_grid = frame_geometry(config, frame_size)
    frames_per_segment = args.segment_frames * v.temporal_patch_size
    params = nbytes(nnx.state(nnx.eval_shape(lambda: VideoLLM(config, rngs=nnx.Rngs(0)))))
    kv_per_token = t.num_layers * t.num_kv_heads * t.head_dim * 2 * np.dtype(jnp.bfloat16).itemsize  # keys + values
    # The floor of this design: parameters plus the buffer alone, with no activations at all.
    layout = streaming.BufferLayout.build(streaming_config(args, 1, "host"), args.prefix_tokens, per_grid)
    floor = {
        "a_bytes": params + (layout.size - layout.pooled_per_segment) * kv_per_token,
        "b_bytes_per_segment": layout.pooled_per_segment * kv_per_token,
    }
    for gib in (24, 80):
        segments = max(0, int((gib * GIB - floor["a_bytes"]) // floor["b_bytes_per_segment"]))
        floor[f"frames_in_{gib}gb"] = segments * frames_per_segment
    print(f"estimate: compiling the {args.estimate_model} segment step (CPU XLA as is)", file=sys.stderr, flush=True)
    raw = fit_budgets(estimate_points(args), frames_per_segment)
    print(f"estimate: again with {NO_LICM_FLAG}", file=sys.stderr, flush=True)
    gpu_like = fit_budgets(points_without_licm(args), frames_per_segment)
    host_per_frame = per_grid * kv_per_token / v.temporal_patch_size
    return {
        "mode": "estimate",
        "model": args.estimate_model,
        "dtype": "bfloat16",
        "frame_size": list(frame_size),
        "tokens_per_grid": per_grid,
        "segment_frames": args.segment_frames,
        "temporal": args.temporal,
        "spatial": args.spatial,
        "recent_segments": args.recent_segments,
        "dvr_placement": "host",
        "params_bytes": params,
        "params_included": True,
        "budget_unit": "GiB (2^30 bytes)",
        "frames_in_24gb": gpu_like["frames_in_24gb"],
        "frames_in_80gb": gpu_like["frames_in_80gb"],
        "host_bytes_24gb": int(gpu_like["frames_in_24gb"] * host_per_frame),
        "host_bytes_80gb": int(gpu_like["frames_in_80gb"] * host_per_frame),
        "host_bytes_per_frame": host_per_frame,
        "video_xl2_claim_frames_80gb": 10000,
        "fit": gpu_like,
        "fit_xla_flags": NO_LICM_FLAG,
        "cpu_raw": raw,
        "floor_params_plus_buffer": floor,
        "compiled_only": True,
    }


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int_list, default=[256, 2048], help="video frame counts (2 per grid)")
    parser.add_argument("--modes", default="streaming,full", help="comma-separated: streaming, full")
    parser.add_argument("--frame-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    parser.add_argument("--segment-frames", type=int, default=8, help="temporal grids per segment")
    parser.add_argument("--temporal", type=int, default=4, help="HVR temporal pooling (grids)")
    parser.add_argument("--spatial", type=int, default=1, help="HVR spatial pooling (tokens)")
    parser.add_argument("--recent-segments", type=int, default=0, help="segments also seen in full (Video-XL-2: 3)")
    parser.add_argument(
        "--dvr-placement",
        choices=("auto", "host", "pinned_host", "device"),
        default="auto",
        help="where past segments' DVR lives (auto: pinned_host on GPU/TPU, host numpy on CPU)",
    )
    parser.add_argument(
        "--full-attention",
        choices=("xla", "blocked"),
        default="xla",
        help="full mode's attention (model.attention): xla, one masked [T, T] (the PyTorch reference's), or the "
        "blocked causal path, CPU's default (less memory, compile time grows with T/128)",
    )
    parser.add_argument("--prefix-tokens", type=int, default=16, help="text before the video (incl. vision start)")
    parser.add_argument("--suffix-tokens", type=int, default=16, help="text after the video (incl. vision end)")
    tiny = presets.TINY_SIZES
    parser.add_argument("--hidden", type=int, default=tiny["hidden"], help="tiny decoder width (head_dim 32)")
    parser.add_argument("--layers", type=int, default=tiny["layers"])
    parser.add_argument("--vision-depth", type=int, default=tiny["vision_depth"])
    parser.add_argument("--vision-hidden", type=int, default=tiny["vision_hidden"])
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="tiny model params and compute")
    parser.add_argument("--pixel-pool", type=int, default=4, help="distinct random segments cycled as input")
    parser.add_argument(
        "--estimate-24gb",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compile the Qwen2.5-VL-7B segment step and fit frames into 24 GiB / 80 GiB",
    )
    parser.add_argument(
        "--estimate-model",
        choices=[name for name in presets.PRESETS if name != "tiny"],
        default="qwen2_5_vl_7b",
        help="the model preset of the estimate",
    )
    parser.add_argument("--estimate-frame-size", type=int, nargs=2, default=(252, 448), metavar=("H", "W"))
    parser.add_argument(
        "--estimate-segments", type=int_list, default=[16, 64, 256], help="max_segments values compiled for the fit"
    )
    parser.add_argument("--estimate-points-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - {"streaming", "full"}
    if unknown or not args.modes:
        parser.error(f"--modes takes streaming and/or full, got {args.modes}")
    if args.estimate_24gb and len(set(args.estimate_segments)) < 2:
        parser.error("--estimate-segments needs at least two distinct values to fit a line")
    if args.segment_frames % args.temporal:
        parser.error(f"--segment-frames {args.segment_frames} must be a multiple of --temporal {args.temporal}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.estimate_points_only:  # the child process of points_without_licm
        print(json.dumps(estimate_points(args)), flush=True)
        return []
    common = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    config = tiny_config(args)
    llm = VideoLLM(config, rngs=nnx.Rngs(0))
    settings = {
        "model": f"tiny hidden={args.hidden} layers={args.layers} kv_heads={config.text.num_kv_heads} "
        f"vision depth={args.vision_depth} hidden={args.vision_hidden}",
        "dtype": args.dtype,
        "frame_size": list(args.frame_size),
        "segment_frames": args.segment_frames,
        "temporal": args.temporal,
        "spatial": args.spatial,
        "recent_segments": args.recent_segments,
        "batch": 1,
    }
    results = []
    peaks: dict[tuple[str, int], int] = {}
    for frames in args.frames:
        rows = {}
        for mode in args.modes:
            rows[mode] = run_streaming(llm, frames, args) if mode == "streaming" else compile_full(llm, frames, args)
            peaks[mode, frames] = rows[mode]["peak_bytes"]
        for mode, row in rows.items():
            if "streaming" in rows and "full" in rows:
                row["ratio_to_full"] = rows["streaming"]["peak_bytes"] / rows["full"]["peak_bytes"]
            first = args.frames[0]
            row["growth_vs_first"] = row["peak_bytes"] / peaks[mode, first]
            row["frames_ratio"] = frames / first
            row = {**row, **settings, **common}
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.estimate_24gb:
        row = {**estimate(args), **common}
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


if __name__ == "__main__":
    main()
