"""HVR pooling throughput: the fused Pallas kernel vs the jnp reference (XLA), in GB/s of HBM traffic.

  python bench/hvr_kernel.py [--impl pallas,reference] [--dtype bfloat16] [--repeats 20] [--peak-gbps 3350]
                             [--shape L,B,F,P,Kh,D,temporal,spatial ...] [--interpret]

Prints one JSON line per (impl, shape): the median seconds of `repeats` timed calls after a compiling warm-up,
bytes moved (k, v, cos, sin read; pooled k, v written: the minimum any implementation must move), gbps and, with
--peak-gbps (e.g. 3350 for H100 SXM HBM3, 4800 for H200), fraction_of_peak. The op is purely memory bound, so
gbps against the HBM peak is the figure of merit.

On CPU the kernel cannot compile; it runs only with --interpret, and then on a tiny default shape, since
interpret mode is a slow emulation that says nothing about kernel speed (it only proves the script end to end).
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxgrounding.kernels.hvr_pallas import hvr_pallas
from jaxgrounding.memory.hvr import hvr_reference

SHAPE_FIELDS = ("L", "B", "F", "P", "Kh", "D", "temporal", "spatial")
DEFAULT_SHAPES = (
    (28, 1, 16, 144, 4, 128, 4, 1),  # Qwen2.5-VL-7B decoder: 28 layers, 4 KV heads; 16 frames of 12x12 tokens
    (4, 1, 8, 64, 2, 128, 2, 2),
)
TINY_SHAPE = (2, 1, 4, 16, 2, 128, 4, 1)


def parse_shape(text: str) -> tuple[int, ...]:
    values = tuple(int(x) for x in text.split(","))
    if len(values) != len(SHAPE_FIELDS):
        raise argparse.ArgumentTypeError(f"--shape needs {','.join(SHAPE_FIELDS)}, got {text!r}")
    return values


def make_inputs(shape, dtype):
    n_layers, b, f, p, heads, d, temporal, spatial = shape
    kk, kv, ka = jax.random.split(jax.random.key(0), 3)
    k = jax.random.normal(kk, (n_layers, b, f, p, heads, d), dtype)
    v = jax.random.normal(kv, (n_layers, b, f, p, heads, d), dtype)
    angles = jax.random.uniform(ka, (b, f // temporal, p // spatial, d), jnp.float32, -3.0, 3.0)
    return k, v, jnp.cos(angles), jnp.sin(angles)


def time_call(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="pallas,reference", help="comma-separated: pallas, reference")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shape", type=parse_shape, action="append", help="L,B,F,P,Kh,D,temporal,spatial")
    parser.add_argument("--interpret", action="store_true", help="run the kernel in interpret mode (CPU only)")
    parser.add_argument("--peak-gbps", type=float, help="HBM peak in GB/s, to report fraction_of_peak")
    args = parser.parse_args()

    backend = jax.default_backend()
    impls = [name.strip() for name in args.impl.split(",") if name.strip()]
    unknown = set(impls) - {"pallas", "reference"}
    if unknown:
        parser.error(f"unknown --impl {sorted(unknown)}")
    if backend == "cpu" and "pallas" in impls and not args.interpret:
        print("hvr_kernel: Pallas does not compile on cpu; skipping it (pass --interpret to emulate)", file=sys.stderr)
        impls.remove("pallas")
    shapes = args.shape or ([TINY_SHAPE] if args.interpret else list(DEFAULT_SHAPES))
    dtype = jnp.dtype(args.dtype)

    for shape in shapes:
        temporal, spatial = shape[6], shape[7]
        inputs = make_inputs(shape, dtype)
        k, v, cos, sin = inputs
        pooled_bytes = (k.nbytes + v.nbytes) // (temporal * spatial)
        moved = k.nbytes + v.nbytes + cos.nbytes + sin.nbytes + pooled_bytes
        for impl in impls:
            if impl == "pallas":
                fn = jax.jit(
                    lambda *a, t=temporal, s=spatial: hvr_pallas(*a, temporal=t, spatial=s, interpret=args.interpret)
                )
            else:
                fn = jax.jit(lambda *a, t=temporal, s=spatial: hvr_reference(*a, temporal=t, spatial=s))
            seconds = time_call(fn, inputs, args.repeats)
            record = {
                "bench": "hvr_kernel",
                "impl": impl,
                **dict(zip(SHAPE_FIELDS, shape)),
                "dtype": dtype.name,
                "seconds": seconds,
                "bytes": moved,
                "gbps": moved / seconds / 1e9,
                "backend": backend,
            }
            if impl == "pallas" and args.interpret:
                record["interpret"] = True
            if args.peak_gbps:
                record["fraction_of_peak"] = record["gbps"] / args.peak_gbps
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
