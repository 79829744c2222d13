"""One device mesh with named axes `data` and `model`, and logical-axis sharding of parameters.

Parameters carry logical axis names as NNX metadata (`logical(init, ("embed", "mlp"))`, which
attaches them without sharding at creation, so models build outside any mesh and importing the
library flips no global Flax setting); `LogicalRules` maps each logical name to a mesh axis
(`LOGICAL_RULES` by default). A dimension whose size its mesh axis does not divide is an error
naming the array, the dimension and the axis, unless the rules opt in to replicating it: a model
whose 3 KV heads cannot split over 2 devices should say so, not run replicated without a word.
The config section ``mesh`` (`MeshConfig`) holds the mesh shape and the rules.
Batches are split over `data`. Under `jax.jit` with these shardings the program computes the
same global function as on one device (BatchNorm statistics are over the global batch).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from research.core.params import path_str
from research.core.config import ConfigError, check_fields, require

MESH_AXES = ("data", "model")

# Logical parameter axis -> mesh axis (None: replicated).
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("conv_in", None),
    ("conv_out", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),       # a flattened head axis (ViT's H*Dh)
    ("q_heads", "model"),     # attention kernels (D, H, Dh) / (H, Dh, D): whole heads per device
    ("kv_heads", "model"),
    ("head_dim", None),
    ("vocab", "model"),
    ("classes", None),
)


# The logical names of the convolutional and classifier kernels every image model shares.
CONV_SHARDING = (None, None, "conv_in", "conv_out")   # (kh, kw, in, out)
DEPTHWISE_SHARDING = (None, None, None, "conv_out")   # (kh, kw, 1, channels)
HEAD_SHARDING = ("embed", "classes")                  # (features, classes)


class IndivisibleDimError(ConfigError):
    """A parameter dimension that its mesh axis does not divide (a mesh or rules choice that does not
    fit the model); the message is one line."""


@dataclass(frozen=True)
class LogicalRules:
    """Logical axis name -> mesh axis (None: replicated), and whether a dimension its mesh axis
    does not divide is replicated (``replicate_indivisible``) or an `IndivisibleDimError`."""
    table: tuple[tuple[str, str | None], ...] = LOGICAL_RULES
    replicate_indivisible: bool = False

    def spec(self, names: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> P:
        """PartitionSpec of an array with logical axis ``names``; a mesh axis is used once per array."""
        table = dict(self.table)
        used: set[str] = set()
        spec = []
        for name, size in zip(names, shape):
            axis = table.get(name) if name is not None else None
            if axis is None or axis in used:
                spec.append(None)
                continue
            if size % mesh.shape[axis]:
                if self.replicate_indivisible:
                    spec.append(None)
                    continue
                raise IndivisibleDimError(
                    f"dimension '{name}' of size {size} (shape {tuple(shape)}) does not divide over mesh axis "
                    f"'{axis}' of size {mesh.shape[axis]}; pick a mesh.{axis} that divides it, map '{name}' to "
                    f"None in mesh.rules, or set mesh.replicate_indivisible=True to replicate it")
            spec.append(axis)
            used.add(axis)
        return P(*spec)


@dataclass(frozen=True)
class MeshConfig:
    """The ``mesh`` config section: axis sizes (-1 = all remaining devices), the logical-axis
    ``rules`` as (logical name, mesh axis or None) pairs, and the opt-in to replicate a dimension
    its mesh axis does not divide. ``--config.mesh.rules="(('mlp', None), ...)"`` replaces the table."""
    data: int = -1
    model: int = 1
    rules: tuple[tuple[str, str | None], ...] = LOGICAL_RULES
    replicate_indivisible: bool = False

    def __post_init__(self):
        check_fields(self)
        require(self, "rules", all(axis is None or axis in MESH_AXES for _, axis in self.rules),
                f"(logical name, mesh axis) pairs with a mesh axis in {MESH_AXES} or None")

    @property
    def axes(self) -> dict[str, int]:
        return {"data": self.data, "model": self.model}

    @property
    def logical(self) -> LogicalRules:
        return LogicalRules(self.rules, self.replicate_indivisible)


def logical(init, names: tuple):
    """``init`` whose Variables carry the logical axis ``names``, placed on a mesh later."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def mesh_shape(axes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves `{"data": -1, "model": 2}` (-1 = all remaining devices) to a shape over MESH_AXES."""
    unknown = set(axes) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"unknown mesh axis {sorted(unknown)}; mesh axes are: {', '.join(MESH_AXES)}")
    sizes = [int(axes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1 (all remaining devices)")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % fixed:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} of {num_devices} devices; use -1 for one axis")
    return tuple(sizes)


def make_mesh(axes: Mapping[str, int] | MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh over `devices` (default: all) with axes ("data", "model")."""
    devices = list(jax.devices() if devices is None else devices)
    axes = axes.axes if isinstance(axes, MeshConfig) else axes
    shape = mesh_shape(dict(axes or {"data": -1, "model": 1}), len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: LogicalRules = LogicalRules()) -> P:
    """PartitionSpec for an array with logical axis ``names`` under ``rules`` (see `LogicalRules`)."""
    return rules.spec(names, shape, mesh)


def state_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules = LogicalRules()):
    """A NamedSharding per array of an NNX state, from each Variable's logical axis names; an
    indivisible dimension fails naming the array's path."""
    def one(path, variable):
        names = variable.get_metadata().get("out_sharding") if isinstance(variable, nnx.Variable) else None
        value = variable.get_value() if isinstance(variable, nnx.Variable) else variable
        shape = getattr(value, "shape", ())
        try:
            spec = rules.spec(names, shape, mesh) if names else P()
        except IndivisibleDimError as e:
            raise IndivisibleDimError(f"parameter {path_str(path)}: {e}") from None
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over `data`; all other dimensions replicated."""
    return NamedSharding(mesh, P("data"))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch on the mesh, split over `data`.

    Each process passes its own slice of the global batch (with one process, the whole batch);
    the global batch is the concatenation over processes.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, local in batch.items():
        local = np.asarray(local)
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


def initialize_distributed(coordinator_address: str = "", num_processes: int = 1, process_id: int = -1) -> bool:
    """Calls `jax.distributed.initialize` when launched as several processes.

    Explicit arguments win; then ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` (how ``tools/sweep.py --processes N`` starts a point); then JAX's own
    detection (SLURM, Open MPI, or a Cloud TPU slice, which sets no variable: opt in with
    ``RESEARCH_DISTRIBUTED=1``). Returns whether the process joined a multi-process run. It must
    run before anything touches a JAX backend (``cli.run`` calls it first); a second call is a no-op.
    """
    env = os.environ
    if jax.distributed.is_initialized():
        return True
    if num_processes > 1:
        jax.distributed.initialize(coordinator_address or None, num_processes, process_id if process_id >= 0 else None)
        return True
    if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env.get("JAX_PROCESS_ID", "0")))
        return True
    launched = ("JAX_COORDINATOR_ADDRESS" in env or env.get("RESEARCH_DISTRIBUTED") == "1"
                or int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
    if launched:
        jax.distributed.initialize()
    return launched


def to_host(x) -> np.ndarray:
    """A device array as numpy on every process: the whole array also when, in a multi-process run,
    its shards live on other processes' devices (gathered then)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def to_local_device(tree):
    """A copy of a pytree of arrays on this process's first device, for work one device does best
    (many small programs). A replicated array takes this process's replica (no communication, also
    in a multi-process run, where the whole array is not addressable); a sharded one is gathered."""
    from jax.experimental import multihost_utils

    device = jax.local_devices()[0]

    def local(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0) if x.is_fully_replicated else multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(x, device)

    return jax.tree.map(local, tree)


def shard_module(module: nnx.Module, mesh: Mesh, rules: LogicalRules = LogicalRules()):
    """Moves every array of an NNX module onto ``mesh`` by its logical axis names, in place;
    returns the shardings."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    nnx.update(module, jax.device_put(state, shardings))
    return shardings
