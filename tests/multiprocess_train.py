"""Training as a pod runs it, on this machine: two processes (one CPU device each, gloo collectives on 127.0.0.1),
each reading its own rows of every global batch, sharing a 2-device mesh and one workdir.

    python -m tests.multiprocess_train {meco|meco_broken_on_1|timescope|grpo} DATA_ROOT PORT PROCESS_ID NUM_PROCESSES WORKDIR[:STOP] ...

Each process runs `train_and_evaluate` on every WORKDIR in turn (`STOP`: end after that step, as a kill would) with
the micro config of tests/test_train.py, tests/test_train_timescope.py or tests/training/test_grpo.py
(meco_broken_on_1: meco's, every video process 1 reads failing), and prints `RESULT [json, ...]`.
`run_processes` starts them and returns what process 0 printed.
"""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_device_count(count: int) -> str:
    """XLA_FLAGS for a subprocess with `count` virtual CPU devices, the suite's other flags (tests/conftest.py) kept."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device")]
    return " ".join([f"--xla_force_host_platform_device_count={count}"] + flags)


def run_processes(method: str, data_root: str, runs: list[tuple[str, int | None]], count: int = 2) -> list[dict]:
    """Runs `count` processes over `runs` ([(workdir, stop_after or None)]); the results of process 0."""
    codes, outputs = start_processes(method, data_root, runs, count)
    for i, (code, output) in enumerate(zip(codes, outputs)):
        assert code == 0, f"process {i}:\n{output[-4000:]}"
    return json.loads(outputs[0].split("RESULT ", 1)[1].splitlines()[0])


def start_processes(
    method: str, data_root: str, runs: list[tuple[str, int | None]], count: int = 2, timeout: float = 600
) -> tuple[list[int], list[str]]:
    """Runs `count` processes over `runs`; (their exit codes, their outputs). A process still running after
    `timeout` seconds fails the test (a hang)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS=with_device_count(1), JAX_PLATFORMS="cpu")
    specs = [w if stop is None else f"{w}:{stop}" for w, stop in runs]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.multiprocess_train", method, str(data_root), str(port), str(i), str(count)]
            + specs,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(count)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [proc.returncode for proc in procs], outputs


def main(method: str, data_root: str, port: int, process_id: int, count: int, specs: list[str]) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=process_id)
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py sets for the suite
    from jaxgrounding.train import train_and_evaluate

    if method == "meco_broken_on_1":
        # Process 1's storage is gone: every video it reads fails (process 0's read fine).
        from jaxgrounding.data import video as video_lib
        from tests.test_train import micro_config

        def gone(path, **_):
            raise video_lib.VideoDecodeError(path, "file does not exist")

        if process_id == 1:
            video_lib.read_video = gone
    elif method == "meco":
        from tests.test_train import micro_config
    elif method == "grpo":
        from tests.training.test_grpo import micro_config as one_process_config

        def micro_config(data_root):
            config = one_process_config(data_root)
            config.mesh.fsdp = -1  # the test's one process uses one device; here both processes' devices
            return config
    else:
        from tests.test_train_timescope import micro_config
    results = []
    for spec in specs:
        workdir, _, stop = spec.partition(":")
        results.append(train_and_evaluate(micro_config(data_root), workdir, stop_after=int(stop) if stop else None))
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    method, data_root, port, process_id, count, *specs = sys.argv[1:]
    main(method, data_root, int(port), int(process_id), int(count), specs)


def check_two_processes_train_like_one(
    method: str, root, one_workdir: str, one_result: dict, config, *, evaluate: bool, across_process_counts: bool
) -> None:
    """Two processes reproduce a one-process run of `config`: per-step losses within 1e-4 relative (or 1e-6), written once
    (one writer of train_metrics.jsonl and config.json), and with `evaluate` the same evaluation metrics and (when
    the config exports) the same export.

    With `across_process_counts`, a checkpoint written by either restores in the other: two processes resume the
    one-process run's first checkpoint, one process resumes theirs, and both continue the same losses. (Each check
    costs compiles on 2 cores, so the suite runs each where it says most: see the callers.)
    """
    import shutil

    import pytest

    from jaxgrounding.train import train_and_evaluate

    steps, first = config.train.steps, config.train.checkpoint_every

    def seeded(source: str, name: str) -> str:
        """A fresh workdir holding only `source`'s first checkpoint."""
        workdir = os.path.join(str(root), name)
        checkpoint = os.path.join("checkpoints", str(first))
        shutil.copytree(os.path.join(source, checkpoint), os.path.join(workdir, checkpoint))
        return workdir

    two = os.path.join(str(root), f"{method}_two_processes")
    runs = [(two, None if evaluate else steps)]
    resumed = []
    if across_process_counts:
        resumed.append((seeded(one_workdir, f"{method}_two_from_one"), first))
        runs.append((resumed[-1][0], steps))
    results = run_processes(method, os.path.join(str(root), "data"), runs)
    if across_process_counts:
        resumed.append((seeded(two, f"{method}_one_from_two"), first))
        assert train_and_evaluate(config, resumed[-1][0], stop_after=steps) == {}

    want = losses(one_workdir)
    with open(os.path.join(two, "train_metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f]
    assert logged == list(range(1, steps + 1))  # one writer: every step once
    assert os.path.isfile(os.path.join(two, "config.json"))
    for workdir, resumed_at in [(two, 0)] + resumed:
        got = losses(workdir)
        assert sorted(got) == list(range(resumed_at + 1, steps + 1)), workdir
        for step, loss in got.items():
            # (abs: GRPO's losses are near 0, where the processes' reduction order shows in the relative error)
            assert loss == pytest.approx(want[step], rel=1e-4, abs=1e-6), (workdir, step)
    if evaluate:
        with open(os.path.join(two, "eval", "metrics.json")) as f:
            assert json.load(f) == results[0]
        numbers = {k: v for k, v in one_result.items() if isinstance(v, (int, float))}
        assert {k: results[0][k] for k in numbers} == pytest.approx(numbers, abs=1e-6)
        assert {k: v for k, v in results[0].items() if k not in numbers} == {
            k: v for k, v in one_result.items() if k not in numbers
        }
        assert not [n for n in os.listdir(os.path.join(two, "eval")) if ".part-" in n]
        if config.train.export:
            check_same_export(os.path.join(one_workdir, "export"), os.path.join(two, "export"))


def check_same_export(one: str, two: str) -> None:
    """The export two processes wrote (their parameters sharded across both, gathered for process 0 to write) holds
    the one-process export's files and tensors: same names and shapes, values within what the two runs' different
    reduction orders leave after a few Adam steps."""
    import numpy as np

    from jaxgrounding.model.weights import read_safetensors

    def tensors(export):
        return {
            os.path.relpath(os.path.join(d, f), export) + ":" + name: array
            for d, _, files in os.walk(export)
            for f in files
            if f.endswith(".safetensors")
            for name, array in read_safetensors(os.path.join(d, f)).items()
        }

    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    want, got = tensors(one), tensors(two)
    assert sorted(got) == sorted(want)
    for name, array in got.items():
        assert array.shape == want[name].shape and array.dtype == want[name].dtype, name
        np.testing.assert_allclose(array.astype(np.float32), want[name].astype(np.float32), atol=2e-3, err_msg=name)


def losses(workdir: str) -> dict[int, float]:
    with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows}
