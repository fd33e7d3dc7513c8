"""Generation throughput of `jaxgrounding.sampling.generate` against transformers' `generate`, same weights.

The model is a Qwen2.5-VL text stack (hidden 512, 4 layers, 8 heads / 2 KV heads, MLP 1536, vocabulary
32000, float32, random init) built by transformers' `Qwen2_5_VLForConditionalGeneration`, saved with
`save_pretrained` to a temporary directory and loaded by both. Greedy decoding of `--new-tokens` tokens
with no end token (every row runs to the end); both implementations must produce the same tokens
(`same_tokens`: the fraction of generated tokens that agree).

One JSON line per measurement:
- {"impl": "jaxgrounding" | "transformers", "batch", "prompt", "new_tokens", "tokens_per_s", ...}:
  tokens_per_s = batch * new_tokens / wall time of one generate call (prefill included, median of
  `--repeats` after a warm-up call that compiles); `decode_tokens_per_s` leaves the prefill out (the
  time of a 1-token call subtracted); `peak_fraction` = model FLOPs / time / peak FLOP/s.
- {"impl": "jaxgrounding", "case": "fan_out", ...}: G = `--samples` completions of `--prompts` prompts
  drawn from one prefill per prompt (`num_samples`), against the same prompts repeated G times as
  separate rows (what a sampler without fan-out runs); "fan_out_speedup" is the ratio of their times.
  A second line samples (temperature 1, log-probabilities), as a GRPO rollout would.
- {"metric": "peak_flops"}: this CPU's peak, estimated from the best of a few large float32 jnp matmuls
  timed here, before the runs.

    python bench/rollout.py                          # batch 8 / prompt 128 and batch 32 / prompt 256
    python bench/rollout.py --cases 1x128,8x128,32x128,64x128 --skip-torch   # scaling with batch
    python bench/rollout.py --cases 32x256 --skip-torch --skip-fan-out --attention xla   # another attention
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def build_checkpoint(path: str, args) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    head_dim = args.hidden // args.heads
    section = [head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16]
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.mlp,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=0,
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=args.hidden),
        image_token_id=args.vocab - 4,
        video_token_id=args.vocab - 3,
        vision_start_token_id=args.vocab - 2,
        vision_end_token_id=args.vocab - 1,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)


def peak_flops(repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s over a few sizes (XLA:CPU, all cores)."""
    import jax
    import jax.numpy as jnp

    best = 0.0
    for n in (1024, 2048, 3072):
        a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        for _ in range(repeats):
            start = time.perf_counter()
            f(a).block_until_ready()
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def model_flops(args, batch: int, prompt: int, new_tokens: int, prompts: int | None = None) -> float:
    """Matmul FLOPs of prefilling `prompts` (default: batch) prompts and decoding batch * new_tokens tokens:
    projections and MLP of every token, the LM head once per generated token, attention scores and
    values over the visible keys."""
    prompts = batch if prompts is None else prompts
    head_dim = args.hidden // args.heads
    per_layer = args.hidden * (2 * args.hidden + 2 * args.kv_heads * head_dim) + 3 * args.hidden * args.mlp
    attn = lambda queries, keys: 4 * queries * keys * args.heads * head_dim * args.layers  # noqa: E731
    flops = 2 * per_layer * args.layers * prompts * prompt + prompts * attn(prompt, (prompt + 1) / 2)
    flops += batch * new_tokens * 2 * args.hidden * args.vocab  # LM head: prefill's last token + decode
    decoded = new_tokens - 1
    flops += batch * decoded * 2 * per_layer * args.layers + batch * attn(decoded, prompt + new_tokens / 2)
    return float(flops)


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def bench_jax(model, ids: np.ndarray, new_tokens: int, repeats: int, num_samples: int = 1, **sample):
    import jax

    import jaxgrounding.model as jm
    from jaxgrounding import sampling

    inputs = jm.ModelInputs.for_text(jax.numpy.asarray(ids))
    settings = {"temperature": 0.0, "top_p": 1.0} | {k: v for k, v in sample.items() if k != "logprobs"}
    config = sampling.SamplingConfig(max_new_tokens=new_tokens, **settings)

    def run(config=config):
        gen = sampling.generate(
            model,
            inputs,
            config,
            end_ids=(),
            rng=jax.random.key(0),
            num_samples=num_samples,
            return_logprobs=sample.get("logprobs", False),
        )
        return jax.block_until_ready(gen)

    sec, gen = timed(run, repeats)
    return sec, np.asarray(gen.tokens), run


