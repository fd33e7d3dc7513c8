"""Speed and memory of Invert4TVG's GRPO step: rollouts (G samples per prompt), rewards, the update.

    python bench/grpo_step.py                  # configs/invert4tvg.py's tiny model on its synthetic set
    python bench/grpo_step.py --shape 7b_lora  # the update step at Qwen2.5-VL-7B shapes, LoRA r=128, compile only

One JSON line per run: real GRPO steps (the untrained tiny model, so completions run to `max_new_tokens` more
often than a trained one's): rollout tokens/s, the seconds of the rollout, of the rest of the host work (rewards,
advantages, old / reference log-probs) and of the optimizer update, and the compiled update step's per-device
memory.

`--shape 7b_lora` compiles (does not run) the update step at Qwen2.5-VL-7B shapes with LoRA r=128 on q/k/v/o,
the recipe's 4 prompts of 224 frames of 112 x 112 (the paper's ~2.8M-pixel budget: 2304 tokens) x G = 8 x 512 new
tokens, for 8 virtual CPU devices (bench/accelerator.py `--models 7b --methods grpo --lora-rank 128 --no-time`,
whose line it prints). With LoRA the reference policy is the same weights with the adapters off: no copy.

Measured here (2026-12-06): default 1.29 s per step (rollout 0.27 s, 8002 tok/s; update 0.21 s; 118 MB peak);
7B LoRA r=128: 22.4 GB per device (parameters 4.3 GB, optimizer state 1.5 GB, temporaries 16.5 GB), against
34.5 GB + 4.2 GB of reference weights for full fine-tuning; 3B LoRA r=128: 14.0 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np


def memory(compiled) -> dict:
    m = compiled.memory_analysis()
    fields = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias", "generated_code")}
    fields["peak_bytes"] = fields["argument"] + fields["output"] + fields["temp"] - fields["alias"]
    return fields


def bench_default(args) -> dict:
    from configs import invert4tvg
    from jaxgrounding import data as data_lib
    from jaxgrounding import settings
    from jaxgrounding.grounding_model import device_batch
    from jaxgrounding.training import experiment

    config = invert4tvg.get_config()
    config.data.root = os.path.join(args.cache, "synthetic_clock")
    workdir = os.path.join(args.cache, "run")
    train, _ = experiment.load_samples(config, workdir)
    checkpoint = experiment.resolve_checkpoint(config, workdir, train)
    transform = experiment.train_transform(config, checkpoint, train)
    pipeline = settings.pipeline_config(config, train=True, batch_size=config.train.batch_size)
    batches = iter(data_lib.make_pipeline(train, pipeline, transform))
    model, tokenizer = experiment.build_model(config, checkpoint)
    trainer = experiment.build_trainer(config, model, tokenizer, checkpoint, train)
    rng = jax.random.key(config.seed)

    rows, first = [], None
    for step in range(args.steps + args.warmup):
        batch = next(batches)
        tick = time.perf_counter()
        pending = trainer.dispatch(batch, rng=jax.random.fold_in(rng, step), step=step)
        dispatched = time.perf_counter()
        metrics = pending.get()  # waits for the updates: their wall time, as the host sees it
        metrics["update_seconds"] = time.perf_counter() - dispatched
        metrics["step_seconds"] = time.perf_counter() - tick
        if step == 0:
            first = batch
        if step >= args.warmup:  # the first steps compile (one program per prompt bucket and task)
            rows.append(metrics)

    # The update step's compiled memory, on the first batch's host arrays.
    arrays, _ = trainer.objective.host_arrays(first, 0, trainer.model)
    compiled = trainer.lower(device_batch(arrays)).compile()

    def mean(key):
        return float(np.mean([r[key] for r in rows]))

    return {
        "shape": "invert4tvg_default_tiny",
        "devices": 1,
        "prompts": config.train.batch_size,
        "num_samples": config.grpo.num_samples,
        "max_new_tokens": config.grpo.max_new_tokens,
        "steps_timed": len(rows),
        "step_s": mean("step_seconds"),
        "rollout_s": mean("rollout_seconds"),
        "rollout_tokens_per_s": mean("rollout_tokens_per_s"),
        "completion_length": mean("completion_length"),
        "host_other_s": mean("host_seconds") - mean("rollout_seconds"),
        "update_s": mean("update_seconds"),
        **memory(compiled),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=("default", "7b_lora"), default="default")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=8, help="untimed first steps (compilation of each shape)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "jaxgrounding_bench"))
    args = parser.parse_args()
    if args.shape == "7b_lora":
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accelerator.py")
        flags = ["--models", "7b", "--methods", "grpo", "--lora-rank", "128", "--no-time"]
        raise SystemExit(subprocess.run([sys.executable, script, *flags]).returncode)
    result = bench_default(args)
    result |= {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
