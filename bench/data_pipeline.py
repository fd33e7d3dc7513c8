"""Pipeline throughput on the synthetic set with 0 and 2 decode worker processes.

  python bench/data_pipeline.py [--root DIR] [--batch-size 8]

Prints one JSON line per worker count: samples per second over one epoch of train.
"""

import argparse
import json
import os
import time

from jaxgrounding.data import PipelineConfig, ensure_synthetic_dataset, make_pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=os.path.expanduser("~/.cache/jaxgrounding/synthetic"))
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    start = time.perf_counter()
    samples = ensure_synthetic_dataset(args.root)["train"]
    print(
        json.dumps(
            {"event": "synthetic_ready", "samples": len(samples), "seconds": round(time.perf_counter() - start, 1)}
        )
    )
    for workers in (0, 2):
        config = PipelineConfig(batch_size=args.batch_size, worker_count=workers, shard_index=0, shard_count=1)
        start = time.perf_counter()
        it = iter(make_pipeline(samples, config))
        count = sum(int(batch["valid"].sum()) for batch in it)
        seconds = time.perf_counter() - start
        it.close()
        print(
            json.dumps(
                {
                    "bench": "pipeline",
                    "workers": workers,
                    "batch_size": args.batch_size,
                    "samples": count,
                    "seconds": round(seconds, 2),
                    "samples_per_s": round(count / seconds, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
