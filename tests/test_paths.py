"""Workdirs anywhere: a micro training run whose workdir is a gs:// URL, on an in-memory stand-in for GCS
registered with fsspec under the schemes etils.epath sends gs:// paths to (without TensorFlow: fsspec's "gcs",
which gcsfs provides in the `cloud` extra). Orbax's arrays go through tensorstore's own GCS driver, which the
stand-in cannot reach: the test keeps the checkpoints directory local and checks everything else lands in the
bucket, and that the run resumes."""

import json
import os

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from jaxgrounding import paths
from jaxgrounding.training import workdir as workdir_lib
from tests.test_train import micro_config


class FakeGCS(MemoryFileSystem):
    """An in-memory bucket store answering gs:// paths."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    for scheme in FakeGCS.protocol:
        fsspec.register_implementation(scheme, FakeGCS, clobber=True)
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local = {}

    def checkpoints(workdir):  # Orbax's directory stays on this machine (see the module docstring)
        return local.setdefault(workdir, str(tmp_path / "checkpoints" / str(len(local))))

    monkeypatch.setattr(workdir_lib, "checkpoints", checkpoints)
    yield FakeGCS()
    FakeGCS.store.clear()


def test_paths_write_read_list_and_stage_through_the_bucket(bucket, tmp_path):
    paths.write_text("gs://b/run/a/x.json", "{}")
    assert paths.isfile("gs://b/run/a/x.json") and paths.isdir("gs://b/run/a")
    assert paths.read_text("gs://b/run/a/x.json") == "{}" and paths.listdir("gs://b/run/a") == ["x.json"]
    with paths.Staged("gs://b/run/export") as local:
        os.makedirs(os.path.join(local, "sub"))
        open(os.path.join(local, "sub", "w.bin"), "wb").write(b"123")
    assert bucket.cat_file("gs://b/run/export/sub/w.bin") == b"123"
    copy = paths.download("gs://b/run/export", str(tmp_path / "copy"))
    assert open(os.path.join(copy, "sub", "w.bin"), "rb").read() == b"123"


def test_micro_training_on_a_gs_workdir_writes_the_bucket_and_resumes(bucket, tmp_path, monkeypatch):
    from jaxgrounding.train import train_and_evaluate
    from jaxgrounding.training import experiment

    monkeypatch.chdir(tmp_path)  # a workdir mistaken for a local path would appear here as gs:/...
    config = micro_config(tmp_path / "data")
    config.data.synthetic_train_videos, config.data.synthetic_eval_videos = 4, 2
    config.train.steps = 2
    config.train.checkpoint_every = 1
    workdir = "gs://bucket/run"
    assert train_and_evaluate(config, workdir, stop_after=1) == {}  # "killed" after step 1
    result = train_and_evaluate(config, workdir)  # resumes from step 1
    assert not os.path.exists(tmp_path / "gs:")
    rows = [json.loads(line) for line in paths.read_text(f"{workdir}/train_metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert json.loads(paths.read_text(f"{workdir}/config.json"))["train"]["steps"] == 2
    assert json.loads(paths.read_text(f"{workdir}/eval/metrics.json"))["samples"] == result["samples"] == 2
    assert len(paths.read_text(f"{workdir}/eval/predictions.jsonl").splitlines()) == 2
    assert {"config.json", "model.safetensors", "structural_heads"} <= set(paths.listdir(f"{workdir}/export"))
    assert paths.isfile(f"{workdir}/export/{experiment.HEADS_FILE}")
    assert "tiny_model" in paths.listdir(workdir) and paths.listdir(f"{workdir}/tb")
    assert not paths.exists(f"{workdir}/run.lock")  # released
    # The evaluate command's path: the tiny model and config read back from the bucket on a machine without them.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "another_machine"))
    assert experiment.load_workdir_config(workdir).train.steps == 2
    _, _, checkpoint_dir, step = experiment.restore_model(config, workdir)
    assert step == 2 and checkpoint_dir.startswith(str(tmp_path / "another_machine"))
