"""model.checkpoint as a hub id: resolved offline from a hub cache this test writes in the cache's layout."""

import json
import os
import subprocess
import sys

import pytest

from jaxgrounding.model import hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _write_cache(cache, repo_id):
    """models--{org}--{name}/refs/main -> COMMIT; snapshots/COMMIT/ holds the files (as the hub cache does)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    return snapshot


def test_local_directory_is_itself(tmp_path):
    assert hub.resolve(str(tmp_path)) == str(tmp_path)


def test_not_a_directory_nor_a_hub_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        hub.resolve(str(tmp_path / "a" / "b"))


def test_hub_id_resolves_from_the_cache_offline(tmp_path):
    snapshot = _write_cache(tmp_path / "hub", "Qwen/Qwen2.5-VL-3B-Instruct")
    # HF_HUB_OFFLINE and HF_HUB_CACHE are read when huggingface_hub is imported: a fresh process, as a user's run.
    code = """if True:
        import json
        from jaxgrounding.model import hub
        out = {"cached": hub.resolve("Qwen/Qwen2.5-VL-3B-Instruct")}
        try:
            hub.resolve("Qwen/Qwen2.5-VL-7B-Instruct")
        except FileNotFoundError as e:
            out["missing"] = str(e)
        print(json.dumps(out))
    """
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "JAX_PLATFORMS": "cpu"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert os.path.samefile(out["cached"], snapshot)
    assert "HF_HUB_OFFLINE is set" in out["missing"] and str(tmp_path / "hub") in out["missing"]
