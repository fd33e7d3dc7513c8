"""Throughput and compiled memory of the SFT (MeCo: LM + L_ST) train step.

    python bench/sft_step.py --shape default   # configs/meco.py's tiny model on real synthetic batches
    python bench/sft_step.py --shape 7b        # Qwen2.5-VL-7B shapes, LoRA r=128, 8 devices, compile only

One JSON line per run: the compiled step's per-device memory analysis (arguments, outputs,
temporaries, generated code; `peak_bytes` = arguments + outputs + temporaries - aliased), and for
the default shape the measured steps/s and samples/s. The 7B run is compiled for 8 (virtual
CPU) devices with FSDP x tensor sharding from the logical-axis rules; nothing is allocated, so
it tells what fits where without the hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

# 8 virtual devices for the sharded compile; must precede the jax import.
if "--shape" in sys.argv and sys.argv[sys.argv.index("--shape") + 1] == "7b":
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgrounding import parallel
from jaxgrounding.model import presets
from jaxgrounding.model.lora import apply_lora
from jaxgrounding.model.video_llm import VideoLLM
from jaxgrounding.training import optim
from jaxgrounding.grounding_model import GroundingModel
from jaxgrounding.training.sft import SFT, SFTConfig
from jaxgrounding.training.trainer import Trainer, TrainerConfig


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    fields = {
        k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias", "generated_code")
    }
    fields["peak_bytes"] = fields["argument"] + fields["output"] + fields["temp"] - fields["alias"]
    return fields


def bench_7b(args) -> dict:
    mesh = parallel.make_mesh(data=1, fsdp=args.fsdp, tensor=args.tensor)
    config = presets.model_config(
        "qwen2_5_vl_7b", param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16, remat_policy=args.remat
    )

    def make():
        llm = VideoLLM(config, rngs=nnx.Rngs(0))
        apply_lora(llm, rank=128, alpha=256.0)
        return GroundingModel(llm, rngs=nnx.Rngs(0))

    with jax.set_mesh(mesh):
        model = nnx.eval_shape(make)
        frame_size = (args.height, args.width)
        objective = SFT(SFTConfig(st_weight=1.0, streaming=None), config, frame_size)
        lora_only = TrainerConfig(
            accumulate=1,
            trainable=optim.TrainableConfig(llm="lora", vision=False, embeddings="new_tokens"),
            optimizer=optim.OptimizerConfig(total_steps=1000),
        )
        trainer = Trainer(model, objective, lora_only, [151665, 151666])

        def shard(state):
            shardings = parallel.state_shardings(state, mesh)
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

        trainer.trainable, trainer.frozen = shard(trainer.trainable), shard(trainer.frozen)
        b, g = args.batch, args.frames // 2
        per_grid = (args.height // 14) * (args.width // 14)
        t = g * per_grid // 4 + args.text
        batch_spec = NamedSharding(mesh, P(("data", "fsdp")))

        def arr(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=batch_spec)

        batch = {
            "input_ids": arr((b, t), jnp.int32),
            "input_ids_mask": arr((b, t), jnp.bool_),
            "loss_mask": arr((b, t), jnp.bool_),
            "positions": arr((b, t, 3), jnp.int32),
            "frame_of_token": arr((b, t), jnp.int32),
            "pixel_values": arr((b, g * per_grid, 1176), jnp.float32),
            "grid_times": arr((b, g), jnp.float32),
            "struct_positions": arr((b, 8), jnp.int32),
            "struct_kinds": arr((b, 8), jnp.int32),
            "struct_kinds_mask": arr((b, 8), jnp.bool_),
            "struct_ranges": arr((b, 8, 2), jnp.int32),
            "valid": arr((b,), jnp.bool_),
        }
        start = time.perf_counter()
        compiled = trainer.lower(batch).compile()
        seconds = time.perf_counter() - start
    return {
        "shape": "qwen2_5_vl_7b",
        "trainable": "lora r=128 q,k,v,o + heads + new token rows",
        "devices": 8,
        "mesh": dict(mesh.shape),
        "batch": b,
        "frames": args.frames,
        "frame_size": [args.height, args.width],
        "seq_len": t,
        "remat": args.remat,
        "param_dtype": "bfloat16",
        "compile_s": seconds,
        **memory(compiled),
    }


def bench_default(args) -> dict:
    from configs import meco
    from jaxgrounding import data as data_lib
    from jaxgrounding import settings
    from jaxgrounding.tasks.encoding import EncoderConfig, StructuralEncoder
    from jaxgrounding.training import experiment

    config = meco.get_config()
    workdir = os.path.join(args.cache, "run")
    config.data.root = os.path.join(args.cache, "synthetic")
    train, _ = experiment.load_samples(config, workdir)
    checkpoint = experiment.resolve_checkpoint(config, workdir, train)
    encoder = StructuralEncoder(checkpoint, EncoderConfig.from_config(config, train=True))
    pipeline = settings.pipeline_config(config, train=True, batch_size=config.train.batch_size)
    batches = iter(data_lib.make_pipeline(train, pipeline, encoder))
    model, tokenizer = experiment.build_model(config, checkpoint)
    trainer = experiment.build_trainer(config, model, tokenizer, checkpoint)
    # Fix one batch shape so every timed step runs the same compiled program.
    batch = next(batches)
    from jaxgrounding.grounding_model import device_batch

    compiled = trainer.lower(device_batch(batch)).compile()
    trainer.step(batch)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.step(batch)
    seconds = (time.perf_counter() - start) / args.steps
    return {
        "shape": "meco_default_tiny",
        "devices": 1,
        "batch": config.train.batch_size,
        "seq_len": int(batch["input_ids"].shape[1]),
        "frames": int(batch["grid_times"].shape[1]) * 2,
        "step_s": seconds,
        "steps_per_s": 1 / seconds,
        "samples_per_s": config.train.batch_size / seconds,
        **memory(compiled),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("default", "7b"), default="default")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "jaxgrounding_bench"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--height", type=int, default=252)
    parser.add_argument("--width", type=int, default=448)
    parser.add_argument("--text", type=int, default=512)
    parser.add_argument("--fsdp", type=int, default=4)
    parser.add_argument("--tensor", type=int, default=2)
    parser.add_argument("--remat", default="dots_with_no_batch_dims_saveable", help="decoder remat policy (7b)")
    args = parser.parse_args()
    result = bench_7b(args) if args.shape == "7b" else bench_default(args)
    result |= {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
