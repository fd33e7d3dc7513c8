"""Compile time of the jitted train step against decoder depth.

The decoder's layers run in one `lax.scan`, so compiling 24 layers should cost about what 2
cost. Prints one JSON line per depth (lower + compile seconds of forward + backward + AdamW)
and the 24/2 ratio.

    python bench/model_compile_depth.py --depths 2,24
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgrounding.model import ModelConfig, VideoLLM, presets
from lm_step import lm_train_step  # bench/lm_step.py: the step both model benchmarks time


def config_for(depth: int) -> ModelConfig:
    """The tiny preset at width 256 (8 heads of 32, MLP 768, vocabulary 1024) with `depth` decoder layers."""
    return ModelConfig.from_hf_dict(presets.tiny(hidden=256, layers=depth))


def compile_seconds(depth: int, batch: int, seq: int) -> float:
    step, params, opt_state = lm_train_step(VideoLLM(config_for(depth), rngs=nnx.Rngs(0)))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    start = time.perf_counter()
    step.lower(params, opt_state, ids).compile()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="2,24")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    common = {
        "batch": args.batch,
        "seq": args.seq,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    compile_seconds(depths[0], args.batch, args.seq)  # warm JAX's own caches and imports
    seconds = {}
    for depth in depths:
        seconds[depth] = compile_seconds(depth, args.batch, args.seq)
        print(json.dumps({**common, "layers": depth, "compile_s": seconds[depth]}), flush=True)
    print(
        json.dumps(
            {
                **common,
                "metric": f"compile_s_{depths[-1]}_over_{depths[0]}",
                "ratio": seconds[depths[-1]] / seconds[depths[0]],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
