"""Meshes and the one table that maps logical axis names to mesh axes.

Parameters carry `logical_axes` metadata; activations and KV memory are constrained with the
same names. Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and
optimizer state sharded), `tensor` (heads / MLP / vocabulary split, Megatron style).
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from flax import nnx
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


def initialize_distributed() -> None:
    """Joins a multi-process run when the environment describes one (TPU pods, SLURM, or an
    explicit coordinator); a single process does nothing. Must run before any other JAX call."""
    env = os.environ
    multi = (
        "JAX_COORDINATOR_ADDRESS" in env
        or "TPU_WORKER_HOSTNAMES" in env
        and "," in env["TPU_WORKER_HOSTNAMES"]
        or int(env.get("SLURM_NTASKS", "1")) > 1
    )
    if "JAX_COORDINATOR_ADDRESS" in env:  # launch/local_multiprocess.sh, or any explicit launcher
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif multi:  # TPU pods and SLURM: JAX reads the topology from the environment itself
        jax.distributed.initialize()
        log.info(
            "process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count()
        )
