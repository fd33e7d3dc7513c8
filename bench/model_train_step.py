"""Train-step throughput of the JAX VideoLLM against transformers' PyTorch model, same config.

One step = forward + backward + AdamW update of a causal-LM loss over text tokens, float32 on
CPU. Both frameworks get the same checkpoint (built by transformers) and the same batches; the
step count is timed after warm-up (compilation for JAX). Prints one JSON line per framework and
one with the ratio.

    python bench/model_train_step.py                      # 4 layers, hidden 512, seq 1024, batch 2
    python bench/model_train_step.py --layers 2 --seq 256 --steps 3   # quick look
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
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.mlp,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            max_position_embeddings=32768,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [
                    head_dim // 8,
                    3 * head_dim // 16,
                    head_dim // 2 - head_dim // 8 - 3 * head_dim // 16,
                ],
            },
        ),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=args.hidden),
        image_token_id=args.vocab - 4,
        video_token_id=args.vocab - 3,
        vision_start_token_id=args.vocab - 2,
        vision_end_token_id=args.vocab - 1,
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)


def bench_jax(path: str, batches: list[np.ndarray], steps: int, remat: str) -> dict:
    import jax
    from lm_step import lm_train_step

    import jaxgrounding.model as jm

    model = jm.from_pretrained(path, remat_policy=remat)
    step, params, opt_state = lm_train_step(model)
    b, t = batches[0].shape

    start = time.perf_counter()
    params, opt_state, loss = step(params, opt_state, batches[0])
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(steps):
        start = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, batches[(i + 1) % len(batches)])
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
    sec = float(np.median(times))
    return {
        "framework": "jax",
        "remat": remat,
        "step_s": sec,
        "tokens_per_s": b * t / sec,
        "first_step_s": compile_s,
        "loss": float(loss),
    }


def bench_torch(path: str, batches: list[np.ndarray], steps: int) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    b, t = batches[0].shape

    def step(ids):
        ids = torch.from_numpy(ids.astype(np.int64))
        logits = model(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss)

    step(batches[0])
    times = []
    for i in range(steps):
        start = time.perf_counter()
        loss = step(batches[(i + 1) % len(batches)])
        times.append(time.perf_counter() - start)
    sec = float(np.median(times))
    return {
        "framework": "torch",
        "step_s": sec,
        "tokens_per_s": b * t / sec,
        "loss": loss,
        "threads": torch.get_num_threads(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--remat", default="dots_with_no_batch_dims_saveable", help="decoder remat policy (ModelConfig.remat_policy)"
    )
    parser.add_argument("--skip-torch", action="store_true")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, args.vocab - 4, size=(args.batch, args.seq)).astype(np.int32) for _ in range(3)]
    common = {
        "layers": args.layers,
        "hidden": args.hidden,
        "seq": args.seq,
        "batch": args.batch,
        "dtype": "float32",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    with tempfile.TemporaryDirectory() as path:
        build_checkpoint(path, args)
        if not args.skip_torch:
            torch_result = {**common, **bench_torch(path, batches, args.steps)}
            print(json.dumps(torch_result), flush=True)
        jax_result = {**common, **bench_jax(path, batches, args.steps, args.remat)}
        print(json.dumps(jax_result), flush=True)
    if args.skip_torch:
        return
    print(
        json.dumps(
            {
                **common,
                "metric": "jax_over_torch_tokens_per_s",
                "ratio": jax_result["tokens_per_s"] / torch_result["tokens_per_s"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
