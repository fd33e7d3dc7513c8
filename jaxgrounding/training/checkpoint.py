"""Orbax checkpoints of a training run: resume exactly where a run stopped, or was preempted.

One Orbax item per thing, so each can be read alone (params only, for evaluation or export)::

  <directory>/<step>/params     StandardCheckpointHandler: tensorstore arrays, restored into the
                                target shardings
  <directory>/<step>/opt_state  StandardCheckpointHandler (optax NamedTuples come back as such:
                                restore follows the target's tree)
  <directory>/<step>/meta       JsonCheckpointHandler: {"step", "rng", "extra"}
  <directory>/<step>/data       grain's Orbax handler: ``iterator.get_state()`` as JSON, one file
                                per process; a run resumed on another number of processes
                                translates the states (``data.pipeline.reshard_state``)

Only Orbax's array and JSON writers are used; nothing is pickled.

Guarantees, all from Orbax's ``CheckpointManager``:

- async: ``maybe_save`` returns once arrays are copied to host memory (and the data iterator
  state is captured); the write runs in a background thread. ``wait()`` blocks on it; the
  next save waits for the previous one.
- atomic: a step is written into ``<step>.orbax-checkpoint-tmp`` and renamed (or marked
  with a commit file on object stores) only once complete, so ``latest_step`` never sees a
  partial checkpoint; leftovers of a crashed save are deleted when the next run starts.
- keep-N: after each save only the ``keep`` most recent steps remain.
- multi-process: every process calls every method; Orbax coordinates (barriers, primary
  host for metadata and JSON), each process writes its own array shards and its own data
  iterator state. ``meta`` is written by the primary process only, so step, rng (must be
  replicated) and ``extra`` must agree across processes.

Verification: Orbax's atomic commit guards against a save cut short, not against what happens
to the files afterwards (a disk that truncates them, bit rot, an operator's mistake). Each save
records in ``meta`` two 32-bit sums over the bits of every array (plain and position-weighted:
any changed word changes both) and a SHA-256 of ``meta`` itself; ``restore`` recomputes them on
what it read. A newest step that cannot be read or does not match is reported and the previous
step is tried, down to the oldest; only when none is good does restore fail, listing why for
each. A bad step is left on disk (a transient read error must not destroy a good checkpoint) and
replaced when the resumed run saves that step again.

Preemption: the loop asks ``reached_preemption(step)`` at every step (one process: a flag SIGTERM
sets, ``install_sigterm_handler``; several: JAX's preemption sync manager, Orbax's mechanism, with no
per-step collective) and, when true, calls ``maybe_save(..., force=True)`` and exits.
"""

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import signal
import socket
import threading
from typing import Any, Self

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxgrounding.data.pipeline import reshard_state

_log = logging.getLogger(__name__)

# Shown per kind of difference when a checkpoint does not fit; a model with the wrong
# layout differs in hundreds of names and the first few tell the story.
_MAX_LISTED = 10

