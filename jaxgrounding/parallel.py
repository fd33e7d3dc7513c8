"""Meshes and the one table that maps logical axis names to mesh axes.

Parameters carry `logical_axes` metadata; activations and KV memory are constrained with the
same names. Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (heads / MLP / vocabulary split, Megatron style).
"""

from __future__ import annotations

import itertools
import logging
import os
import zlib
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated). The single source of truth.
LOGICAL_AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "cache_time": None,
    # The vision tower is small next to the decoder and runs on all of a sample's patches at
    # once; its weights shard over fsdp only, heads and MLP over tensor.
    "vision_embed": "fsdp",
    "vision_heads": "tensor",
    "vision_mlp": "tensor",
    "vision_mlp_out": None,
}

log = logging.getLogger(__name__)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not split into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) > len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {len(devices)}")
    devices = devices[: int(np.prod(sizes))]  # a smaller mesh uses the first devices
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
    axes: Sequence[str | None], shape: Sequence[int] | None = None, mesh: jax.sharding.Mesh | None = None
) -> PartitionSpec:
    """PartitionSpec for logical `axes`. Given a shape and mesh, a mesh axis that does not divide
    its dimension is dropped (that dimension is replicated) rather than failing, so that small
    dimensions such as 2 KV heads on 4-way tensor parallelism still load."""
    spec = []
    used: set[str] = set()
    for i, name in enumerate(axes):
        if name is not None and name not in LOGICAL_AXIS_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        target = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None and shape is not None:
            kept = []
            size = 1
            for a in mesh_axes:
                if shape[i] % (size * mesh.shape[a]) == 0:
                    kept.append(a)
                    size *= mesh.shape[a]
            mesh_axes = tuple(kept)
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def state_shardings(state, mesh: jax.sharding.Mesh):
    """NamedShardings for an nnx State (abstract or concrete), from each Variable's logical axes."""

    def one(var):
        axes = var.get_metadata().get("logical_axes")
        shape = var.get_value().shape
        if axes is None:
            axes = (None,) * len(shape)
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {axes} do not match shape {shape}")
        return var.replace(NamedSharding(mesh, logical_to_spec(axes, shape, mesh)))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


# ------------------------------------------------------------------------------------------------
# Host data -> global arrays. Each process holds its own rows of a global batch (its slice of the
# data stream); jitted steps take global arrays, built without ever addressing another process's
# devices.
# ------------------------------------------------------------------------------------------------


# How long a process waits in `host_allgather` for the others (a process that never arrives is dead or stuck; the
# scheduler's timeout ends the job first). The key-value store takes milliseconds as a 32-bit int.
_GATHER_TIMEOUT_MS = 2**31 - 1
_gathers = itertools.count()


def host_allgather(row: np.ndarray) -> np.ndarray:
    """[processes, *row.shape]: every process's `row` (same shape and dtype everywhere), exchanged host to host
    through the coordination service's key-value store (`jax.distributed`), not as a device collective: a device
    all-gather would queue behind the running train step and make the host wait for it every step. A collective
    all the same: every process calls it, in the same order. One process: its own row."""
    row = np.ascontiguousarray(row)
    if jax.process_count() == 1:
        return row[None]
    from jax._src import distributed  # the client multihost_utils itself uses; jax exposes no public handle

    client = distributed.global_state.client
    n, index = next(_gathers), jax.process_index()
    client.key_value_set_bytes(f"jaxgrounding/gather/{n}/{index}", row.tobytes())
    rows = [
        np.frombuffer(client.blocking_key_value_get_bytes(f"jaxgrounding/gather/{n}/{p}", _GATHER_TIMEOUT_MS), row.dtype)
        for p in range(jax.process_count())
    ]
    if n:
        # Every process has written gather n, so every one has read gather n - 1: its keys can go.
        client.key_value_delete(f"jaxgrounding/gather/{n - 1}/{index}")
    return np.stack([r.reshape(row.shape) for r in rows])


