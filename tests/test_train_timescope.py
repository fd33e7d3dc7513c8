"""configs/timescope.py end to end on a micro setting: streamed SFT (coarse and fine samples),
coarse-to-fine evaluation, exact resume, and `ground --memory streaming`."""

import json
import os

import numpy as np
import pytest

from configs import timescope
from jaxgrounding import metrics
from jaxgrounding.train import train_and_evaluate
from tests.multiprocess_train import check_two_processes_train_like_one, losses
from tests.test_train import ground


def micro_config(data_root):
    config = timescope.get_config()
    config.data.root = str(data_root)
    config.data.synthetic_train_videos = 8
    config.data.synthetic_eval_videos = 2
    config.data.scene.min_duration = 24.0
    config.data.scene.max_duration = 32.0
    config.data.scene.max_events = 1
    config.data.max_frames = 32
    config.model.tiny = {"hidden": 64, "layers": 2, "vision_depth": 1, "vision_hidden": 32}
    config.streaming.segment_frames = 4
    config.streaming.hvr_temporal = 2
    config.coarse_to_fine.max_reload_segments = 2
    config.train.batch_size = 2
    config.train.steps = 4
    config.train.log_every = 1
    config.train.checkpoint_every = 2
    config.eval.batch_size = 2
    config.sampling.max_new_tokens = 8
    config.mesh.fsdp = 2  # data parallel over 2 of the 8 test devices
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("timescope")
    workdir = str(root / "run")
    return root, workdir, train_and_evaluate(micro_config(root / "data"), workdir)


def test_streamed_training_evaluates_coarse_and_fine(run):
    _, workdir, result = run
    assert {"R1@0.5", "mIoU", "coarse_R1@0.5", "coarse_mIoU", "single_R1@0.5", "single_mIoU"} <= set(result)
    with open(os.path.join(workdir, "eval", "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == result["samples"] > 0
    for row in rows:
        assert {"coarse_windows", "reloaded_segments", "pred_windows", "reload_capped", "coarse_score"} <= set(row)
        assert len(row["reloaded_segments"]) <= 2 and 0.0 <= row["coarse_score"] <= 1.0
        # The coarse stage reads windows at the HVR's resolution: slots of hvr_temporal = 2 grids of 2 s.
        for start, end in row["coarse_windows"]:
            assert start % 4.0 == pytest.approx(0.0) and (end % 4.0 == pytest.approx(0.0) or end == row["duration"])
    assert any(row["coarse_windows"] for row in rows)
    # Synthetic queries: the figures are also split by phrasing, and the two parts hold every sample.
    assert result.get("explicit_samples", 0) + result.get("task_oriented_samples", 0) == result["samples"]
    for prefix, key in (("", "pred_windows"), ("coarse_", "coarse_windows"), ("single_", "single_windows")):
        again = metrics.grounding_metrics([r[key] for r in rows], [r["gt_windows"] for r in rows], inclusive=True)
        for name, value in again.items():
            assert result[prefix + name] == pytest.approx(value)
    assert all(np.isfinite(v) for v in losses(workdir).values())


def test_streamed_run_resumes_exactly(run):
    root, workdir, _ = run
    resumed = str(root / "resumed")
    config = micro_config(root / "data")
    assert train_and_evaluate(config, resumed, stop_after=3) == {}
    train_and_evaluate(config, resumed)
    want, got = losses(workdir), losses(resumed)
    assert got[3] == want[3] and got[4] == want[4]


def test_ground_command_streams(run, tmp_path):
    root, workdir, _ = run
    plot = tmp_path / "coarse_to_fine.png"
    answer = ground(root, workdir, "--memory", "streaming", "--plot", str(plot))
    assert len(answer["coarse"]["reloaded_segments"]) <= 2 and isinstance(answer["coarse"]["reload_capped"], bool)
    assert plot.stat().st_size > 10_000


def test_two_processes_train_like_one(run):
    """Streamed steps on process-local rows (the coarse-to-fine draws and the padded shapes agree across processes),
    coarse-to-fine evaluation shared between two processes, and the export of parameters sharded across them. Checkpoints across process counts: the MeCo test."""
    root, workdir, result = run
    check_two_processes_train_like_one(
        "timescope", root, workdir, result, micro_config(root / "data"), evaluate=True, across_process_counts=False
    )


def test_hvr_tradeoff_bench(run):
    """bench/hvr_tradeoff.py on the micro workdir: at the trained rate it reproduces the run's own evaluation, the
    streamed memory halves from r = 1 to r = 2 while the DVR stays, a rate the segments cannot take is reported,
    and the plot is drawn."""
    import importlib.util

    _, workdir, result = run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_hvr_tradeoff", os.path.join(root, "bench", "hvr_tradeoff.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--workdir", workdir, "--rates", "1,2,8", "--spatial", "1"])
    assert [r["hvr_temporal"] for r in rows] == [1, 2]  # r = 8 does not divide segment_frames = 4
    low, trained = rows
    for key in ("R1@0.5", "mIoU", "coarse_R1@0.5", "coarse_mIoU"):
        assert trained[key] == pytest.approx(result[key])
    assert low["memory_bytes"] == 2 * trained["memory_bytes"] and low["dvr_bytes"] == trained["dvr_bytes"] > 0
    assert os.path.getsize(os.path.join(workdir, "hvr_tradeoff.png")) > 10_000