# Items written with Orbax's array handler, in TrainState field order.
_ARRAY_ITEMS = ("params", "opt_state")


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the state it is restored into (a different model or optimizer)."""


class CheckpointCorruptError(RuntimeError):
    """No kept checkpoint could be read and verified; the message says why for each."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """What the train step carries; a pytree, so it passes through ``jax.jit`` as is.

    params: trainable parameters, e.g. the ``nnx.State`` from ``nnx.split(model, nnx.Param, ...)``,
      or any pytree of arrays.
    opt_state: the optax state of ``params``.
    step: optimizer steps taken; a Python int or an integer scalar array.
    rng: a PRNG key (or array of keys), typed (``jax.random.key``) or raw uint32
      (``jax.random.PRNGKey``).
    """

    params: Any
    opt_state: Any
    step: int | jax.Array
    rng: jax.Array


class Checkpointer:
    """Saves a ``TrainState`` (and the data iterator) every ``save_every`` steps; restores the latest.

    Usage::

      ckpt = Checkpointer(workdir + "/checkpoints", save_every=1000)
      ckpt.install_sigterm_handler()
      if ckpt.latest_step() is None:
          state = init_state()
      else:
          state, extra = ckpt.restore(jax.eval_shape(init_state), data_iterator)
      for step in range(int(state.step) + 1, num_steps + 1):
          state = train_step(state, next(data_iterator))
          stop = ckpt.reached_preemption(step)  # Every step, every process.
          ckpt.maybe_save(step, state, data_iterator, force=stop)
          if stop:
              break
      ckpt.close()
    """

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        if save_every < 1 or keep < 1:
            raise ValueError(f"save_every and keep must be >= 1, got {save_every} and {keep}")
        # Orbax wants absolute paths; object-store URLs (gs://...) already are.
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self.save_every = save_every
        self._manager = ocp.CheckpointManager(
            self.directory,
            # Handlers named up front, so a fresh manager can read an existing run's metadata
            # (to check it fits) before anything was saved through it.
            item_handlers={
                "params": ocp.StandardCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
                "data": _DataHandler(),
            },
            options=ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
                enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                create=True,
            ),
        )
        self._bad_steps: set[int] = set()  # Steps restore found unreadable or corrupt.
        self._preemption = False
        self._sigterm_installed = False
        self._previous_sigterm = None
        self._watch = None
        self._closed = False

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None in an empty directory."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints kept, oldest first."""
        return sorted(self._manager.all_steps())

    def save_due(self, step: int) -> bool:
        """Whether ``maybe_save`` saves at ``step`` on its schedule."""
        return step % self.save_every == 0

    def maybe_save(
        self,
        step: int,
        state: TrainState,
        data_iterator: grain.DatasetIterator | None = None,
        extra: dict | None = None,
        *,
        force: bool = False,
    ) -> bool:
        """Saves at every ``save_every``-th step, or now with ``force``; True if it saved.

        extra: small JSON-able info kept with the step (config hash, last losses); numpy and
          jax scalars are converted.
        """
        if not (force or self.save_due(step)):
            return False
        if step in self._manager.all_steps():
            if step not in self._bad_steps:
                # A forced save (SIGTERM) right after the scheduled one at the same step: the
                # checkpoint is already there, and Orbax refuses to write a step twice.
                return False
            # The step failed verification when the run resumed before it: the new save replaces it.
            self._manager.delete(step)
            self._bad_steps.discard(step)
        trees = _array_trees(state)
        meta = {
            "step": int(_host_array(state.step)),
            "rng": _rng_to_json(state.rng),
            "extra": _jsonable(extra or {}),
            "fingerprints": {name: _fingerprints(tree) for name, tree in trees.items()},
        }
        meta["sha256"] = _meta_digest(meta)
        items = {name: ocp.args.StandardSave(tree) for name, tree in trees.items()}
        items["meta"] = ocp.args.JsonSave(meta)
        if data_iterator is not None:
            items["data"] = _DataSave(item=data_iterator)
        # The cadence was decided above; force stops Orbax from applying its own policy.
        return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(
        self,
        abstract_state: TrainState,
        data_iterator: grain.DatasetIterator | None = None,
        step: int | None = None,
    ) -> tuple[TrainState, dict]:
        """Reads a checkpoint (the newest good one unless ``step``) into ``abstract_state``'s structure.

        abstract_state: a ``TrainState`` whose leaves are ``jax.ShapeDtypeStruct`` (with the
          target shardings; no sharding means the default device) or concrete arrays (their
          shardings are used, their values ignored).
        data_iterator: set in place to the saved position.
        Returns the restored state and the ``extra`` dict given at save time. Raises
        FileNotFoundError without a checkpoint, ``CheckpointMismatchError`` (a ValueError) when it
        does not fit, ``CheckpointCorruptError`` when no kept step reads back as it was saved; a
        given ``step`` that does not is an error, not a fallback.
        """
        # A step saved through this Checkpointer may still be in flight; read it only once committed.
        self._manager.wait_until_finished()
        if step is not None:
            if step not in self._manager.all_steps():
                raise FileNotFoundError(
                    f"no checkpoint for step {step} in {self.directory}; there are {self.all_steps()}"
                )
            return self._restore_step(step, abstract_state, data_iterator)
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        failures = []
        for candidate in steps:
            restored, error = None, None
            try:
                restored = self._restore_step(candidate, abstract_state, data_iterator)
            except CheckpointMismatchError:
                raise  # The run's state changed, not the files: no older step fits better.
            except Exception as e:  # pylint: disable=broad-except
                # Orbax and tensorstore raise many kinds on damaged files (OUT_OF_RANGE, JSON errors, ...).
                error = e
            # Every process must resume from the same step, so one that cannot read it rules it out.
            if _everywhere(error is None):
                if failures:
                    _log.warning("resumed from step %d, the newest good checkpoint in %s", candidate, self.directory)
                return restored
            reason = "unreadable on another process" if error is None else " ".join(f"{type(error).__name__}: {error}".split())
            failures.append(f"step {candidate}: {reason[:500]}")
            self._bad_steps.add(candidate)
            _log.error(
                "checkpoint %s/%d is unreadable or corrupt, trying the previous one: %s",
                self.directory, candidate, reason[:500],
            )
        raise CheckpointCorruptError(f"no good checkpoint in {self.directory}:\n  " + "\n  ".join(failures))

    def _restore_step(self, step, abstract_state, data_iterator) -> tuple[TrainState, dict]:
        """Reads and verifies one step; raises on anything unreadable or not matching its checksums."""
        where = f"checkpoint {self.directory} at step {step}"
        saved = self._manager.item_metadata(step)
        problems = []
        targets = _array_trees(abstract_state)
        for name in _ARRAY_ITEMS:
            if name in saved:
                problems += _tree_differences(name, saved[name].tree, getattr(abstract_state, name))
            elif name in targets:
                problems.append(f"{name}: not in the checkpoint")
        if data_iterator is not None and "data" not in saved:
            problems.append("data: the checkpoint holds no data iterator state (saved without one)")
        if problems:
            raise CheckpointMismatchError(f"{where} does not fit the given state:\n  " + "\n  ".join(problems))

        items = {name: ocp.args.StandardRestore(tree) for name, tree in targets.items()}
        items["meta"] = ocp.args.JsonRestore()
        if data_iterator is not None:
            items["data"] = _DataRestore(item=data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        meta = restored["meta"]
        if not isinstance(meta, dict) or not {"step", "rng", "extra"} <= set(meta):
            raise ValueError(f"{where}: meta holds no step, rng and extra")
        _verify(meta, {name: restored[name] for name in targets}, where)
        state = TrainState(
            # A tree without arrays (sgd's EmptyState) was not saved; the target's is the answer.
            params=restored["params"] if "params" in targets else abstract_state.params,
            opt_state=restored["opt_state"] if "opt_state" in targets else abstract_state.opt_state,
            step=_step_like(meta["step"], abstract_state.step),
            rng=_rng_like(meta["rng"], abstract_state.rng, where),
        )
        return state, meta["extra"]

    def wait(self) -> None:
        """Blocks until background writes are committed; raises what they raised."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending writes and puts the previous SIGTERM handler back."""
        if self._closed:
            return
        self._closed = True
        try:
            self._manager.close()
        finally:
            if self._sigterm_installed:
                # None: the previous handler was not set from Python; the default is the best we can restore.
                previous = signal.SIG_DFL if self._previous_sigterm is None else self._previous_sigterm
                signal.signal(signal.SIGTERM, previous)
                self._sigterm_installed = False
            if self._watch is not None:
                self._watch.stop()
                self._watch = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def install_sigterm_handler(self, grace_s: float | None = None) -> None:
        """SIGTERM then makes ``reached_preemption`` true instead of killing the process.

        The loop saves with ``force=True`` and returns normally, so pending async writes are
        finished by ``close``. Must be called from the main thread (Python's signal rule).

        grace_s: a loop that has not reached ``reached_preemption`` this long after SIGTERM is stuck
          (a read that never returns, a source that only fails): the process then exits with status
          143 and says so, keeping the newest committed checkpoint. None waits for the loop however
          long it takes.

        With several processes JAX's preemption notifier owns SIGTERM (``jax.distributed.initialize``
        installs it; a Python handler would take the signal from it): nothing is installed, and a stuck
        process waits for the scheduler's SIGKILL.
        """
        if jax.process_count() > 1 or self._sigterm_installed:
            return
        self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._sigterm_installed = True
        if grace_s is not None:
            self._watch = _SigtermWatch(
                grace_s,
                f"SIGTERM: the run did not reach a step boundary within {grace_s:g} s (stuck reading data, or "
                f"waiting for another process); exiting without saving: the newest committed checkpoint in "
                f"{self.directory} is kept",
            )

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._preemption = True
        _log.warning("SIGTERM received: the run will save a checkpoint and stop")

    def reached_preemption(self, step: int) -> bool:
        """True at the step where every process saves and stops after a preemption notice (SIGTERM).

        One process: as soon as SIGTERM arrived. Several processes: Orbax's mechanism, JAX's preemption sync
        manager (``multihost_utils.reached_preemption_sync_point``, through ``CheckpointManager.reached_preemption``):
        a notice to any process is spread in the background by the coordination service, which picks the first
        step every process can still reach; there each call returns True, on every process at the same step, so
        all force the same save. No collective runs per step. Call it at every step, on every process, with
        steps starting equal. (Without the preemption service, ``jax_enable_preemption_service=False``, several
        processes are never told.)
        """
        if jax.process_count() > 1:
            requested = self._manager.reached_preemption(step)
        else:
            requested = self._preemption or (self._watch is not None and self._watch.signalled)
        if requested and self._watch is not None:
            self._watch.acknowledge()  # The loop is at a step boundary: it saves and stops on its own.
        return requested


class _SigtermWatch:
    """Exits a process whose main thread does not answer SIGTERM within a grace period.

    Python runs signal handlers in the main thread only, between bytecodes: a main thread blocked in C
    (a read on a hung file system, an XLA collective waiting for a dead peer) never sees SIGTERM. The C
    level handler does write the signal number to the wakeup fd at once, from whichever thread the
    kernel picked; this thread waits on it.
    """

    def __init__(self, grace_s: float, message: str):
        self.grace_s, self.message = grace_s, message
        self.signalled = False
        self._acknowledged = threading.Event()
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="sigterm-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self.signalled:
            try:
                received = self._read.recv(64)
            except OSError:
                return
            if not received:
                return  # Stopped.
            self.signalled = signal.SIGTERM in received
        if self._acknowledged.wait(self.grace_s):
            return
        _log.error("%s", self.message)
        logging.shutdown()
        os._exit(128 + signal.SIGTERM)  # pylint: disable=protected-access

    def acknowledge(self) -> None:
        self._acknowledged.set()

    def stop(self) -> None:
        self._acknowledged.set()
        signal.set_wakeup_fd(self._previous_fd)
        self._read.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)
        self._read.close()
        self._write.close()


