"""The distribution as pip builds it: only `jaxgrounding` installed (configs/ is run by path from a checkout),
decord only where it has wheels, the accelerator and cloud extras; the CLI loads a config by path."""

import glob
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser

import pytest
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def metadata(tmp_path_factory):
    """(top-level names in the wheel, its METADATA), built from a copy so the checkout gets no build/."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("jaxgrounding", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", "dist", "."]
    subprocess.run(cmd, cwd=src, check=True, capture_output=True, timeout=300)
    (wheel,) = glob.glob(str(src / "dist" / "*.whl"))
    with zipfile.ZipFile(wheel) as z:
        top = {n.split("/")[0] for n in z.namelist()}
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    return top, meta


def _requirements(meta):
    return [Requirement(r) for r in meta.get_all("Requires-Dist")]


def test_installs_only_jaxgrounding(metadata):
    top, _ = metadata
    assert {t for t in top if not t.endswith(".dist-info")} == {"jaxgrounding"}


@pytest.mark.parametrize(
    "platform, machine, has_decord",
    [("linux", "x86_64", True), ("linux", "aarch64", False), ("darwin", "arm64", False), ("win32", "AMD64", True)],
)
def test_decord_only_where_it_has_wheels(metadata, platform, machine, has_decord):
    env = {"sys_platform": platform, "platform_machine": machine, "extra": ""}
    wanted = {r.name for r in _requirements(metadata[1]) if r.marker is None or r.marker.evaluate(env)}
    assert ("decord" in wanted) == has_decord
    assert {"av", "jax", "tensorflow-datasets"} <= wanted  # PyAV decodes everywhere


def test_accelerator_and_cloud_extras(metadata):
    extras = {}
    for r in _requirements(metadata[1]):
        for extra in ("tpu", "cuda", "cloud"):
            if r.marker is not None and r.marker.evaluate({"extra": extra}):
                extras.setdefault(extra, set()).add((r.name, frozenset(r.extras)))
    assert ("jax", frozenset({"tpu"})) in extras["tpu"]
    assert ("jax", frozenset({"cuda12"})) in extras["cuda"]
    assert any(name == "etils" and "epath-gcs" in e for name, e in extras["cloud"])


def test_cli_loads_config_files_by_path_from_the_checkout(tmp_path):
    """`from configs import meco` inside configs/invert4tvg.py resolves from the checkout (python -m puts the
    working directory first on sys.path), with no installed `configs`. The 7B preset without a checkpoint
    then stops before any work."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxgrounding.train", "--config", "configs/invert4tvg.py:model=qwen2_5_vl_7b"]
    run = subprocess.run(
        cmd + ["--workdir", str(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0
    assert "model=qwen2_5_vl_7b sets that model's training recipe" in run.stderr, run.stderr[-3000:]
    assert not (tmp_path / "run").exists()