def bench_torch(path: str, ids: np.ndarray, new_tokens: int, repeats: int):
    """Runs in a spawned process that never imports jax: in a process where XLA:CPU has run,
    torch's OpenMP matmuls ran 2x slower on 2 cores (XLA's worker threads compete with them)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_bench_torch, (path, ids, new_tokens, repeats))


def _bench_torch(path: str, ids: np.ndarray, new_tokens: int, repeats: int):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    x = torch.from_numpy(ids.astype(np.int64))

    def run(n=new_tokens):
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            return model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)

    sec, out = timed(run, repeats)
    prefill_sec, _ = timed(lambda: run(1), repeats)
    return sec, out[:, ids.shape[1] :].numpy(), prefill_sec


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--cases", default="8x128,32x256", help="batch x prompt length, comma separated")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="fan-out case: distinct prompts")
    parser.add_argument("--samples", type=int, default=8, help="fan-out case: samples per prompt (G)")
    parser.add_argument("--fan-out-prompt", type=int, default=256, help="fan-out case: prompt length")
    parser.add_argument("--attention", default="auto", help="model.attention: auto | blocked | xla | ...")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-fan-out", action="store_true")
    args = parser.parse_args()

    import jaxgrounding.model as jm

    common = dict(
        layers=args.layers,
        hidden=args.hidden,
        vocab=args.vocab,
        dtype="float32",
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
    )
    load = lambda: round(os.getloadavg()[0], 2)  # noqa: E731
    peak = peak_flops()
    print(json.dumps({"metric": "peak_flops", "gflops": round(peak / 1e9, 1), "load_1min": load()}), flush=True)
    n = args.new_tokens
    with tempfile.TemporaryDirectory() as path:
        build_checkpoint(path, args)
        model = jm.from_pretrained(path, attention=args.attention)
        for case in args.cases.split(","):
            batch, prompt = (int(v) for v in case.split("x"))
            ids = np.random.default_rng(batch).integers(0, args.vocab - 4, size=(batch, prompt)).astype(np.int32)
            sec, ours, _ = bench_jax(model, ids, n, args.repeats)
            prefill_sec, _, _ = bench_jax(model, ids, 1, args.repeats)
            shape = dict(batch=batch, prompt=prompt, new_tokens=n)
            flops = model_flops(args, batch, prompt, n)
            line = {
                "impl": "jaxgrounding",
                **shape,
                "tokens_per_s": round(batch * n / sec, 1),
                "decode_tokens_per_s": round(batch * (n - 1) / max(sec - prefill_sec, 1e-9), 1),
                "seconds": round(sec, 3),
                "prefill_seconds": round(prefill_sec, 3),
                "peak_fraction": round(flops / sec / peak, 3),
                "load_1min": load(),
                **common,
            }
            print(json.dumps(line), flush=True)
            if not args.skip_torch:
                torch_sec, theirs, torch_prefill_sec = bench_torch(path, ids, n, args.repeats)
                line = {
                    "impl": "transformers",
                    **shape,
                    "tokens_per_s": round(batch * n / torch_sec, 1),
                    "decode_tokens_per_s": round(batch * (n - 1) / max(torch_sec - torch_prefill_sec, 1e-9), 1),
                    "seconds": round(torch_sec, 3),
                    "prefill_seconds": round(torch_prefill_sec, 3),
                    "peak_fraction": round(flops / torch_sec / peak, 3),
                    "same_tokens": float((theirs == ours).mean()),
                    "jaxgrounding_speedup": round(torch_sec / sec, 2),
                    "jaxgrounding_decode_speedup": round((torch_sec - torch_prefill_sec) / (sec - prefill_sec), 2),
                    "load_1min": load(),
                    **common,
                }
                print(json.dumps(line), flush=True)
        if args.skip_fan_out:
            return
        p, g, t = args.prompts, args.samples, args.fan_out_prompt
        ids = np.random.default_rng(1).integers(0, args.vocab - 4, size=(p, t)).astype(np.int32)
        for sample in ({}, {"temperature": 1.0, "logprobs": True}):
            fan_sec, fan_tokens, _ = bench_jax(model, ids, n, args.repeats, num_samples=g, **sample)
            sep_sec, sep_tokens, _ = bench_jax(model, np.repeat(ids, g, axis=0), n, args.repeats, **sample)
            line = {
                "impl": "jaxgrounding",
                "case": "fan_out",
                "prompts": p,
                "samples": g,
                "batch": p * g,
                "prompt": t,
                "new_tokens": n,
                "sampling": "greedy" if not sample else "temperature 1, logprobs",
                "tokens_per_s": round(p * g * n / fan_sec, 1),
                "separate_tokens_per_s": round(p * g * n / sep_sec, 1),
                "seconds": round(fan_sec, 3),
                "separate_seconds": round(sep_sec, 3),
                "fan_out_speedup": round(sep_sec / fan_sec, 2),
                "peak_fraction": round(model_flops(args, p * g, t, n, prompts=p) / fan_sec / peak, 3),
                "load_1min": load(),
                **common,
            }
            if not sample:  # greedy: the G samples of a prompt are its separate rows' tokens
                line["same_tokens"] = float((fan_tokens == sep_tokens).mean())
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
