"""TimeScope's compression trade-off: one trained workdir evaluated at several HVR rates.

    python bench/hvr_tradeoff.py --workdir runs/ts [--rates 1,2,4,8] [--spatial 1,2] [--max-samples N]

For every (temporal rate r, spatial pooling s) the latest checkpoint of a TimeScope workdir (trained by
`jaxgrounding.train --config configs/timescope.py`) grounds the held-out split with the HVR pooled at that rate
(`streaming.hvr_temporal`, `streaming.hvr_spatial`; the trained weights are the same, only the memory changes),
coarse stage and fine stage, and prints one JSON line:

    {"hvr_temporal": r, "hvr_spatial": s, "coarse_R1@0.5": .., "coarse_R1@0.7": .., "coarse_mIoU": ..,
     "R1@0.5": .., "R1@0.7": .., "mIoU": .., "memory_bytes": .., "dvr_bytes": .., "peak_device_bytes": ..,
     "seconds": .., "samples": ..}

memory_bytes: the keys and values of the streamed memory one video answers from (the HVR slots of
`max_segments` segments and any recent segments, every layer; the short text prefix left out), the
device-resident state that shrinks as r grows;
dvr_bytes: the full keys and values of the longest evaluated video's segments (the DVR, kept off-device
where `streaming.dvr_placement` allows), independent of r; peak_device_bytes: the device's own peak counter
where the backend has one (GPU/TPU), null on CPU. Then draws DIR/hvr_tradeoff.png: accuracy against memory,
coarse and fine, one point per setting. The rows that already exist in DIR/hvr_tradeoff/*.json are reused
(delete them to measure again).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # noqa: E402  (run from a clone)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxgrounding import evaluation  # noqa: E402
from jaxgrounding.memory.layout import BufferLayout, StreamingConfig  # noqa: E402
from jaxgrounding.training import experiment  # noqa: E402


def _kv_bytes(model_config, tokens: int, dtype_bytes: int) -> int:
    text = model_config.text
    return int(text.num_layers * 2 * tokens * text.num_kv_heads * text.head_dim * dtype_bytes)


def memory_figures(config, model_config, samples) -> dict:
    """Sizes of the streamed memory (per video) and of the longest video's DVR, from the buffer layout."""
    streaming = StreamingConfig.from_config(config)
    h, w = config.data.frame_size
    merge = model_config.vision.spatial_merge_size
    tokens_per_frame = (h // model_config.vision.patch_size // merge) * (w // model_config.vision.patch_size // merge)
    layout = BufferLayout.build(streaming, 0, tokens_per_frame)
    dtype_bytes = np.dtype(config.model.dtype).itemsize
    longest = max(s.duration for s in samples)
    frames = min(int(np.floor(longest * config.data.fps)) + 1, config.data.max_frames)
    grids = -(-frames // model_config.vision.temporal_patch_size)
    segments = min(-(-grids // streaming.segment_frames), streaming.max_segments)
    return {
        "memory_bytes": _kv_bytes(model_config, layout.size, dtype_bytes),
        "dvr_bytes": _kv_bytes(model_config, segments * layout.segment_tokens, dtype_bytes),
    }


def _peak_device_bytes():
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def measure(config, workdir: str, samples, out_dir: str) -> dict:
    model, tokenizer, checkpoint_dir, _ = experiment.restore_model(config, workdir)
    tick = time.perf_counter()
    result = evaluation.evaluate(model, tokenizer, samples, checkpoint_dir, config, out_dir)
    seconds = time.perf_counter() - tick
    keys = ("R1@0.5", "R1@0.7", "mIoU")
    row = {
        "hvr_temporal": int(config.streaming.hvr_temporal),
        "hvr_spatial": int(config.streaming.hvr_spatial),
        **{f"coarse_{k}": result[f"coarse_{k}"] for k in keys},
        **{k: result[k] for k in keys},
        **memory_figures(config, model.llm.config, samples),
        "peak_device_bytes": _peak_device_bytes(),
        "seconds": round(seconds, 2),
        "samples": result["samples"],
    }
    return row


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("R1@0.5", "mIoU")):
        for spatial in sorted({r["hvr_spatial"] for r in rows}):
            chosen = sorted((r for r in rows if r["hvr_spatial"] == spatial), key=lambda r: r["memory_bytes"])
            mib = [r["memory_bytes"] / 2**20 for r in chosen]
            ax.plot(mib, [r[f"coarse_{metric}"] for r in chosen], "o--", label=f"coarse, spatial {spatial}")
            ax.plot(mib, [r[metric] for r in chosen], "s-", label=f"fine, spatial {spatial}")
            for r, x in zip(chosen, mib):
                ax.annotate(f"r={r['hvr_temporal']}", (x, r[metric]), textcoords="offset points", xytext=(4, 4))
        ax.set_xscale("log")
        ax.set_xlabel("streamed memory per video (MiB)")
        ax.set_ylabel(f"{metric} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("TimeScope: HVR compression vs accuracy (coarse stage on HVR, fine stage with reloaded DVR)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a TimeScope workdir written by jaxgrounding.train")
    parser.add_argument("--rates", default="1,2,4,8", help="HVR temporal rates r")
    parser.add_argument("--spatial", default="1,2", help="HVR spatial pooling factors")
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate the first N held-out samples (0: all)")
    args = parser.parse_args(argv)

    base = experiment.load_workdir_config(args.workdir)
    if base.memory != "streaming":
        raise SystemExit(f"{args.workdir}: trained with memory={base.memory!r}; the trade-off needs a streamed workdir")
    _, samples = experiment.load_samples(base, args.workdir)
    if args.max_samples:
        samples = samples[: args.max_samples]
    cache = os.path.join(args.workdir, "hvr_tradeoff")
    os.makedirs(cache, exist_ok=True)
    rows = []
    for spatial in (int(s) for s in args.spatial.split(",")):
        for rate in (int(r) for r in args.rates.split(",")):
            name = os.path.join(cache, f"r{rate}_s{spatial}_n{len(samples)}.json")
            if os.path.isfile(name):
                with open(name) as f:
                    row = json.load(f)
            else:
                config = base.copy_and_resolve_references()
                with config.unlocked():
                    config.streaming.hvr_temporal = rate
                    config.streaming.hvr_spatial = spatial
                    config.eval.max_samples = 0
                    config.eval.single_stage = False  # one causal pass does not depend on the HVR rate
                try:
                    row = measure(config, args.workdir, samples, os.path.join(cache, f"r{rate}_s{spatial}"))
                except ValueError as e:  # e.g. a spatial factor that does not divide the tokens of a frame
                    print(json.dumps({"hvr_temporal": rate, "hvr_spatial": spatial, "error": str(e)}), flush=True)
                    continue
                with open(name, "w") as f:
                    json.dump(row, f)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if rows:
        path = os.path.join(args.workdir, "hvr_tradeoff.png")
        plot(rows, path)
        print(json.dumps({"plot": path}), flush=True)
    return rows


if __name__ == "__main__":
    main()
