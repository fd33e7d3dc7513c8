"""A real dataset end to end: a micro Charades-STA in the upstream layout (annotation txt files, the Charades
csv files, mp4 videos from the synthetic video writer) trains and evaluates through `data=charades_sta`."""

import csv
import json
import os

import numpy as np

from configs import meco
from jaxgrounding.data import synthetic, synthetic_scenes
from jaxgrounding.train import train_and_evaluate

CSV_FIELDS = ("id", "subject", "scene", "quality", "relevance", "verified", "script", "objects", "descriptions",
              "actions", "length")  # fmt: skip


def write_charades_sta(root, split_sizes={"train": 4, "test": 2}, seed=0):
    """root/charades_sta_{train,test}.txt ("VID start end##sentence."), root/Charades_v1_{train,test}.csv (one row
    per video, `length` in seconds) and root/Charades_v1_480/VID.mp4, as the downloads unpack."""
    config = synthetic_scenes.SceneConfig(min_duration=8.0, max_duration=12.0, max_events=2)
    (root / "Charades_v1_480").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for split, count in split_sizes.items():
        lines, rows = [], []
        for index in range(count):
            vid = f"{split[:2].upper()}{index:03d}"  # Charades ids are 5 characters, e.g. AO8RW
            scene = synthetic_scenes.sample_scene(rng, config)
            synthetic.write_mp4(str(root / "Charades_v1_480" / f"{vid}.mp4"), synthetic_scenes.render(scene), scene.fps)
            for event in scene.events:
                query = synthetic_scenes.describe(scene, event, rng, task_phrasing=0.0).query
                lines.append(f"{vid} {event.start:.1f} {event.end:.1f}##{query}.")
            rows.append({
                "id": vid, "subject": "HR43", "scene": "Kitchen", "quality": "6", "relevance": "7", "verified": "Yes",
                "script": "A person opens a cabinet, then, smiling, closes it.", "objects": "cabinet;door",
                "descriptions": "A person is in a kitchen.", "actions": "c092 1.20 4.50;c147 0.00 3.10",
                "length": f"{scene.duration:.2f}",
            })  # fmt: skip
        (root / f"charades_sta_{split}.txt").write_text("\n".join(lines) + "\n")
        with open(root / f"Charades_v1_{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)


def test_charades_sta_preset_trains_and_evaluates(tmp_path):
    write_charades_sta(tmp_path / "charades")
    config = meco.get_config("data=charades_sta")
    config.data.root = str(tmp_path / "charades")
    config.data.max_frames = 12
    config.model.tiny = {"hidden": 64, "layers": 2, "vision_depth": 1, "vision_hidden": 32}
    config.train.batch_size = 2
    config.train.steps = 3
    config.train.log_every = 1
    config.train.checkpoint_every = 3
    config.train.export = False
    config.eval.batch_size = 2
    config.sampling.max_new_tokens = 8
    config.mesh.fsdp = 2
    workdir = tmp_path / "run"
    result = train_and_evaluate(config, str(workdir))

    assert set(result) >= {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"}
    logged = [json.loads(line) for line in open(workdir / "train_metrics.jsonl")]
    assert [m["step"] for m in logged] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in logged)
    with open(workdir / "eval" / "predictions.jsonl") as f:
        predictions = [json.loads(line) for line in f]
    test_lines = (tmp_path / "charades" / "charades_sta_test.txt").read_text().splitlines()
    assert len(predictions) == len(test_lines)  # every test query evaluated, none rejected
    assert {p["id"].split(":")[0] for p in predictions} == {"TE000", "TE001"}
    assert os.listdir(workdir / "checkpoints") == ["3"]
