"""Checkpointer: bit-exact round trips, keep-N, cadence, resume, async and atomic commits,
SIGTERM, exact data-iterator resumption, clear mismatch errors, sharded restore, and two
processes (jax.distributed on 127.0.0.1, gloo) saving and restoring one checkpoint."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path import atomicity

from jaxgrounding.data import PipelineConfig, Sample, Video, make_pipeline
from jaxgrounding.training.checkpoint import Checkpointer, CheckpointCorruptError, TrainState


class _Tiny(nnx.Module):
    """Nested modules and an nnx.List, so State keys include ints as well as names."""

    def __init__(self, rngs, din=4):
        self.proj = nnx.Linear(din, 3, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(3, 3, rngs=rngs) for _ in range(2)])


def _trained_state(params, rng, step=7):
    """adamw state after a couple of updates, so mu, nu and count are not their initial values."""
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    for fill in (0.5, 1.5):
        grads = jax.tree.map(lambda p, fill=fill: jnp.full_like(p, fill), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return TrainState(params=params, opt_state=opt_state, step=step, rng=rng)


def _nnx_state():
    _, params = nnx.split(_Tiny(nnx.Rngs(0)), nnx.Param)
    return _trained_state(params, jax.random.split(jax.random.key(3))[1])


def _abstract(state):
    """What a resuming run passes: shapes and dtypes only (a Python int step stays an int)."""
    return jax.tree.map(lambda x: x if isinstance(x, int) else jax.ShapeDtypeStruct(x.shape, x.dtype), state)


def _assert_bit_exact(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if isinstance(w, int):
            assert type(g) is int and g == w
            continue
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            assert g.dtype == w.dtype
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize(
    "make_state",
    [
        _nnx_state,
        # Plain dict params, raw uint32 key, step as an array.
        lambda: _trained_state(
            {"w": jnp.arange(12.0).reshape(4, 3), "b": {"x": jnp.ones(3, jnp.bfloat16)}},
            jax.random.PRNGKey(5),
            step=jnp.asarray(7, jnp.int32),
        ),
    ],
    ids=["nnx_state_typed_key", "dict_raw_key"],
)
def test_round_trip_is_bit_exact(tmp_path, make_state):
    state = make_state()
    extra = {"config_hash": "abc123", "loss": np.float32(0.25), "losses": [jnp.float32(1.5), 2.0]}
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        assert ckpt.maybe_save(7, state, extra=extra)
    # A fresh Checkpointer, as after a restart.
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        assert ckpt.latest_step() == 7
        restored, got_extra = ckpt.restore(_abstract(state))
    _assert_bit_exact(restored, state)
    assert got_extra == {"config_hash": "abc123", "loss": 0.25, "losses": [1.5, 2.0]}
    # optax's NamedTuples come back as themselves, not as lists or dicts.
    adam, *_ = restored.opt_state
    assert type(adam) is type(state.opt_state[0]) and type(restored.opt_state) is tuple
    assert isinstance(restored.step, int) == isinstance(state.step, int)
    # The restored state goes straight into a jitted step.
    stepped = jax.jit(lambda s: s.step + 1)(restored)
    assert int(stepped) == 8


def test_nnx_state_restores_into_a_model(tmp_path):
    model = _Tiny(nnx.Rngs(1))
    graphdef, params = nnx.split(model, nnx.Param)
    # Plain sgd keeps no arrays: an optimizer state without leaves must pass through too.
    rng = jax.random.key(0, impl="rbg")  # Not the default implementation: it must be recorded.
    state = TrainState(params=params, opt_state=optax.sgd(0.1).init(params), step=1, rng=rng)
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.maybe_save(1, state)
        # The abstract state a resuming run builds without initialising real weights.
        _, abstract_params = nnx.split(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(9))), nnx.Param)
        abstract = TrainState(
            abstract_params, state.opt_state, 0, jax.eval_shape(lambda: jax.random.key(1, impl="rbg"))
        )
        restored, _ = ckpt.restore(abstract)
    assert restored.opt_state == state.opt_state and restored.step == 1
    _assert_bit_exact(restored.rng, rng)
    merged = nnx.merge(graphdef, restored.params)
    x = jnp.ones((2, 4))
    np.testing.assert_array_equal(merged.proj(x), model.proj(x))
    np.testing.assert_array_equal(merged.layers[1].kernel[...], model.layers[1].kernel[...])


def _small_state(step=0):
    return TrainState(
        params={"w": jnp.full((2, 2), float(step))},
        opt_state={"count": jnp.asarray(step)},
        step=step,
        rng=jax.random.key(step),
    )


def test_cadence_force_and_keep_n(tmp_path):
    with Checkpointer(str(tmp_path), save_every=2, keep=2) as ckpt:
        saved = [step for step in range(1, 8) if ckpt.maybe_save(step, _small_state(step))]
        assert saved == [2, 4, 6]
        assert ckpt.maybe_save(7, _small_state(7), force=True)
        # The step is already there (a SIGTERM right after a scheduled save): nothing to do.
        assert not ckpt.maybe_save(7, _small_state(7), force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [6, 7]
    assert sorted(os.listdir(tmp_path)) == ["6", "7"]


def test_resume_picks_the_latest_or_a_given_step(tmp_path):
    with Checkpointer(str(tmp_path / "empty"), save_every=1) as ckpt:
        assert ckpt.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty"):
            ckpt.restore(_abstract(_small_state()))
    with Checkpointer(str(tmp_path / "run"), save_every=3, keep=5) as ckpt:
        for step in range(1, 10):
            ckpt.maybe_save(step, _small_state(step))
    with Checkpointer(str(tmp_path / "run"), save_every=3, keep=5) as ckpt:
        assert ckpt.latest_step() == 9
        latest, _ = ckpt.restore(_abstract(_small_state()))
        earlier, _ = ckpt.restore(_abstract(_small_state()), step=6)
        # Concrete arrays work as the target too: their structure and shardings, not their values.
        into_concrete, _ = ckpt.restore(_small_state(0))
        with pytest.raises(FileNotFoundError, match="step 5"):
            ckpt.restore(_abstract(_small_state()), step=5)
    _assert_bit_exact(latest, _small_state(9))
    _assert_bit_exact(earlier, _small_state(6))
    _assert_bit_exact(into_concrete, _small_state(9))


def _largest_file(directory):
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_file(os.path.join(step_dir, "params"))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _empty_meta(step_dir):
    open(os.path.join(step_dir, "meta", "metadata"), "w").close()


def _flip_bytes(step_dir):
    # Rot in the middle of the array data, which still parses: only the checksums can tell.
    path = _largest_file(os.path.join(step_dir, "params"))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), 1)
        f.write(bytes(b ^ 0xFF for b in chunk))


def _state_with_data(step):
    """Arrays big enough that the middle of the largest file is array bytes."""
    return TrainState({"w": jnp.arange(4096.0) * step}, {"count": jnp.asarray(step)}, step, jax.random.key(step))


@pytest.mark.parametrize(
    "damage, reason",
    [(_truncate, "OUT_OF_RANGE|[Tt]runcat|[Ee]rror"), (_empty_meta, "JSONDecodeError"), (_flip_bytes, "differ from their checksums")],
    ids=["truncated", "empty_meta", "flipped"],
)
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_restored(tmp_path, caplog, damage, reason):
    state = _state_with_data
    with Checkpointer(str(tmp_path), save_every=1, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.maybe_save(step, state(step))
    damage(str(tmp_path / "2"))
    with Checkpointer(str(tmp_path), save_every=1, keep=3) as ckpt:
        restored, _ = ckpt.restore(_abstract(state(0)))
        _assert_bit_exact(restored, state(1))
        assert f"checkpoint {tmp_path}/2 is unreadable or corrupt" in caplog.text
        assert re.search(reason, caplog.text), caplog.text
        # The run goes on from step 1 and its save of step 2 replaces the bad one.
        assert ckpt.maybe_save(2, state(2))
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        again, _ = ckpt.restore(_abstract(state(0)))
    _assert_bit_exact(again, state(2))


def test_no_good_checkpoint_is_an_error_naming_each_step(tmp_path):
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        for step in (1, 2):
            ckpt.maybe_save(step, _state_with_data(step))
    _empty_meta(str(tmp_path / "1"))
    _flip_bytes(str(tmp_path / "2"))
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        with pytest.raises(CheckpointCorruptError, match=r"(?s)step 2: .*differ from their checksums.*step 1: JSON"):
            ckpt.restore(_abstract(_state_with_data(0)))


@pytest.fixture
def held_commit(monkeypatch):
    """Holds the final rename of every save until ``release`` (or fails it with ``crash``).

    The rename is Orbax's commit point: until it happens the step lives in
    ``<step>.orbax-checkpoint-tmp``; failing it leaves the fully written tmp directory
    behind, exactly what a process killed during a save leaves.
    """
    gate = threading.Event()
    outcome = {"crash": False}
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def held(self, *args, **kwargs):
        assert gate.wait(20), "commit never released"
        if outcome["crash"]:
            outcome["crash"] = False  # One commit dies; the next run's saves go through.
            raise RuntimeError("killed during the commit")
        return await finalize(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", held)

    class Control:
        def release(self):
            gate.set()

        def crash(self):
            outcome["crash"] = True
            gate.set()

    return Control()


def test_async_save_returns_before_the_commit_and_survives_donation(tmp_path, held_commit):
    state = _small_state(3)
    expected = jax.tree.map(np.asarray, state.params)
    with Checkpointer(str(tmp_path), save_every=1, async_save=True) as ckpt:
        assert ckpt.maybe_save(3, state)  # Returns although the commit is held.
        before_commit = os.listdir(tmp_path)
        # The train step may donate (delete) its buffers as soon as maybe_save returns.
        for leaf in jax.tree.leaves(state.params):
            leaf.delete()
        held_commit.release()
        ckpt.wait()
        # Orbax creates the tmp directory in the background too, so it may not be there yet.
        assert set(before_commit) <= {"3.orbax-checkpoint-tmp"}
        assert sorted(os.listdir(tmp_path)) == ["3"]
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        restored, _ = ckpt.restore(_abstract(_small_state()))
    np.testing.assert_array_equal(restored.params["w"], expected["w"])


def test_a_save_killed_before_its_commit_is_never_the_latest(tmp_path, held_commit):
    ckpt = Checkpointer(str(tmp_path), save_every=1)
    held_commit.release()
    ckpt.maybe_save(1, _small_state(1))
    ckpt.wait()
    held_commit.crash()
    ckpt.maybe_save(2, _small_state(2))
    with pytest.raises(RuntimeError, match="killed during the commit"):
        ckpt.wait()
    ckpt.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2.orbax-checkpoint-tmp"]

    resumed = Checkpointer(str(tmp_path), save_every=1)
    assert resumed.latest_step() == 1
    restored, _ = resumed.restore(_abstract(_small_state()))
    _assert_bit_exact(restored, _small_state(1))
    # The leftover is cleared and the step can be saved again.
    assert resumed.maybe_save(2, _small_state(2))
    resumed.close()
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_sigterm_sets_the_flag_and_close_restores_the_handler(tmp_path):
    original = signal.getsignal(signal.SIGTERM)
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    signal.signal(signal.SIGTERM, previous)
    try:
        ckpt = Checkpointer(str(tmp_path), save_every=100)
        ckpt.install_sigterm_handler()
        assert not ckpt.reached_preemption(5)
        os.kill(os.getpid(), signal.SIGTERM)
        # Another (jax) thread may take the signal; Python then runs the handler in the main thread soon after.
        deadline = time.monotonic() + 5
        while not ckpt.reached_preemption(5) and time.monotonic() < deadline:
            time.sleep(0.001)
        assert ckpt.reached_preemption(5)
        assert calls == []  # Replaced, not chained: the process keeps running.
        assert ckpt.maybe_save(5, _small_state(5), force=ckpt.reached_preemption(5))
        ckpt.close()
        assert signal.getsignal(signal.SIGTERM) is previous
        assert ckpt.all_steps() == [5]
    finally:
        signal.signal(signal.SIGTERM, original)


_STUCK_RUN = """
import os, sys, jax, jax.numpy as jnp
from jaxgrounding.training.checkpoint import Checkpointer, TrainState, exit_on_sigterm
ckpt = Checkpointer(sys.argv[1], save_every=1, async_save=False)
ckpt.install_sigterm_handler(grace_s=1.0)
ckpt.maybe_save(1, TrainState({"w": jnp.ones(3)}, {"n": jnp.zeros(())}, 1, jax.random.key(1)))
read, _ = os.pipe()
if sys.argv[2] == "evaluation":
    ckpt.close()
    with exit_on_sigterm("SIGTERM during evaluation: exiting"):
        print("reading", flush=True)
        os.read(read, 1)
