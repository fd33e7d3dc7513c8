"""End to end: the train command on a micro synthetic config trains, checkpoints, evaluates,
and a killed-then-resumed run reproduces the uninterrupted run's per-step losses."""

import json
import os

import numpy as np
import pytest

from configs import meco
from jaxgrounding import metrics
from jaxgrounding.train import train_and_evaluate
from tests.multiprocess_train import check_two_processes_train_like_one, losses


def micro_config(data_root):
    config = meco.get_config()
    config.data.root = str(data_root)
    config.data.synthetic_train_videos = 12
    config.data.synthetic_eval_videos = 3
    config.data.scene = {"min_duration": 8.0, "max_duration": 12.0, "max_events": 1}
    config.data.max_frames = 12
    config.model.tiny = {"hidden": 64, "layers": 2, "vision_depth": 1, "vision_hidden": 32}
    config.train.batch_size = 4
    config.train.steps = 6
    config.train.log_every = 1
    config.train.checkpoint_every = 3
    config.eval.batch_size = 4
    config.sampling.max_new_tokens = 8
    config.mesh.fsdp = 2  # data parallel over 2 of the 8 test devices
    return config


def first_batch(config, workdir: str, batch_size: int = 2):
    """(checkpoint dir, first training batch) of `config`'s synthetic set, through the train command's transform
    (streamed configs: cut for streaming): the base checkpoint and the data are created on first use, as the
    train command does."""
    from jaxgrounding import data as data_lib
    from jaxgrounding import settings
    from jaxgrounding.training import experiment

    train, _ = experiment.load_samples(config, workdir)
    checkpoint = experiment.resolve_checkpoint(config, workdir, train)
    transform = experiment.train_transform(config, checkpoint, train)
    pipeline = settings.pipeline_config(config, train=True, batch_size=batch_size)
    return checkpoint, next(iter(data_lib.make_pipeline(train, pipeline, transform)))


def ground(root, workdir: str, *flags: str) -> dict:
    """Runs `jaxgrounding.ground --json` on the first evaluated video of `workdir`; its answer."""
    import subprocess
    import sys

    with open(os.path.join(workdir, "eval", "predictions.jsonl")) as f:
        first = json.loads(f.readline())
    video = os.path.join(root, "data", first["id"].rsplit("/", 1)[0] + ".mp4")
    command = [sys.executable, "-m", "jaxgrounding.ground", "--model", workdir, "--video", video]
    command += ["--query", "when is the red circle bigger?", "--json", *flags]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["windows"] and all(
        0 <= w["start"] <= w["end"] <= answer["duration"] + 1e-6 for w in answer["windows"]
    )
    return answer




@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    workdir = str(root / "run")
    result = train_and_evaluate(micro_config(root / "data"), workdir)
    return root, workdir, result