@contextlib.contextmanager
def exit_on_sigterm(message: str):
    """Within the block, SIGTERM exits the process at once (status 143) after logging `message`, even while the
    main thread is busy in C (a compiled evaluation step): for work that has nothing to save."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # The watch does the work.
    watch = _SigtermWatch(0.0, message)
    try:
        yield
    finally:
        watch.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


class _DataHandler(grain.checkpoint.CheckpointHandler):
    """grain's handler, plus resuming a data iterator saved by a different number of processes
    (a run moved from one pod slice to another, or from a pod to one host for debugging)."""

    def restore(self, directory, item=None, args=None):
        item = item or args.item
        index, count = jax.process_index(), jax.process_count()
        if (directory / f"process_{index}-of-{count}.json").exists():
            return super().restore(directory, item=item, args=args)
        files = list(directory.glob("process_*-of-*.json"))
        if not files:
            raise ValueError(f"{directory}: no data iterator state")
        saved_count = int(files[0].name.rsplit("-of-", 1)[1].removesuffix(".json"))
        names = [f"process_{i}-of-{saved_count}.json" for i in range(saved_count)]
        states = [json.loads((directory / name).read_text()) for name in names]
        _log.info("data iterator saved by %d processes, resumed on %d", saved_count, count)
        item.set_state(reshard_state(states, count)[index])
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    item: Any


def _array_trees(state: TrainState) -> dict[str, Any]:
    """The array items that hold arrays; Orbax refuses to write a tree without any."""
    return {name: getattr(state, name) for name in _ARRAY_ITEMS if jax.tree.leaves(getattr(state, name))}


def _everywhere(ok: bool) -> bool:
    """``ok`` on every process."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _host_array(x) -> np.ndarray:
    """The value of a (possibly multi-process, replicated) array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            raise ValueError(f"step and rng must be replicated to be checkpointed, got sharding {x.sharding}")
        x = x.addressable_data(0)
    return np.asarray(x)


def _is_typed_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _rng_to_json(rng: jax.Array) -> dict:
    """Key data as integers (exact in JSON) plus what is needed to rebuild the key type."""
    typed = _is_typed_key(rng)
    data = _host_array(jax.random.key_data(rng) if typed else rng)
    if data.dtype != np.uint32:
        raise TypeError(f"rng must be a typed PRNG key or uint32 key data, got dtype {data.dtype}")
    return {
        "impl": str(jax.random.key_impl(rng)) if typed else None,
        "shape": list(data.shape),
        "data": data.ravel().tolist(),
    }


def _place(value: np.ndarray, target) -> jax.Array:
    """Host ``value`` on ``target``'s sharding (the default device when it has none)."""
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        return jnp.asarray(value)
    # Multi-process safe: every process passes the same host value, each keeps its shards.
    return jax.device_put(value, sharding)


