"""One run per workdir: the lock and its holder, stale locks, config.json written only by a run that
started, a resume with another model or data config stopped with the differing keys, metrics rows of
replayed steps replaced. Each case stops before any model is built, so these take seconds."""

import json
import os
import socket
import subprocess

import pytest

from configs import meco
from jaxgrounding.train import train_and_evaluate
from jaxgrounding.training import workdir as workdir_lib


def _config(**tiny):
    config = meco.get_config()
    config.model.tiny = {"hidden": 64, "layers": 2, "vision_depth": 1, "vision_hidden": 32} | tiny
    return config


def test_a_second_launch_refuses_and_names_the_holder(tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(os.path.join(workdir, "checkpoints", "3"))
    with workdir_lib.WorkdirLock(workdir):
        with pytest.raises(workdir_lib.WorkdirLockedError, match=rf"in use by the run of pid {os.getpid()} on {socket.gethostname()}"):
            train_and_evaluate(_config(), workdir)
        # Nothing of the holder's was touched.
        assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
        assert not os.path.exists(os.path.join(workdir, "config.json"))
    assert not os.path.exists(os.path.join(workdir, workdir_lib.LOCK_FILE))  # released


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = tmp_path / workdir_lib.LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
    with workdir_lib.WorkdirLock(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    lock.write_text("")  # a crash while the lock was being written
    with workdir_lib.WorkdirLock(str(tmp_path)):
        pass
    # Another host's lock cannot be checked from here: refused, with the way out.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "earlier"}))
    with pytest.raises(workdir_lib.WorkdirLockedError, match=f"delete {lock}"):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()


def test_a_launch_that_fails_early_leaves_config_json_alone(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"kept": true}')
    config = _config()
    config.data.name = "jsonl"  # without data.root: fails while loading the data
    with pytest.raises(ValueError, match="needs --config.data.root"):
        train_and_evaluate(config, str(workdir))
    assert json.loads((workdir / "config.json").read_text()) == {"kept": True}


def test_a_resume_with_another_model_config_names_the_differing_keys(tmp_path):
    workdir = tmp_path / "run"
    os.makedirs(workdir / "checkpoints" / "3")
    workdir_lib.write_config(_config(), str(workdir))
    saved = (workdir / "config.json").read_text()
    workdir_lib.check_resume_config(_config(), str(workdir))  # the same config resumes
    with pytest.raises(workdir_lib.ConfigMismatchError, match=r"model.tiny.layers: checkpoints 2, now 3"):
        train_and_evaluate(_config(layers=3), str(workdir))
    assert (workdir / "config.json").read_text() == saved
    assert not (workdir / "tiny_model").exists()  # stopped before the old tiny model could be reused


def test_metrics_rows_of_replayed_steps_are_replaced(tmp_path):
    path = tmp_path / "train_metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    log = workdir_lib.MetricsLog(str(path), 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    log.append({"step": 5, "loss": 5})
    log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_generated_data_is_named_by_its_config_and_never_replaced_under_a_reader(tmp_path):
    from jaxgrounding.training import experiment

    def small(**scene):
        config = _config()
        config.data.synthetic_train_videos, config.data.synthetic_eval_videos = 2, 1
        config.data.scene.max_duration, config.data.scene.min_duration = 6.0, 4.0
        for key, value in scene.items():
            config.data.scene[key] = value
        return config

    first, _ = experiment.load_samples(small(), str(tmp_path / "a"))
    stamp = os.stat(first[0].video).st_mtime_ns
    # Another run beside it, with another scene: its own directory; the first run's videos stay as they were.
    second, _ = experiment.load_samples(small(clock=True), str(tmp_path / "b"))
    assert os.path.dirname(os.path.dirname(second[0].video)) != os.path.dirname(os.path.dirname(first[0].video))
    assert os.stat(first[0].video).st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path / "data")) == sorted(
        os.path.basename(os.path.dirname(os.path.dirname(s[0].video))) for s in (first, second)
    )  # no staging directories left behind

    # The tiny model: rebuilt (whole, by rename) when its sizes change, reused when they do not.
    workdir = str(tmp_path / "a")
    path = experiment.resolve_checkpoint(small(), workdir, first)
    stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
    assert experiment.resolve_checkpoint(small(), workdir, first) == path
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp
    config = small()
    config.model.tiny.layers = 1
    experiment.resolve_checkpoint(config, workdir, first)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["text_config"]["num_hidden_layers"] == 1
    assert sorted(os.listdir(workdir)) == ["tiny_model"]
