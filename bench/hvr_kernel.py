"""HVR pooling throughput: the fused Pallas kernel vs the jnp reference (XLA), in GB/s of HBM traffic.

  python bench/hvr_kernel.py [--impl pallas,reference] [--dtype bfloat16] [--repeats 20] [--peak-gbps 3350]
                             [--shape L,B,F,P,Kh,D,temporal,spatial ...] [--interpret] [--backward]

Prints one JSON line per (impl, shape, pass): the median seconds per call (rounds of 50 back-to-back calls) after
a compiling warm-up, bytes moved, gbps and, with --peak-gbps (e.g. 3350 for H100 SXM HBM3, 4800 for H200),
fraction_of_peak.
The op is purely memory bound, so gbps against the HBM peak is the figure of merit. Pallas forward lines also carry
max_err_{k_out,v_out,dk,dv}: the kernel against the reference, both run (compiled) on this device.

pass "forward": k, v, cos, sin read; pooled k, v written (the minimum any implementation must move).
With --backward, also (gradients w.r.t. k and v, as the SFT step takes them: cos and sin come from integer
positions, so their cotangents are dropped and XLA deletes their computation):
pass "backward": the jitted vjp function alone, from jax.vjp of hvr_pallas (its fused backward kernel) or of
    hvr_reference (XLA's transpose): the pooled cotangents, cos and sin read; dk, dv written (the same byte count
    as the forward, the other way round).
pass "forward+backward": jax.vjp and the vjp function in one jitted call returning outputs and gradients,
    the training step's pattern; bytes are the forward's plus the backward's.

On CPU the kernel cannot compile; it runs only with --interpret, and then on a tiny default shape, since
interpret mode is a slow emulation that says nothing about kernel speed (it only proves the script end to end).
"""

import argparse
import functools
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


def time_call(fn, args, repeats: int, calls: int = 50) -> float:
    """Median seconds per call over `repeats` rounds of `calls` back-to-back calls (one sync per round): a
    microsecond kernel timed one blocking call at a time measures host dispatch, not the device."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def max_errors(inputs, temporal: int, spatial: int, interpret: bool) -> dict[str, float]:
    """Max |pallas - reference| of the pooled keys and values and of their gradients in k and v (a random
    cotangent), each computed the way it runs here (compiled on GPU/TPU): the kernel's correctness on the device."""
    k, v, cos, sin = inputs
    kernel = functools.partial(hvr_pallas, temporal=temporal, spatial=spatial, interpret=interpret)
    reference = functools.partial(hvr_reference, temporal=temporal, spatial=spatial)
    pooled = jax.eval_shape(reference, *inputs)
    kg, vg = jax.random.split(jax.random.key(2))
    cotangents = (jax.random.normal(kg, pooled[0].shape, k.dtype), jax.random.normal(vg, pooled[1].shape, v.dtype))

    @functools.partial(jax.jit, static_argnums=0)
    def outputs_and_grads(pool, k, v):
        out, vjp_fn = jax.vjp(lambda k, v: pool(k, v, cos, sin), k, v)
        return out + vjp_fn(cotangents)

    got, want = outputs_and_grads(kernel, k, v), outputs_and_grads(reference, k, v)
    names = ("k_out", "v_out", "dk", "dv")
    return {
        f"max_err_{n}": float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        for n, a, b in zip(names, got, want)
    }


def backward_runs(pool, inputs, dtype):
    """(name, fn, args, bytes factor) for the backward passes of `pool(k, v, cos, sin)`, differentiated in k and v."""
    k, v, cos, sin = inputs
    pooled = jax.eval_shape(pool, *inputs)
    kg, vg = jax.random.split(jax.random.key(1))
    cotangents = (jax.random.normal(kg, pooled[0].shape, dtype), jax.random.normal(vg, pooled[1].shape, dtype))

    def forward_backward(k, v, cos, sin, cotangents):
        outputs, vjp_fn = jax.vjp(lambda k, v: pool(k, v, cos, sin), k, v)
        return outputs, vjp_fn(cotangents)

    _, vjp_fn = jax.vjp(lambda k, v: pool(k, v, cos, sin), k, v)  # a pytree: its residuals are jit arguments
    return [
        ("backward", jax.jit(lambda fn, g: fn(g)), (vjp_fn, cotangents), 1),
        ("forward+backward", jax.jit(forward_backward), (k, v, cos, sin, cotangents), 2),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", default="pallas,reference", help="comma-separated: pallas, reference")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shape", type=parse_shape, action="append", help="L,B,F,P,Kh,D,temporal,spatial")
    parser.add_argument("--interpret", action="store_true", help="run the kernel in interpret mode (CPU only)")
    parser.add_argument("--peak-gbps", type=float, help="HBM peak in GB/s, to report fraction_of_peak")
    parser.add_argument("--backward", action="store_true", help="also time the backward and forward+backward")
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
                pool = functools.partial(hvr_pallas, temporal=temporal, spatial=spatial, interpret=args.interpret)
            else:
                pool = functools.partial(hvr_reference, temporal=temporal, spatial=spatial)
            runs = [("forward", jax.jit(pool), inputs, 1)]
            if args.backward:
                runs += backward_runs(pool, inputs, dtype)
            for name, fn, fn_args, factor in runs:
                seconds = time_call(fn, fn_args, args.repeats)
                record = {
                    "bench": "hvr_kernel",
                    "impl": impl,
                    "pass": name,
                    **dict(zip(SHAPE_FIELDS, shape)),
                    "dtype": dtype.name,
                    "seconds": seconds,
                    "bytes": factor * moved,
                    "gbps": factor * moved / seconds / 1e9,
                    "backend": backend,
                }
                if impl == "pallas" and args.interpret:
                    record["interpret"] = True
                if impl == "pallas" and name == "forward":
                    record |= max_errors(inputs, temporal, spatial, args.interpret)
                if args.peak_gbps:
                    record["fraction_of_peak"] = record["gbps"] / args.peak_gbps
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
