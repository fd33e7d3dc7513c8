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

Preemption: ``install_sigterm_handler`` turns SIGTERM into a flag the loop polls
(``preemption_requested``); the loop then calls ``maybe_save(..., force=True)`` and exits.
"""

import dataclasses
import functools
import json
import logging
import os
import signal
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
          stop = ckpt.preemption_requested  # Read once: a collective on several processes.
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
        self._preemption = False
        self._sigterm_installed = False
        self._previous_sigterm = None
        self._closed = False

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None in an empty directory."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints kept, oldest first."""
        return sorted(self._manager.all_steps())

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
        if not (force or step % self.save_every == 0):
            return False
        if step in self._manager.all_steps():
            # A forced save (SIGTERM) right after the scheduled one at the same step: the
            # checkpoint is already there, and Orbax refuses to write a step twice.
            return False
        meta = {"step": int(_host_array(state.step)), "rng": _rng_to_json(state.rng), "extra": _jsonable(extra or {})}
        items = {name: ocp.args.StandardSave(tree) for name, tree in _array_trees(state).items()}
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
        """Reads a checkpoint (the latest unless ``step``) into ``abstract_state``'s structure.

        abstract_state: a ``TrainState`` whose leaves are ``jax.ShapeDtypeStruct`` (with the
          target shardings; no sharding means the default device) or concrete arrays (their
          shardings are used, their values ignored).
        data_iterator: set in place to the saved position.
        Returns the restored state and the ``extra`` dict given at save time. Raises
        FileNotFoundError without a checkpoint, ValueError when it does not fit.
        """
        # A step saved through this Checkpointer may still be in flight; read it only once committed.
        self._manager.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self._manager.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; there are {self.all_steps()}")
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
            raise ValueError(f"{where} does not fit the given state:\n  " + "\n  ".join(problems))

        items = {name: ocp.args.StandardRestore(tree) for name, tree in targets.items()}
        items["meta"] = ocp.args.JsonRestore()
        if data_iterator is not None:
            items["data"] = _DataRestore(item=data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        meta = restored["meta"]
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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def install_sigterm_handler(self) -> None:
        """SIGTERM then sets ``preemption_requested`` instead of killing the process.

        The loop saves with ``force=True`` and returns normally, so pending async writes are
        finished by ``close``. Must be called from the main thread (Python's signal rule).
        """
        if not self._sigterm_installed:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._sigterm_installed = True

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self._preemption = True
        _log.warning("SIGTERM received: the run will save a checkpoint and stop")

    @property
    def preemption_requested(self) -> bool:
        """True once SIGTERM arrived (on any process).

        With several processes this is a collective (a tiny allgather of the flags): the
        processes may be signalled at different steps, yet all must force the same save or the
        save's barriers hang. Read it at the same steps on every process.
        """
        if jax.process_count() == 1:
            return self._preemption
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self._preemption))))


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
        raise ValueError(
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


def _jsonable(extra: dict) -> dict:
    """``extra`` as plain JSON values; fails at save time rather than in the background writer."""

    def scalar(value):
        # Losses and counters often arrive as numpy or jax scalars.
        if isinstance(value, (np.generic, np.ndarray, jax.Array)) and np.ndim(value) == 0:
            return _host_array(value).item()
        raise TypeError(f"extra checkpoint info must be JSON-able, got {type(value).__name__}: {value!r}")

    return json.loads(json.dumps(extra, default=scalar))
