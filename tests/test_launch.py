"""The launch scripts' dry runs print the commands a pod, a GKE cluster and a SLURM job would run; the
commands that run on the machines themselves (a TPU worker's start and stop, the SLURM requeue on the
pre-timeout SIGTERM) run here with stand-ins for uv, python, srun, scancel and scontrol."""

import os
import pathlib
import shlex
import signal
import socket
import subprocess
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/timescope.py:model=qwen2_5_vl_7b", "--config.model.checkpoint=Qwen/Qwen2.5-VL-7B-Instruct",
        "--workdir", "gs://bucket/runs/it's"]  # fmt: skip


def _dry_run(script, *args, env=None):
    run = subprocess.run(
        ["bash", str(REPO / "launch" / script), "--dry-run", *args],
        capture_output=True, text=True, timeout=60, env=env, check=True,
    )  # fmt: skip
    return [shlex.split(line) for line in run.stdout.splitlines() if line and not line.startswith("#")]


def _stub(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _wait_for(path, timeout=30):
    end = time.time() + timeout
    while not path.exists() or not path.read_text().strip():
        assert time.time() < end, f"{path} never written"
        time.sleep(0.05)


# --- TPU VM slice ---------------------------------------------------------------------------------


def _tpu_remote(*args):
    """The command tpu_pod.sh runs on every worker (its last ssh --command)."""
    ssh = _dry_run("tpu_pod.sh", *args)[-1]
    assert ssh[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "--worker=all" in ssh
    return ssh[ssh.index("--command") + 1]


def test_tpu_pod_dry_run():
    archive, scp, ssh = _dry_run("tpu_pod.sh", "my-v5p-64", "us-east5-a", "--", *ARGS)
    assert archive[:3] == ["git", "-C", str(REPO)] and "archive" in archive
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == archive[archive.index("-o") + 1]
    assert scp[6:] == ["my-v5p-64:~/jaxgrounding.tar.gz", "--zone", "us-east5-a", "--worker=all"]
    remote = ssh[ssh.index("--command") + 1]
    subprocess.run(["bash", "-n", "-c", remote], check=True)  # valid shell
    assert "uv venv -q --python 3.12 .venv" in remote and "-e '.[tpu,cloud]'" in remote
    train = remote.split("setsid nohup ")[1].split(" > logs/$(hostname).log 2>&1 < /dev/null & echo $! > train.pid")[0]
    assert shlex.split(train) == [".venv/bin/python", "-m", "jaxgrounding.train", *ARGS]  # from the checkout's root
    assert "TPU_WORKER_HOSTNAMES" not in remote and "export TPU" not in remote
    stop = _tpu_remote("--stop", "my-v5p-64", "us-east5-a")
    assert "kill -TERM $(cat train.pid)" in stop


def test_tpu_worker_starts_detached_with_its_log_and_stops_on_sigterm(tmp_path):
    home = tmp_path / "home"
    (home / "src").mkdir(parents=True)
    (home / "src" / "README.md").write_text("checkout\n")
    subprocess.run(["tar", "-czf", str(home / "jaxgrounding.tar.gz"), "-C", str(home / "src"), "."], check=True)
    # uv makes a virtualenv whose python records its arguments and, on SIGTERM, that it was asked to stop.
    _stub(home / ".local" / "bin" / "uv", """
if [ "$1" = venv ]; then mkdir -p .venv/bin; cat > .venv/bin/python <<'PY'
#!/usr/bin/env bash
trap 'echo TERM > "$HOME/stopped"; exit 0' TERM
printf '%s\\0' "$@" > "$HOME/args"
while :; do sleep 0.05; done
PY
chmod +x .venv/bin/python; fi
""")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    start = _tpu_remote("tpu", "zone", "--", *ARGS)
    run = subprocess.run(["bash", "-c", start], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr  # returned: the training runs on, detached
    _wait_for(home / "args")
    assert (home / "args").read_text().split("\0")[:-1] == ["-m", "jaxgrounding.train", *ARGS]
    checkout = home / "jaxgrounding"
    assert (checkout / "README.md").exists() and (checkout / "logs" / f"{socket.gethostname()}.log").exists()
    pid = int((checkout / "train.pid").read_text())
    again = subprocess.run(["bash", "-c", start], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already training" in again.stderr
    stop = subprocess.run(["bash", "-c", _tpu_remote("--stop", "tpu", "zone")], env=env, capture_output=True, text=True)
    assert "SIGTERM sent" in stop.stdout
    _wait_for(home / "stopped")
    end = time.time() + 10
    while os.path.exists(f"/proc/{pid}") and "zombie" not in _state(pid) and time.time() < end:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or "zombie" in _state(pid)


def _state(pid):
    try:
        return pathlib.Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (FileNotFoundError, IndexError):
        return "zombie"


# --- GKE / xpk ------------------------------------------------------------------------------------


def test_gke_xpk_dry_run():
    image = "gcr.io/my-project/jaxgrounding:1"
    build, push, create = _dry_run("gke_xpk.sh", "--workload", "jg-1", "my-cluster", "v5p-64", image, "--", *ARGS)
    assert build == ["docker", "build", "--build-arg", "EXTRAS=tpu,cloud", "-t", image, str(REPO)]
    assert push == ["docker", "push", image]
    assert create[:3] == ["xpk", "workload", "create"]
    flags = dict(zip(create[3::2], create[4::2]))
    assert flags["--cluster"] == "my-cluster" and flags["--workload"] == "jg-1" and flags["--tpu-type"] == "v5p-64"
    assert flags["--docker-image"] == image and flags["--num-slices"] == "1"
    assert shlex.split(flags["--command"]) == ["cd", "/app", "&&", "python", "-m", "jaxgrounding.train", *ARGS]
    assert _dry_run("gke_xpk.sh", "--stop", "my-cluster", "jg-1") == [
        ["xpk", "workload", "delete", "--cluster", "my-cluster", "--workload", "jg-1"]
    ]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG EXTRAS=tpu,cloud" in dockerfile and 'pip install --no-cache-dir ".[${EXTRAS}]"' in dockerfile
    assert "WORKDIR /app" in dockerfile and "COPY configs ./configs" in dockerfile


# --- SLURM ----------------------------------------------------------------------------------------


def test_slurm_dry_run(tmp_path):
    header = [line for line in (REPO / "launch" / "slurm.sbatch").read_text().splitlines() if line.startswith("#SBATCH")]
    assert {"#SBATCH --exclusive", "#SBATCH --requeue", "#SBATCH --signal=B:TERM@180"} <= set(header)
    env = os.environ | {"SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_ID": "42"}
    commands = _dry_run("slurm.sbatch", *ARGS, env=env)
    assert ["uv", "venv", "-q", "--python", "3.12", ".venv"] in commands
    assert ["uv", "pip", "install", "-q", "--python", ".venv/bin/python", "-e", ".[cuda]"] in commands
    check = next(c for c in commands if c[:2] == [".venv/bin/python", "-c"])
    assert "jax.default_backend() == 'gpu'" in check[2]
    assert commands[-3:] == [
        ["srun", "--kill-on-bad-exit=1", ".venv/bin/python", "-m", "jaxgrounding.train", *ARGS],
        ["scancel", "--signal=TERM", "42"],
        ["scontrol", "requeue", "42"],
    ]


def test_slurm_requeues_after_the_tasks_checkpoint_on_the_pre_timeout_sigterm(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    # srun's tasks save on SIGTERM and exit 0; scancel --signal delivers the signal to them, as SLURM does.
    _stub(bin_dir / "srun", f'echo "srun $*" >> {calls}; trap \'echo saved >> {calls}; exit 0\' TERM; '
          f'echo $$ > {tmp_path}/srun.pid; while :; do sleep 0.05; done\n')  # fmt: skip
    _stub(bin_dir / "scancel", f'echo "scancel $*" >> {calls}; kill -TERM $(cat {tmp_path}/srun.pid)\n')
    _stub(bin_dir / "scontrol", f'echo "scontrol $*" >> {calls}\n')
    _stub(tmp_path / "checkout" / ".venv" / "bin" / "python", f'echo "gpu check" >> {calls}\n')
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path / "checkout"),
                        "SLURM_JOB_ID": "42"}  # fmt: skip
    job = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), *ARGS], env=env, stderr=subprocess.PIPE)
    _wait_for(tmp_path / "srun.pid")
    job.send_signal(signal.SIGTERM)  # SLURM's --signal=B:TERM@180
    assert job.wait(timeout=30) == 0, job.stderr.read()
    assert calls.read_text().splitlines() == [
        "gpu check",
        "srun --kill-on-bad-exit=1 .venv/bin/python -m jaxgrounding.train " + " ".join(ARGS),
        "scancel --signal=TERM 42",
        "saved",
        "scontrol requeue 42",
    ]
