"""Speed and memory of Invert4TVG's GRPO step: rollouts (G samples per prompt), rewards, the update.

    python bench/grpo_step.py            # configs/invert4tvg.py's tiny model on its synthetic set

One JSON line per run: real GRPO steps (the untrained tiny model, so completions run to `max_new_tokens` more
often than a trained one's): rollout tokens/s, the seconds of the rollout, of the rest of the host work (rewards,
advantages, old / reference log-probs) and of the optimizer update, and the compiled update step's per-device
memory. The update step at Qwen2.5-VL-3B / 7B shapes (compile only, 8 virtual devices) is bench/accelerator.py's
`--methods grpo`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    parser.add_argument("--shape", choices=("default",), default="default")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=8, help="untimed first steps (compilation of each shape)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "jaxgrounding_bench"))
    args = parser.parse_args()
    result = bench_default(args)
    result |= {"backend": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine()}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
