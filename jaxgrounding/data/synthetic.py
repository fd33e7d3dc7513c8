"""The built-in synthetic grounding set: written to disk once, reused afterwards.

``ensure_synthetic_dataset(root, config)`` renders scenes (see ``synthetic_scenes``),
encodes them as real h264/yuv420p mp4 files with PyAV (so training exercises the same
decode path as real data) and writes one generic-JSONL annotation file per split.
``root/manifest.json`` records the config (every SceneConfig field included, e.g.
``clock``, and GENERATOR_VERSION) and the files; a second call with the same config
only reads the annotations, any difference (a knob changed, or a manifest written before
a knob existed) wipes and regenerates. Output is
a pure function of the config (seeded per split and video).
"""

import dataclasses
import fractions
import json
import os
import shutil
import tempfile
from typing import Any, Iterable

import av
import numpy as np
import tqdm

from jaxgrounding.data import sources
from jaxgrounding.data import synthetic_scenes as scenes
from jaxgrounding.data.sample import Sample

# Bump when rendering or text changes, so stale datasets on disk are regenerated.
GENERATOR_VERSION = 5
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What to generate.

    splits: number of videos per split; each video gives one sample per event.
    scene: scene family (durations, frame size, fps, objects, events).
    seed: everything derives from it.
    crf: x264 quality; low so thin shapes keep their colours at 64 px.
    """

    splits: tuple[tuple[str, int], ...] = (("train", 500), ("val", 100))
    scene: scenes.SceneConfig = scenes.SceneConfig()
    seed: int = 0
    crf: int = 18

    def to_json(self) -> dict[str, Any]:
        return {"version": GENERATOR_VERSION, **dataclasses.asdict(self)}


def long_video_config(num_videos: int = 20, seed: int = 0) -> SyntheticConfig:
    """Hundreds of frames per video (5-10 minutes at 1 fps), for long-video models."""
    return SyntheticConfig(
        splits=(("train", num_videos), ("val", max(1, num_videos // 4))),
        scene=scenes.SceneConfig(
            min_duration=300.0,
            max_duration=600.0,
            min_objects=3,
            max_objects=4,
            max_events=4,
            min_event_fraction=0.02,
            max_event_fraction=0.08,
        ),
        seed=seed,
    )


def write_mp4(path: str, frames: Iterable[np.ndarray], fps: float, crf: int = 18) -> None:
    """Encodes frames ([H, W, 3] uint8 each, even H and W) as h264/yuv420p at ``fps``.

    ``frames`` may be a generator, so long videos are never held in memory whole.
    """
    rate = fractions.Fraction(fps).limit_denominator(1001)
    tmp = path + ".tmp.mp4"
    # Single-threaded x264 so the bytes do not depend on the machine's core count.
    with av.open(tmp, "w") as container:
        stream = container.add_stream(
            "libx264", rate=rate, options={"crf": str(crf), "preset": "veryfast", "threads": "1"}
        )
        stream.pix_fmt = "yuv420p"
        for k, image in enumerate(frames):
            if k == 0:
                stream.width, stream.height = image.shape[1], image.shape[0]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    # Rename last: an interrupted run never leaves a half-written video behind a name.
    os.replace(tmp, path)


def _generate_split(root: str, split: str, count: int, config: SyntheticConfig) -> str:
    video_dir = os.path.join(root, split)
    os.makedirs(video_dir, exist_ok=True)
    lines = []
    for index in tqdm.trange(count, desc=f"synthetic {split}", leave=False):
        rng = np.random.default_rng([config.seed, _SPLIT_IDS.get(split, 3), index])
        scene = scenes.sample_scene(rng, config.scene)
        name = f"{index:06d}.mp4"
        write_mp4(os.path.join(video_dir, name), scenes.render(scene), scene.fps, config.crf)
        for k, event in enumerate(scene.events):
            text = scenes.describe(scene, event, rng, config.scene.task_phrasing)
            lines.append(
                json.dumps(
                    {
                        "id": f"{split}/{index:06d}/{k}",
                        "video": os.path.join(split, name),
                        "duration": scene.duration,
                        "query": text.query,
                        "windows": [[event.start, event.end]],
                        "captions": [text.caption],
                        "verbs": list(text.verbs),
                        "task": "grounding",
                    }
                )
            )
    annotation = os.path.join(root, f"{split}.jsonl")
    with open(annotation, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return annotation


def _generate_atomically(root: str, config: SyntheticConfig, wanted: dict) -> None:
    """Generates the set beside ``root`` and renames it into place, so a reader sees the old set or the
    complete new one, never a half-written or half-deleted one."""
    parent, name = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=parent)
    try:
        files = []
        for split, count in config.splits:
            _generate_split(staging, split, count, config)
            files.append(f"{split}.jsonl")
            files.extend(os.path.join(split, f"{i:06d}.mp4") for i in range(count))
        with open(os.path.join(staging, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump({"config": wanted, "files": files}, f, indent=1)
        if os.path.exists(root) and os.listdir(root):
            # A different set under the same root (an explicit data.root): swapped, then the old one deleted.
            old = tempfile.mkdtemp(prefix=f"{name}.old-", dir=parent)
            os.rename(root, os.path.join(old, name))
            os.rename(staging, root)
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            os.rename(staging, root)  # also replaces an empty directory
        except OSError:
            if not os.path.exists(os.path.join(root, "manifest.json")):
                raise
            # Another process published the same set first: keep theirs.
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_synthetic_dataset(
    root: str | os.PathLike[str], config: SyntheticConfig = SyntheticConfig()
) -> dict[str, list[Sample]]:
    """Generates the dataset under ``root`` unless the manifest matches; returns samples.

    Returns:
      ``{split: [Sample, ...]}`` with absolute video paths.
    """
    root = os.path.abspath(os.fspath(root))
    manifest_path = os.path.join(root, "manifest.json")
    wanted = config.to_json()
    manifest = None
    if os.path.exists(manifest_path):
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    complete = manifest is not None and manifest.get("config") == json.loads(json.dumps(wanted))
    if complete:
        complete = all(os.path.exists(os.path.join(root, p)) for p in manifest["files"])
    if not complete:
        # Only ever replace what looks like our own output.
        if os.path.exists(root) and os.listdir(root) and not os.path.exists(manifest_path):
            raise FileExistsError(f"{root} is not empty and has no synthetic manifest")
        _generate_atomically(root, config, wanted)
    return {
        split: sources.load_annotations(os.path.join(root, f"{split}.jsonl"), "jsonl", video_root=root).samples
        for split, _ in config.splits
    }