print("reading", flush=True)
os.read(read, 1)  # a read that never returns (PEP 475 resumes it after the Python handler)
"""


@pytest.mark.parametrize(
    "phase, message",
    [
        ("training", "did not reach a step boundary within 1 s (stuck reading data"),
        ("evaluation", "SIGTERM during evaluation: exiting"),
    ],
)
def test_sigterm_while_stuck_exits_in_bounded_time_keeping_the_checkpoint(tmp_path, phase, message):
    child = subprocess.Popen(
        [sys.executable, "-c", _STUCK_RUN, str(tmp_path), phase], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "reading"
        signalled = time.monotonic()
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=60) == 128 + signal.SIGTERM
        assert time.monotonic() - signalled < 30
    finally:
        child.kill()
    assert message in child.stderr.read()
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        restored, _ = ckpt.restore(_abstract(TrainState({"w": jnp.ones(3)}, {"n": jnp.zeros(())}, 0, jax.random.key(0))))
    assert restored.step == 1


def _pipeline_source(n=10):
    """(Sample, Video) pairs with pre-extracted frames: nothing is decoded."""
    pairs = []
    for i in range(n):
        frames = np.full((3, 4, 4, 3), i, np.uint8)
        video = Video(frames=frames, timestamps=np.arange(3.0), duration=3.0, fps=1.0, backend="none")
        sample = Sample(id=f"s{i}", video=f"v{i}.mp4", duration=3.0 + i, query="q", windows=((0.0, 1.0),))
        pairs.append((sample, video))
    return pairs


_PIPELINE = PipelineConfig(
    batch_size=2,
    seed=4,
    num_epochs=2,
    read_threads=1,
    read_buffer=2,
    buckets={"frames": (4,), "timestamps": (4,), "windows": (1,)},
    shard_index=0,
    shard_count=1,
)


def test_data_iterator_resumes_exactly(tmp_path):
    source = _pipeline_source()
    it = iter(make_pipeline(source, _PIPELINE))
    for _ in range(3):
        next(it)
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.maybe_save(3, _small_state(3), data_iterator=it)
        # Advancing after maybe_save returned must not change what was saved.
        recorded = [next(it) for _ in range(5)]
    fresh = iter(make_pipeline(source, _PIPELINE))
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.restore(_abstract(_small_state()), data_iterator=fresh)
    resumed = [next(fresh) for _ in range(5)]
    # A fresh iterator starts elsewhere, so matching the recording needs the restored position.
    assert not np.array_equal(next(iter(make_pipeline(source, _PIPELINE)))["duration"], recorded[0]["duration"])
    for want, got in zip(recorded, resumed):
        assert want.keys() == got.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_mismatched_structure_is_a_clear_error(tmp_path):
    state = _nnx_state()
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.maybe_save(1, state)
        ckpt.wait()

        _, wider = nnx.split(_Tiny(nnx.Rngs(0), din=5), nnx.Param)
        with pytest.raises(ValueError) as shape_error:
            ckpt.restore(_abstract(_trained_state(wider, state.rng)))
        message = str(shape_error.value)
        assert str(tmp_path) in message and "step 1" in message
        assert "params: shape or dtype differs: proj/kernel/value (checkpoint float32[4, 3], target float32[5, 3])" in (
            message
        )
        assert "opt_state: shape or dtype differs: 0/mu/proj/kernel/value" in message

        renamed = TrainState({"w": jnp.zeros(3)}, state.opt_state, 0, state.rng)
        with pytest.raises(ValueError, match=r"params: not in the checkpoint: w\n") as key_error:
            ckpt.restore(_abstract(renamed))
        assert "params: in the checkpoint but not in the target: layers/0/bias/value" in str(key_error.value)

        split_keys = TrainState(state.params, state.opt_state, 0, jax.random.split(state.rng, 4))
        with pytest.raises(ValueError, match=r"rng: checkpoint key<fry>\[\], target key<fry>\[4\]"):
            ckpt.restore(_abstract(split_keys))

        with pytest.raises(ValueError, match="no data iterator state"):
            ckpt.restore(_abstract(state), data_iterator=iter(make_pipeline(_pipeline_source(), _PIPELINE)))


def test_sharded_restore_uses_the_target_shardings(tmp_path):
    assert len(jax.devices()) == 8, "tests/conftest.py forces 8 host devices"
    mesh = jax.make_mesh((8,), ("x",))
    rows = NamedSharding(mesh, P("x", None))
    replicated = NamedSharding(mesh, P())
    w = jax.device_put(jnp.arange(64.0).reshape(16, 4), rows)
    state = TrainState(
        params={"w": w},
        opt_state={"m": jax.device_put(jnp.ones((16, 4)), replicated)},
        step=jax.device_put(jnp.asarray(11), replicated),
        rng=jax.device_put(jax.random.key(2), replicated),
    )
    with Checkpointer(str(tmp_path), save_every=1) as ckpt:
        ckpt.maybe_save(11, state)
        ckpt.wait()
        for target in (rows, replicated, NamedSharding(mesh, P(None, None))):
            abstract = TrainState(
                params={"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=target)},
                opt_state={"m": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=rows)},
                step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                rng=jax.ShapeDtypeStruct((), state.rng.dtype, sharding=replicated),
            )
            restored, _ = ckpt.restore(abstract)
            assert restored.params["w"].sharding == target
            assert restored.opt_state["m"].sharding == rows
            assert restored.step.sharding == replicated and restored.rng.sharding == replicated
            _assert_bit_exact(restored, state)
            # Each device holds only its two rows of the row-sharded array.
            assert {shard.data.shape for shard in restored.opt_state["m"].addressable_shards} == {(2, 4)}


def _two_process_worker(process_id: int, port: int, directory: str) -> None:
    """One of two processes (4 CPU devices each) sharing an 8-device mesh and a checkpoint directory."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    mesh = jax.make_mesh((8,), ("x",))
    rows, replicated = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P())
    full = np.arange(64.0, dtype=np.float32).reshape(16, 4)
    state = TrainState(
        params={"w": jax.make_array_from_callback((16, 4), rows, lambda index: full[index])},
        opt_state={"m": jax.make_array_from_callback((16, 4), replicated, lambda index: 2 * full[index])},
        step=jax.device_put(np.int32(5), replicated),
        rng=jax.jit(lambda: jax.random.key(3), out_shardings=replicated)(),
    )
    # Each process reads its own half of the data (shard from jax.process_index()).
    config = dataclasses.replace(_PIPELINE, shard_index=None, shard_count=None)
    it = iter(make_pipeline(_pipeline_source(), config))
    next(it)
    ckpt = Checkpointer(directory, save_every=100)
    ckpt.install_sigterm_handler()
    if process_id == 1:  # Only one process is told (JAX's preemption notifier); both must stop at the same step.
        os.kill(os.getpid(), signal.SIGTERM)
    at = None
    for step in range(5, 200):  # the steps of a loop, each asking once
        if ckpt.reached_preemption(step):
            at = step
            break
        time.sleep(0.05)
    preempted = at is not None
    saved = ckpt.maybe_save(at, state, it, extra={"loss": 0.5}, force=preempted)
    recorded = [next(it) for _ in range(2)]
    abstract = TrainState(
        params={"w": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=replicated)},
        opt_state={"m": jax.ShapeDtypeStruct((16, 4), jnp.float32, sharding=rows)},
        step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        rng=jax.ShapeDtypeStruct((), state.rng.dtype, sharding=replicated),
    )
    fresh = iter(make_pipeline(_pipeline_source(), config))
    restored, extra = ckpt.restore(abstract, data_iterator=fresh)
    resumed = [next(fresh) for _ in range(2)]
    ckpt.close()
    result = {
        "preempted": preempted,
        "at": at,
        "saved": saved,
        "extra": extra,
        "step": int(restored.step.addressable_data(0)),
        "rng": np.asarray(jax.random.key_data(restored.rng.addressable_data(0))).tolist(),
        "w_ok": all(np.array_equal(x.data, full[x.index]) for x in restored.params["w"].addressable_shards),
        "m_ok": all(np.array_equal(x.data, 2 * full[x.index]) for x in restored.opt_state["m"].addressable_shards),
        "shardings": [str(restored.params["w"].sharding.spec), str(restored.opt_state["m"].sharding.spec)],
        "data_ok": all(np.array_equal(a[k], b[k]) for a, b in zip(recorded, resumed) for k in a),
        "durations": [float(d) for batch in recorded for d in batch["duration"]],
    }
    print("RESULT " + json.dumps(result), flush=True)


def test_two_processes_save_and_restore_together(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    from tests.multiprocess_train import with_device_count

    env = dict(os.environ, XLA_FLAGS=with_device_count(4), JAX_PLATFORMS="cpu")
    code = "import sys; from tests.training.test_checkpoint import _two_process_worker as w; w(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(i), str(port), str(tmp_path / "ckpt")],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=60)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = []
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
        results.append(json.loads(output.split("RESULT ", 1)[1]))
    for result in results:
        assert result["preempted"] and result["saved"]
        assert result["extra"] == {"loss": 0.5} and result["step"] == 5
        assert result["rng"] == np.asarray(jax.random.key_data(jax.random.key(3))).tolist()
        assert result["w_ok"] and result["m_ok"] and result["shardings"] == ["P()", "P('x', None)"]
        assert result["data_ok"]
    # Disjoint data shards, each resumed from its own saved state.
    assert not set(results[0]["durations"]) & set(results[1]["durations"])
    assert results[0]["at"] == results[1]["at"]  # the step JAX's preemption sync manager picked, the same on both
    saved = tmp_path / "ckpt" / str(results[0]["at"]) / "data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(saved))