def agree_shapes(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero-pads every process's arrays to the largest shape any process has, axis by axis.

    The pipeline pads each process's rows to the smallest bucket that fits *them*, so two
    processes can hold [2, 128] and [2, 192] token arrays of one global batch; a global array
    needs one shape. Every padded axis is one the pipeline itself zero-pads under a mask, so this
    is the batch one process would have built from all the rows (and its shapes are exactly
    that process's: the bucket of the largest row). One process: returned as is.
    """
    arrays = dict(arrays)
    if jax.process_count() == 1:
        return arrays
    names = sorted(arrays)
    signature = ";".join(f"{k}:{arrays[k].ndim}:{arrays[k].dtype}" for k in names)
    header = np.asarray([len(names), zlib.crc32(signature.encode())], np.int64)
    headers = host_allgather(header)
    if not np.all(headers == headers[0]):
        raise ValueError(f"processes hold different batch keys, ranks or dtypes; this process has {signature}")
    dims = np.concatenate([np.asarray(arrays[k].shape, np.int64) for k in names])
    largest = np.max(host_allgather(dims), axis=0)
    offset = 0
    for k in names:
        x = arrays[k]
        target = largest[offset : offset + x.ndim]
        offset += x.ndim
        if tuple(target) != x.shape:
            arrays[k] = np.pad(x, [(0, int(t) - n) for t, n in zip(target, x.shape)])
    return arrays


# Bytes of each process's message in `process_messages`: a failure's reasons, not a log.
_MESSAGE_BYTES = 4096


def process_messages(message: str, counts: Sequence[int] = ()) -> tuple[list[str], np.ndarray]:
    """Every process's `message` ("" for none) and `counts` summed over processes (a collective: every
    process must call it, at the same point of the loop). Used where one process alone may have to stop
    the run (its data failed): all processes learn it at once and stop together, instead of the others
    waiting forever in the next collective. One process: its own."""
    counts = np.asarray(counts, np.int64)
    if jax.process_count() == 1:
        return [message], counts
    text = message.encode()[:_MESSAGE_BYTES]
    row = np.zeros(_MESSAGE_BYTES + 1 + counts.size, np.int64)
    row[0] = len(text)
    row[1 : 1 + len(text)] = np.frombuffer(text, np.uint8)
    row[_MESSAGE_BYTES + 1 :] = counts
    rows = host_allgather(row)
    messages = [bytes(r[1 : 1 + r[0]].astype(np.uint8)).decode(errors="replace") for r in rows]
    return messages, rows[:, _MESSAGE_BYTES + 1 :].sum(axis=0)


def global_batch(arrays: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Global arrays, batch axis over the data axes, from each process's rows (same shapes on
    every process: see `agree_shapes`). Process p's rows are rows [p * b, (p + 1) * b)."""
    sharding = NamedSharding(mesh, logical_to_spec(("batch",)))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in arrays.items()}


def local_rows(x) -> np.ndarray:
    """This process's rows of `x`, whose leading axis is the global batch laid out as `global_batch` lays it out
    (process p's rows are the p-th of `process_count` equal blocks), on the host. An array of several processes is
    gathered whole first (a collective: every process must call it); meant for small per-row results (tokens,
    log-probs), not for activations."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    whole = multihost_utils.process_allgather(x, tiled=True)
    n = whole.shape[0] // jax.process_count()
    return whole[jax.process_index() * n : (jax.process_index() + 1) * n]


def replicated(x, mesh: jax.sharding.Mesh) -> jax.Array:
    """A global array replicated on every device of `mesh` from a host value every process
    holds identically (a PRNG key's data, a step number). `jax.device_put` cannot do this on
    several processes: the target devices are not all addressable."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), np.asarray(x))


def process_local(tree):
    """Every array of `tree` as a whole array on this process's first device: a replicated one
    from this process's copy, a sharded one gathered from all processes (a collective: every
    process must call it). For work one process does on the whole model, like writing an export."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if x.sharding.is_fully_replicated:
            return x.addressable_data(0)
        return jax.device_put(multihost_utils.process_allgather(x, tiled=True), jax.local_devices()[0])

    return jax.tree.map(one, tree)


def cloud_tpu_vm() -> bool:
    """A Cloud TPU VM (libtpu installed, TPU chips present: /dev/accel* up to v4, /dev/vfio from v5e on),
    where `jax.distributed.initialize()` reads the slice's hosts from the VM's metadata server; nothing in
    the shell's environment says how many hosts the slice has."""
    import glob
    import importlib.util

    chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def initialize_distributed() -> None:
    """Joins a multi-process run when the environment describes one (a Cloud TPU VM, GKE's TPU pods,
    SLURM, or an explicit coordinator); a single process does nothing. Must run before any other JAX call."""
    env = os.environ
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or "TPU_WORKER_HOSTNAMES" in env  # set by GKE on TPU pods
        and "," in env["TPU_WORKER_HOSTNAMES"]
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or cloud_tpu_vm()  # a pod slice's workers (launch/tpu_pod.sh); one host joins a run of one
    )
    if "JAX_COORDINATOR_ADDRESS" in env:  # launch/local_multiprocess.sh, or any explicit launcher
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif multi:  # TPU VMs, GKE and SLURM: JAX reads the topology from the environment itself
        jax.distributed.initialize()
        log.info(
            "process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count()
        )