def test_train_writes_checkpoints_metrics_and_predictions(uninterrupted):
    _, workdir, result = uninterrupted
    assert set(result) >= {"R1@0.3", "R1@0.5", "R1@0.7", "mIoU"}
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == "6"
    with open(os.path.join(workdir, "eval", "predictions.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == result["samples"] > 0
    assert all({"id", "duration", "gt_windows", "pred_windows"} <= set(r) for r in rows)
    # metrics recomputed from predictions.jsonl agree with metrics.json
    again = metrics.grounding_metrics(
        [r["pred_windows"] for r in rows], [r["gt_windows"] for r in rows], inclusive=True
    )
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        saved = json.load(f)
    for key, value in again.items():
        assert saved[key] == pytest.approx(value)
    assert all(np.isfinite(v) for v in losses(workdir).values())


def test_killed_and_resumed_run_reproduces_losses(uninterrupted):
    root, workdir, _ = uninterrupted
    resumed = str(root / "resumed")
    config = micro_config(root / "data")
    assert train_and_evaluate(config, resumed, stop_after=4) == {}  # "killed" after step 4; last save at 3
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["3"]
    train_and_evaluate(config, resumed)  # resumes from step 3
    want, got = losses(workdir), losses(resumed)
    for step in range(4, 7):
        assert got[step] == want[step], step
    # The data counts (samples read, skipped) are part of the checkpointed iterator state: neither lost nor doubled.
    counts = {
        name: {r["step"]: (r["data_read"], r["data_skipped"]) for r in map(json.loads, open(os.path.join(w, "train_metrics.jsonl")))}
        for name, w in (("want", workdir), ("got", resumed))
    }
    assert counts["got"] == counts["want"] == {s: (4 * s, 0) for s in range(1, 7)}
    # The resumed run replayed step 4: its row replaces the killed run's, none is duplicated.
    with open(os.path.join(resumed, "train_metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]


def test_evaluate_from_latest_checkpoint_matches_training_eval(uninterrupted):
    from jaxgrounding import evaluation
    from jaxgrounding.training import experiment

    root, workdir, result = uninterrupted
    config = micro_config(root / "data")
    _, eval_samples = experiment.load_samples(config, workdir)
    model, tokenizer, checkpoint_dir, step = experiment.restore_model(config, workdir)
    assert step == 6
    again = evaluation.evaluate(model, tokenizer, eval_samples, checkpoint_dir, config, str(root / "eval_again"))
    for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU"):
        assert again[key] == pytest.approx(result[key])


def test_ground_command_prints_windows_and_plots(uninterrupted, tmp_path):
    root, workdir, _ = uninterrupted
    plot = tmp_path / "similarity.png"
    ground(root, workdir, "--plot", str(plot))
    assert plot.stat().st_size > 10_000


def test_two_processes_train_like_one(uninterrupted):
    """The pod path: process-local batches over two processes, and checkpoints moving between process counts
    (two processes resume a one-process checkpoint and vice versa). Evaluation on two processes: the TimeScope test."""
    root, workdir, result = uninterrupted
    check_two_processes_train_like_one(
        "meco", root, workdir, result, micro_config(root / "data"), evaluate=False, across_process_counts=True
    )


def test_one_process_data_failure_stops_every_process(tmp_path):
    """Process 1's every video fails, process 0's read fine: process 1 hits the failure cap alone, and both stop
    with its reasons within a bounded time, instead of process 0 waiting forever in the step's collectives."""
    import time

    from tests.multiprocess_train import start_processes

    tick = time.perf_counter()
    codes, outputs = start_processes(
        "meco_broken_on_1", str(tmp_path / "data"), [(str(tmp_path / "run"), None)], timeout=120
    )
    for code, output in zip(codes, outputs):
        assert code != 0, output[-4000:]
        assert "DataFailureError: data failure, every process stops:\nprocess 1: the last 100 samples read all failed" in output, output[-4000:]
        assert "decode: file does not exist" in output
    assert time.perf_counter() - tick < 120


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.steps", -5, r"train.steps=-5: must be an integer >= 1"),
        ("train.batch_size", 0, r"train.batch_size=0: must be an integer >= 1"),
        ("model.dtype", "float16", r"model.dtype='float16': supported are \['bfloat16', 'float32'\]"),
        ("data.on_bad_line", "ignore", r"data.on_bad_line='ignore': must be 'raise' or 'skip'"),
    ],
)
def test_bad_config_values_are_named_with_what_is_allowed(tmp_path, key, value, message):
    from jaxgrounding.config import set_dotted

    config = micro_config(tmp_path / "data")
    set_dotted(config, key, value)
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_commands_refuse_bad_arguments():
    """One interpreter for the flag checks of the commands (absl parses them before main runs)."""
    import subprocess
    import sys

    script = """
import sys
from absl import flags
which = sys.argv[1]
if which == "ground":
    import jaxgrounding.ground
else:
    import jaxgrounding.train
for argv in sys.argv[2:]:
    try:
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["prog", *argv.split()])
        flags.FLAGS.validate_all_flags()
        print("ACCEPTED", argv)
    except flags.Error as e:
        print("REFUSED", argv, "|", e)
"""
    common = "--model m --video v --query q"
    out = subprocess.run(
        [sys.executable, "-c", script, "ground", f"{common} --fps 1e9", f"{common} --fps 0", f"{common} --fps 2"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "REFUSED --model m --video v --query q --fps 1e9 | flag --fps=1e9: 1000000000.0 is not a number in the range [0.0, 240.0]" in out, out
    assert "REFUSED --model m --video v --query q --fps 0 | flag --fps=0.0: --fps must be > 0" in out, out
    assert "ACCEPTED --model m --video v --query q --fps 2" in out, out
    out = subprocess.run(
        [sys.executable, "-c", script, "train", "--workdir w"], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    assert "REFUSED --workdir w | flag --config=None: Flag --config must have a value other than None" in out, out