def _step_like(step: int, target) -> int | jax.Array:
    if isinstance(target, (int, np.integer)):
        return int(step)
    return _place(np.asarray(step, target.dtype), target)


def _rng_like(saved: dict, target, where: str) -> jax.Array:
    """The saved key in the target's form (typed or raw), shape and sharding."""
    data = np.asarray(saved["data"], np.uint32).reshape(saved["shape"])
    if not _is_typed_key(target):
        value = data
    else:
        # A raw key saved by an older run wraps with the default implementation, as jax.random does.
        wrap = functools.partial(jax.random.wrap_key_data, **({"impl": saved["impl"]} if saved["impl"] else {}))
        value = jax.eval_shape(wrap, data)
    if value.shape != tuple(target.shape) or value.dtype != target.dtype:
        raise CheckpointMismatchError(
            f"{where} does not fit the given state:\n  rng: checkpoint {value.dtype}{list(value.shape)}, "
            f"target {target.dtype}{list(target.shape)}"
        )
    if not _is_typed_key(target):
        return _place(data, target)
    sharding = getattr(target, "sharding", None)
    if sharding is None:
        return wrap(data)
    # device_put cannot take key arrays onto shardings spanning several processes; a jit
    # from the (identical on every process) host data to the target sharding can.
    return jax.jit(wrap, out_shardings=sharding)(data)


