"""Decode speed: decord vs PyAV sampling 1 fps from a 10-minute 30 fps 640x360 mp4.

  python bench/data_video.py [--cache DIR]

Prints one JSON line per backend: frames returned per second of wall time.
"""

import argparse
import json
import os
import time

import numpy as np

from jaxgrounding.data import read_video
from jaxgrounding.data.synthetic import write_mp4

MINUTES, FPS, HEIGHT, WIDTH = 10, 30, 360, 640


def make_video(path: str) -> None:
    """A moving square on a gradient, streamed to the encoder (18,000 frames)."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([xs * 255 // WIDTH, ys * 255 // HEIGHT, np.full_like(xs, 96)], -1)
    base = base.astype(np.uint8)

    def frames():
        for k in range(MINUTES * 60 * FPS):
            frame = base.copy()
            x = (k * 4) % (WIDTH - 60)
            frame[150:210, x : x + 60] = (255, 255 - k % 256, k % 256)
            yield frame

    write_mp4(path, frames(), FPS, crf=23)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default=os.path.expanduser("~/.cache/jaxgrounding/bench"))
    args = parser.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    path = os.path.join(args.cache, f"bench_{MINUTES}min_{FPS}fps_{WIDTH}x{HEIGHT}.mp4")
    if not os.path.exists(path):
        start = time.perf_counter()
        make_video(path)
        print(json.dumps({"event": "generated", "path": path, "seconds": round(time.perf_counter() - start, 1)}))
    for backend in ("decord", "pyav"):
        read_video(path, fps=1.0, max_frames=2, backend=backend)  # Warm the page cache.
        start = time.perf_counter()
        video = read_video(path, fps=1.0, backend=backend)
        seconds = time.perf_counter() - start
        print(
            json.dumps(
                {
                    "bench": "read_video",
                    "backend": backend,
                    "video": f"{MINUTES}min {FPS}fps {WIDTH}x{HEIGHT} h264",
                    "sample_fps": 1.0,
                    "frames": len(video.frames),
                    "seconds": round(seconds, 2),
                    "frames_per_s": round(len(video.frames) / seconds, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
