"""What fits on an accelerator and how fast: per-device memory of each method's train step at Qwen2.5-VL shapes.

    python bench/accelerator.py --no-time                       # 3B and 7B, meco / timescope / grpo, compile only
    python bench/accelerator.py --models 3b --methods meco --accumulate 4 --no-time
    python bench/accelerator.py --quick                         # tiny shapes (CI: tests/bench)

Prints JSON lines. For each model shape (`jaxgrounding.model.presets`: qwen2_5_vl_3b, qwen2_5_vl_7b) and method,
the recipe's train step (configs/meco.py, configs/timescope.py, configs/invert4tvg.py with `model=<preset>`: its
batch, frames, frame size, token budget, trainable parameters, float32 weights with bfloat16 compute,
`model.compute_dtype`) is built from the library (`Trainer` and the method's objective over an abstract model,
`nnx.eval_shape`: nothing is allocated) and compiled, not run, for 8 virtual CPU devices (a child process with
`--xla_force_host_platform_device_count=8`; FSDP 8, or FSDP 4 x tensor 2 for GRPO) with the accelerator attention
(`--attention`, default "xla": `jax.nn.dot_product_attention`, the path cuDNN replaces on GPU). A line holds the
compiled step's `memory_analysis()` per device: argument, output, temp, alias bytes and
peak_bytes = argument + output + temp - alias.

- meco: MeCo's SFT step (LM + L_ST), one causal pass over the whole prompt: LoRA r=128 on q/k/v/o, frozen tower.
- timescope: the same loss with the video streamed segment by segment into HVR memory (`SFTConfig.streaming`),
  the recipe's longest video (data.max_frames = 2048: 128 segments of 8 grids).
- grpo: Invert4TVG's GRPO update (`training.grpo.GRPOLoss`: policy log-probs of P prompts x G completions of
  max_new_tokens over the shared prompt, clipped surrogate, KL), full fine-tuning. Not in the figure: the rollout
  (sampling, a separate program) and, with full fine-tuning and beta > 0, the reference policy's copy of the
  weights (`reference_bytes`: one more parameter copy resident per device).

The decoder runs its layers in one `lax.scan`, so compiling the full depth costs about what a few layers cost (86 s
at 2 layers, 108 s at 4 for the 3B MeCo step here): compile the full depth. --layers N compiles N and 2N decoder
layers instead (the vision tower keeps its depth), reports `extrapolated` figures at the real depth on the line
through them, and checks that line once against a 3N compile (a "linearity" line). At shallow depths XLA's buffer
assignment is not linear in depth: the 3B MeCo step peaked at 107.6 GB with 2 layers and 87.2 GB with 4 (and 120,
121, 145 GB at 1, 2, 3 layers before the vision tower's sharding fix), so an extrapolation from a few layers is not
a figure to trust; the linearity line says how far off it is. --accumulate K splits the batch into K micro-batches
(`train.accumulate`); --no-time skips the device timing.

The "xla" attention materialises float32 logits [B, H, T, S] of one layer at a time (the layer scan's backward
recomputes them): at the MeCo recipe's 8144 tokens that is 17 GB per [4, 16, 8144, 8144] tensor on a device, which
cuDNN's or splash's fused kernels never hold, so the figures are an upper bound for the fused kernels.

XLA:CPU has no native bf16 dot: it upcasts bf16 operands to float32, and while-loop-invariant code motion would
hoist the upcasts of every stacked layer's weights out of the layer scan (float32 copies no GPU compile makes), so
the child compiles with that pass disabled (as bench/streaming.py's headline figures). The figures remain XLA:CPU's
buffer assignment, a proxy for a GPU's.

Measured here (2026-12-06, full depth, 8 devices, "xla" attention; peak GB per device): MeCo 3B 149.9, 7B 235.4;
TimeScope 3B 2,333, 7B 3,207; GRPO 3B 19.0, 7B 34.5 (+ 1.9 / 4.2 GB of reference weights). The MeCo and TimeScope
recipes (global batch 32 in one step) do not fit an 80 GB device: MeCo needs gradient accumulation (3B with
--accumulate 4: 43.9 GB), TimeScope more than that. With --attention blocked (query blocks, no [T, T] logits) the
3B MeCo step is 104.8 GB instead of 149.9; with "splash_interpret" (the TPU kernel run by the Pallas interpreter,
whose buffers are not the kernel's on-chip tiles) 194.8 GB, so the interpreter is no memory proxy for the kernel. Its streamed step is a `lax.scan` over 128 segments whose backward keeps, per segment,
every layer's saved activations (no remat around a segment) and the carried memory buffer (prefix + HVR slots of
all 128 segments: 5.4 GB per device at 3B by its layout): both grow with the number of segments (a checkpoint around the segment
body, tried, gives 1,103 GB at 3B; the buffer copies remain). GRPO's update fits.

Where a GPU or TPU is the default backend (and without --no-time), each step is also run on the device at the
compiled depth with zero-filled inputs: step seconds, tokens/s and MFU (the compiled step's FLOPs per device /
step seconds / the device's peak bf16 FLOP/s), and the HVR kernel (jaxgrounding/kernels/hvr_pallas.py, as
bench/hvr_kernel.py times it) against the jnp reference: achieved GB/s and the fraction of the device's HBM peak.
--time-on-cpu runs that path on CPU (a smoke check of the script; the numbers mean nothing there).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import types

DEVICES = 8
CHILD_FLAGS = (
    f"--xla_force_host_platform_device_count={DEVICES} --xla_disable_hlo_passes=while-loop-invariant-code-motion"
)
MODELS = {"3b": "qwen2_5_vl_3b", "7b": "qwen2_5_vl_7b"}
METHODS = ("meco", "timescope", "grpo")
# (fsdp, tensor) of each method's mesh: GRPO's batch of 4 prompts cannot split 8 ways.
MESHES = {"meco": (8, 1), "timescope": (8, 1), "grpo": (4, 2)}
# Peak dense bf16 FLOP/s and HBM bytes/s per device, by `device_kind` prefix (vendor data sheets).
PEAKS = {
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA H100": (989e12, 3.35e12),
    "NVIDIA A100": (312e12, 2.0e12),
    "TPU v5p": (459e12, 2.76e12),
    "TPU v5 lite": (197e12, 0.82e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v6 lite": (918e12, 1.64e12),
}
TEXT_TOKENS = 512  # instruction + response tokens of a supervised prompt besides the video
PREFIX_TOKENS = 32  # the system turn before a streamed video
STRUCTURAL, WINDOWS = 8, 4


# ------------------------------------------------------------------------------------------------
# Shapes of each method's batch
# ------------------------------------------------------------------------------------------------


def recipe(method: str, preset: str, quick: bool = False):
    """The method's config with the model preset's recipe (`tiny`: the configs' own defaults)."""
    from configs import invert4tvg, meco, timescope

    module = {"meco": meco, "timescope": timescope, "grpo": invert4tvg}[method]
    config = module.get_config(f"model={preset}")
    with config.unlocked():
        config.model.compute_dtype = "bfloat16"  # the tiny defaults are float32 throughout
        if quick:  # a few frames and tokens: seconds to compile
            config.data.max_frames = 16
            config.train.batch_size = DEVICES // MESHES[method][1]
            if method == "grpo":
                config.grpo.max_new_tokens = 16
    return config


def abstract_batch(table: dict, sizes: dict, rows: int, sharding, extra: dict = ()) -> dict:
    """ShapeDtypeStructs of a padded batch of `rows` examples of schema `table` (numeric keys, `{key}_mask` of the
    variable ones, `valid`), every axis name resolved by `sizes`, sharded by `sharding` along the batch."""
    import jax
    import numpy as np

    from jaxgrounding.data import schema

    def struct(shape, dtype):
        return jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)

    out = {}
    for key, field in table.items():
        if field.dtype == "str":
            continue
        shape = tuple(sizes[a] if isinstance(a, str) else a for a in field.shape)
        out[key] = struct((rows, *shape), field.dtype)
        if axis := schema.variable_axis(field):
            out[f"{key}_mask"] = struct((rows, sizes[axis]), "bool")
    out["valid"] = struct((rows,), "bool")
    for key, (shape, dtype) in dict(extra).items():
        out[key] = struct(shape, dtype)
    return out