def _shape_dtype(x) -> tuple[tuple[int, ...], str]:
    shape = x.shape if hasattr(x, "shape") else np.shape(x)
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    return tuple(shape), str(np.dtype(dtype))


def _listing(names: list[str]) -> str:
    more = f" ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def _tree_differences(name: str, saved_tree, target_tree) -> list[str]:
    """Arrays missing on either side, and arrays whose shape or dtype differ.

    Both sides are flattened the way Orbax names arrays on disk (dict keys, sequence
    indices, NamedTuple fields, nnx ``value``), so the names match what the checkpoint holds.
    """
    saved = {"/".join(k): _shape_dtype(v) for k, v in ocp.tree.to_flat_dict(saved_tree).items()}
    target = {"/".join(k): _shape_dtype(v) for k, v in ocp.tree.to_flat_dict(target_tree).items()}
    problems = []
    if missing := sorted(target.keys() - saved.keys()):
        problems.append(f"{name}: not in the checkpoint: {_listing(missing)}")
    if unexpected := sorted(saved.keys() - target.keys()):
        problems.append(f"{name}: in the checkpoint but not in the target: {_listing(unexpected)}")
    differ = [
        f"{key} (checkpoint {saved[key][1]}{list(saved[key][0])}, target {target[key][1]}{list(target[key][0])})"
        for key in sorted(saved.keys() & target.keys())
        if saved[key] != target[key]
    ]
    if differ:
        problems.append(f"{name}: shape or dtype differs: {_listing(differ)}")
    return problems


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as a flat uint32 array (one word per element)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).ravel()


@jax.jit
def _bit_sums(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per array [2] uint32: the sum of its words, and of its words times odd position weights (both
    mod 2**32). Any single changed word changes both (odd numbers are invertible mod 2**32); the weighted
    sum also catches words swapped between positions."""
    sums = []
    for x in leaves:
        w = _words(x)
        weights = jnp.arange(w.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        sums.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * weights, dtype=jnp.uint32)]))
    return sums


def _fingerprints(tree) -> dict[str, list[int]]:
    """``{array name on disk: [sum, weighted sum]}`` of a tree's arrays, computed where they live."""
    flat = {"/".join(k): v for k, v in ocp.tree.to_flat_dict(tree).items()}
    names = sorted(flat)
    sums = _bit_sums([flat[n] for n in names])
    return {n: [int(v) for v in _host_array(s)] for n, s in zip(names, sums)}


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _verify(meta: dict, trees: dict[str, Any], where: str) -> None:
    """Raises ValueError when ``meta`` or the restored arrays differ from what was saved."""
    if "sha256" not in meta:
        # Written before checkpoints carried checksums: nothing to compare against.
        _log.warning("%s has no checksums (written by an older version); not verified", where)
        return
    if _meta_digest(meta) != meta["sha256"]:
        raise ValueError(f"{where}: meta does not match its SHA-256 (the file was changed)")
    for name, tree in trees.items():
        want, got = meta["fingerprints"].get(name, {}), _fingerprints(tree)
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        if bad:
            raise ValueError(f"{where}: {name}: {len(bad)} arrays differ from their checksums: {_listing(bad)}")


def _jsonable(extra: dict) -> dict:
    """``extra`` as plain JSON values; fails at save time rather than in the background writer."""

    def scalar(value):
        # Losses and counters often arrive as numpy or jax scalars.
        if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
            return _host_array(value).item()
        raise TypeError(f"extra checkpoint info must be JSON-able, got {type(value).__name__}: {value!r}")

    return json.loads(json.dumps(extra, default=scalar))