def batch_shapes(method: str, config, model_config, quick: bool) -> tuple[dict, dict]:
    """(sizes of the batch's axes, a summary for the JSON line) of the recipe's largest batch."""
    patch = model_config.vision.patch_size
    merge = model_config.vision.spatial_merge_size
    h, w = config.data.frame_size
    patches_per_grid = (h // patch) * (w // patch)
    tokens_per_grid = patches_per_grid // (merge * merge)
    grids = config.data.max_frames // 2
    sizes = {"patch_dim": model_config.vision.patch_dim, "structural": STRUCTURAL, "windows": WINDOWS}
    text = 64 if quick else TEXT_TOKENS
    if method == "timescope":
        s = config.streaming.segment_frames
        n = -(-grids // s)
        sizes |= {
            "prefix": 16 if quick else PREFIX_TOKENS,
            "segments": n,
            "segment_patches": s * patches_per_grid,
            "segment_tokens": s * tokens_per_grid,
            "segment_grids": n * s,
            "suffix": text,
        }
        return sizes, {"segments": n, "segment_tokens": s * tokens_per_grid, "tokens": n * s * tokens_per_grid + text}
    # One causal pass: the video fills the token budget (encoder.max_tokens) the recipe allows.
    grids = min(grids, (config.encoder.max_tokens - text) // tokens_per_grid)
    t = grids * tokens_per_grid + text
    sizes |= {"text": t, "grids": grids, "patches": grids * patches_per_grid}
    return sizes, {"frames": 2 * grids, "tokens": t}


# ------------------------------------------------------------------------------------------------
# The train step, built from the library
# ------------------------------------------------------------------------------------------------


def build(method: str, preset: str, layers: int | None, args):
    """(trainer, arrays, summary) for the method's train step at `layers` decoder layers (None: the preset's)."""
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxgrounding import parallel, settings
    from jaxgrounding.data import schema
    from jaxgrounding.grounding_model import GroundingModel
    from jaxgrounding.model import presets
    from jaxgrounding.model.config import ModelConfig
    from jaxgrounding.model.lora import apply_lora
    from jaxgrounding.model.video_llm import VideoLLM
    from jaxgrounding.training import grpo as grpo_lib
    from jaxgrounding.training import sft as sft_lib
    from jaxgrounding.training.trainer import Trainer, TrainerConfig

    config = recipe(method, preset, args.quick)
    param_dtype, compute_dtype = settings.model_dtypes(config)
    # --quick: a smaller tiny model than the configs' default (one layer of width 64, a one-block tower).
    hf = presets.tiny(hidden=64, layers=1, vision_depth=1, vision_hidden=32) if args.quick else presets.hf_config(preset)
    model_config = ModelConfig.from_hf_dict(
        hf,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
        remat_policy=config.model.remat_policy,
        attention=args.attention,
    )
    full_depth = model_config.text.num_layers
    model_config = dataclasses.replace(
        model_config, text=dataclasses.replace(model_config.text, num_layers=layers or full_depth)
    )
    fsdp, tensor = mesh_shape(method, len(jax.devices()))
    mesh = parallel.make_mesh(data=1, fsdp=fsdp, tensor=tensor)
    with config.unlocked():
        config.train.accumulate = args.accumulate
        if args.batch:
            config.train.batch_size = args.batch
        if args.lora_rank:  # LoRA on the recipe's targets instead of its trainable weights (GRPO: full)
            config.trainable.llm = "lora"
            config.lora.rank = args.lora_rank
            config.lora.alpha = 2.0 * args.lora_rank

    def make():  # jaxgrounding.training.experiment.build_model, on an abstract model
        llm = VideoLLM(model_config, rngs=nnx.Rngs(0))
        if config.trainable.llm == "lora":
            lora = config.lora
            apply_lora(llm, rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.targets), dropout=lora.dropout)
        return GroundingModel(llm, rngs=nnx.Rngs(0))

    sizes, summary = batch_shapes(method, config, model_config, args.quick)
    rows = config.train.batch_size
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    if method == "grpo":
        g, n = config.grpo.num_samples, config.grpo.max_new_tokens
        completions = {
            "completion_ids": ((rows * g, n), "int32"),
            "completion_mask": ((rows * g, n), "bool"),
            "advantages": ((rows * g,), "float32"),
            "old_logps": ((rows * g, n), "float32"),
            "ref_logps": ((rows * g, n), "float32"),
            "num_items": ((rows * g,), "float32"),
        }
        arrays = abstract_batch(schema.PROMPT, sizes, rows, batch_sharding, completions)
        # GRPO's prepare reads only the frame size from its chat encoder (the rollout prompts are not built here).
        encoder = types.SimpleNamespace(config=types.SimpleNamespace(frame_size=tuple(config.data.frame_size)))
        objective = grpo_lib.GRPO(grpo_lib.grpo_config(config), model_config, encoder, (), (), {})
        summary |= {"prompts": rows, "num_samples": g, "max_new_tokens": n}
    else:
        table = schema.STREAMED if method == "timescope" else schema.SUPERVISED
        arrays = abstract_batch(table, sizes, rows, batch_sharding)
        objective = sft_lib.sft_objective(config, model_config, checkpoint="", samples=())
    summary |= {
        "batch": rows,
        "frame_size": list(config.data.frame_size),
        "trainable": config.trainable.llm,
        **({"lora_rank": config.lora.rank} if config.trainable.llm == "lora" else {}),
        "param_dtype": str(jax.numpy.dtype(param_dtype)),
        "compute_dtype": str(jax.numpy.dtype(compute_dtype)),
        "attention": args.attention,
        "mesh": {"fsdp": fsdp, "tensor": tensor},
        "full_layers": full_depth,
    }
    with jax.set_mesh(mesh):
        model = nnx.eval_shape(make)
        if method == "grpo":
            # GRPO.start copies the weights for the reference policy; an abstract model has none to copy.
            objective.start = lambda model, mesh: None
        # Two rows standing for <ent> / <tst> (only their count matters to the compiled step).
        new_rows = [model_config.text.vocab_size - 2, model_config.text.vocab_size - 1]
        trainer = Trainer(model, objective, TrainerConfig.from_config(config), new_rows)
        shard = sharder(mesh)
        trainer.trainable, trainer.frozen = shard(trainer.trainable), shard(trainer.frozen)
        trainer.opt_state = opt_state_structs(jax.eval_shape(trainer.optimizer.init, trainer.trainable), trainer.trainable)
    reference = config.trainable.llm == "full" and method == "grpo" and config.grpo.beta > 0
    return trainer, arrays, summary, mesh, reference


def mesh_shape(method: str, devices: int) -> tuple[int, int]:
    """(fsdp, tensor) of the method's mesh on `devices` devices: MESHES on the 8 of the compile-only run; on
    a GPU / TPU host, every device (the tensor axis kept where it divides them)."""
    fsdp, tensor = MESHES[method]
    if devices == fsdp * tensor:
        return fsdp, tensor
    tensor = tensor if devices % tensor == 0 else 1
    return devices // tensor, tensor


def sharder(mesh):
    import jax

    from jaxgrounding import parallel

    def shard(state):
        shardings = parallel.state_shardings(state, mesh)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

    return shard


def opt_state_structs(opt_state, trainable):
    """The optimizer state's ShapeDtypeStructs with the shardings of the parameters they mirror (Adam's moments:
    a leaf whose path ends with a parameter's path), replicated otherwise (step counts). A real run's state is
    sharded the same way: `optimizer.init` of sharded parameters keeps their shardings."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    params = {tuple(path): x for path, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    mesh = next(iter(params.values())).sharding.mesh

    def one(path, x):
        path = tuple(path)
        for i in range(len(path)):
            match = params.get(path[i:])
            if match is not None and match.shape == x.shape:
                return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=match.sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P()))

    return jax.tree_util.tree_map_with_path(one, opt_state)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of the sharded ShapeDtypeStructs in `tree` (the largest shard of each)."""
    import math

    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return int(total)


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    fields = {f"{k}_bytes": int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    fields["peak_bytes"] = fields["argument_bytes"] + fields["output_bytes"] + fields["temp_bytes"] - fields[
        "alias_bytes"
    ]
    return fields


def compile_case(method: str, preset: str, layers: int | None, args) -> tuple[dict, object, object, object]:
    import jax

    trainer, arrays, summary, mesh, reference = build(method, preset, layers, args)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = trainer.lower(arrays).compile()
    record = {
        "bench": "accelerator",
        "model": preset,
        "method": method,
        "layers": layers or summary["full_layers"],
        "accumulate": args.accumulate,
        **summary,
        "devices": len(jax.devices()),
        "compile_s": round(time.perf_counter() - start, 1),
        **memory(compiled),
        "params_bytes": per_device_bytes((trainer.trainable, trainer.frozen)),
        "opt_state_bytes": per_device_bytes(trainer.opt_state),
    }
    if reference:
        record["reference_bytes"] = record["params_bytes"]
    return record, compiled, trainer, arrays


FIELDS = (
    "argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes", "params_bytes", "opt_state_bytes"
)


def extrapolate(low: dict, high: dict, depth: int) -> dict:
    """Each memory figure on the line through the two compiled depths, at `depth` layers."""
    dl = high["layers"] - low["layers"]
    out = {}
    for k in FIELDS:
        per_layer = (high[k] - low[k]) / dl
        out[k] = int(low[k] + per_layer * (depth - low["layers"]))
        out[f"{k}_per_layer"] = int(per_layer)
    return out


# ------------------------------------------------------------------------------------------------
# Device timing (GPU / TPU, or --time-on-cpu as a smoke check)
# ------------------------------------------------------------------------------------------------


def peaks() -> tuple[float | None, float | None]:
    import jax

    kind = jax.devices()[0].device_kind
    for prefix, values in PEAKS.items():
        if kind.startswith(prefix):
            return values
    return None, None


def time_step(compiled, trainer, arrays, summary: dict, steps: int) -> dict:
    """Runs the compiled step on zero-filled inputs and real (zero-initialised) parameters: seconds per step,
    tokens/s and MFU. Parameters are built concretely (at the compiled depth) with their shardings."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    def zeros(tree):
        return jax.tree.map(lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding), tree)

    trainable, opt_state, frozen = zeros(trainer.trainable), zeros(trainer.opt_state), zeros(trainer.frozen)
    batch = zeros(arrays)
    plan, _ = trainer.objective.prepare(arrays, np.shape(arrays["valid"])[0] // trainer.config.accumulate)
    trainable, opt_state, _ = compiled(trainable, opt_state, frozen, batch, plan, None)  # warm up
    jax.block_until_ready(trainable)
    start = time.perf_counter()
    for _ in range(steps):
        trainable, opt_state, metrics = compiled(trainable, opt_state, frozen, batch, plan, None)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0  # per device (the SPMD program)
    peak_flops, _ = peaks()
    tokens = summary["batch"] * summary["tokens"]
    if "num_samples" in summary:
        tokens = summary["batch"] * (summary["tokens"] + summary["num_samples"] * summary["max_new_tokens"])
    return {
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "flops_per_device": flops,
        "mfu": flops / seconds / peak_flops if peak_flops else None,
        "device_kind": jax.devices()[0].device_kind,
    }


def time_hvr(quick: bool, repeats: int) -> list[dict]:
    """The HVR kernel against the jnp reference (bench/hvr_kernel.py's shapes and timing): GB/s and the fraction
    of the device's HBM peak. On CPU the kernel runs in interpret mode at a tiny shape."""
    import functools

    import jax
    import jax.numpy as jnp

    from hvr_kernel import DEFAULT_SHAPES, SHAPE_FIELDS, TINY_SHAPE, make_inputs, time_call
    from jaxgrounding.kernels.hvr_pallas import hvr_pallas
    from jaxgrounding.memory.hvr import hvr_reference

    interpret = jax.default_backend() == "cpu"
    shape = TINY_SHAPE if interpret or quick else DEFAULT_SHAPES[0]
    temporal, spatial = shape[6], shape[7]
    inputs = make_inputs(shape, jnp.bfloat16)
    k, v, cos, sin = inputs
    moved = k.nbytes + v.nbytes + cos.nbytes + sin.nbytes + (k.nbytes + v.nbytes) // (temporal * spatial)
    _, peak_bw = peaks()
    seconds = {}
    for name, pool in (
        ("pallas", functools.partial(hvr_pallas, temporal=temporal, spatial=spatial, interpret=interpret)),
        ("reference", functools.partial(hvr_reference, temporal=temporal, spatial=spatial)),
    ):
        seconds[name] = time_call(jax.jit(pool), inputs, repeats, calls=2 if interpret else 50)
    return [
        {
            "bench": "accelerator_hvr",
            "impl": name,
            **dict(zip(SHAPE_FIELDS, shape)),
            "seconds": s,
            "gbps": moved / s / 1e9,
            "fraction_of_hbm_peak": moved / s / peak_bw if peak_bw else None,
            "speedup_over_reference": seconds["reference"] / s,
            "interpret": interpret and name == "pallas",
            "device_kind": jax.devices()[0].device_kind,
        }
        for name, s in seconds.items()
    ]


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def run(args) -> None:
    import jax

    if jax.default_backend() == "cpu" and len(jax.devices()) != DEVICES:
        raise SystemExit(f"accelerator: the compile-only run needs {DEVICES} CPU devices, found {len(jax.devices())}")
    timing = not args.no_time and (jax.default_backend() != "cpu" or args.time_on_cpu)
    presets = ["tiny"] if args.quick else [MODELS[m] for m in args.models.split(",")]
    methods = args.methods.split(",")
    common = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine()}

    def emit(record):
        print(json.dumps(record | common), flush=True)

    checked_linearity = False
    for preset in presets:
        for method in methods:
            if not args.layers:
                record, compiled, trainer, arrays = compile_case(method, preset, None, args)
                if timing:
                    record |= time_step(compiled, trainer, arrays, record, args.steps)
                emit(record)
                continue
            low, compiled, trainer, arrays = compile_case(method, preset, args.layers, args)
            if timing:
                low |= time_step(compiled, trainer, arrays, low, args.steps)
            emit(low)
            high, *_ = compile_case(method, preset, 2 * args.layers, args)
            emit(high)
            full = {k: v for k, v in low.items() if k not in FIELDS and k not in ("compile_s", "layers")}
            emit(full | {"layers": low["full_layers"], "extrapolated": True} | extrapolate(low, high, low["full_layers"]))
            if not checked_linearity:
                checked_linearity = True
                third, *_ = compile_case(method, preset, 3 * args.layers, args)
                predicted = extrapolate(low, high, third["layers"])
                emit(
                    {
                        "bench": "accelerator_linearity",
                        "model": preset,
                        "method": method,
                        "layers": [low["layers"], high["layers"], third["layers"]],
                        "peak_bytes_compiled": third["peak_bytes"],
                        "peak_bytes_predicted": predicted["peak_bytes"],
                        "relative_error": abs(third["peak_bytes"] - predicted["peak_bytes"]) / third["peak_bytes"],
                    }
                )
    if timing:
        for record in time_hvr(args.quick, repeats=2 if args.quick else 20):
            emit(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="3b,7b", help="comma-separated: 3b, 7b")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--quick", action="store_true", help="the tiny model at the configs' default shapes (CI)")
    parser.add_argument("--layers", type=int, default=0, help="compile N and 2N decoder layers, extrapolate")
    parser.add_argument("--accumulate", type=int, default=1, help="gradient accumulation micro-batches")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: the recipe's train.batch_size)")
    parser.add_argument(
        "--attention", default="xla", help="model.attention (xla | blocked | splash_interpret | cudnn | splash)"
    )
    parser.add_argument(
        "--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: the recipe's trainable weights)"
    )
    parser.add_argument("--no-time", action="store_true", help="compile only, also on a GPU / TPU")
    parser.add_argument("--time-on-cpu", action="store_true", help="run the timing path on CPU (smoke check)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in args.methods.split(","):
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; known: {METHODS}")
    import jax

    if args.child or jax.default_backend() != "cpu":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hvr_kernel.py
        run(args)
        return
    # On CPU: the compile runs in a child with 8 virtual devices (the flag must be set before jax starts).
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + CHILD_FLAGS).strip())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    sys.exit(subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child"], env=env).returncode)


if __name__ == "__main__":
    main()
