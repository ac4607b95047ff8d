"""Device mesh, logical-axis rules and the shardings of params and batches.

The mesh has three axes:
  data    pure data parallelism (params replicated),
  fsdp    data parallelism with params, grads and optimizer state sharded (ZeRO-3 style),
  tensor  tensor parallelism over heads, MLP width and vocabulary (Megatron style).
A batch is split over `data` x `fsdp`. Model code names logical axes only (`embed`, `heads`,
`act_batch`, ...); `LOGICAL_AXIS_RULES` maps them to mesh axes, so changing the parallelism is a
change of mesh shape, never of model code.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dasd_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # params
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("lora_rank", None),  # LoRA adapters: small, their rank axis replicated
    # activations
    ("act_batch", BATCH_AXES),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def make_mesh(shape: Sequence[int] = (1, -1, 1),
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one entry of `shape` may be -1 for "all remaining devices".

    The default puts every device on `fsdp`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES) or shape.count(-1) > 1:
        raise UserError(
            f"mesh shape {tuple(shape)} must give {len(MESH_AXES)} sizes for {MESH_AXES}, "
            "at most one of them -1"
        )
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if known <= 0 or len(devices) % known:
            raise UserError(f"mesh shape {tuple(shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise UserError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} are "
            "available; use -1 for one axis to take the rest"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Context in which the model's logical activation constraints bind to `mesh`.

    Trace (call) jitted model code inside it; outside it those constraints are no-ops.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_physical(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                        rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """Mesh PartitionSpec for an array of `shape` with logical axis names `logical`.

    A dimension that its mesh axes do not divide evenly is replicated instead (e.g. 8 kv heads on
    a tensor axis of 16), so any mesh works for any model; only memory, never results, changes.
    """
    physical = nn.logical_to_mesh_axes(logical, rules)
    fitted = []
    for dim, axes in zip(shape, physical):
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        size = math.prod(mesh.shape[name] for name in names)
        fitted.append(axes if names and dim % size == 0 else None)
    return PartitionSpec(*fitted)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedSharding pytree for a pytree of logical PartitionSpecs and matching shapes."""
    return jax.tree.map(
        lambda logical, leaf: NamedSharding(
            mesh, logical_to_physical(logical, leaf.shape, mesh, rules)),
        logical_tree, shape_tree, is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def param_shardings(cfg, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedSharding pytree for `model.init(cfg, ...)` params on `mesh`."""
    from dasd_jax import model  # local import: model does not depend on sharding

    return tree_shardings(model.param_logical_axes(cfg), model.param_shapes(cfg), mesh, rules)


def lora_shardings(cfg, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedSharding pytree for `model.init_lora(cfg, ...)` adapters on `mesh`."""
    from dasd_jax import model

    return tree_shardings(model.lora_logical_axes(cfg), model.lora_shapes(cfg), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding for a batch array [B, ...]: batch over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def place(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global jax.Array from a host array every process holds whole; each device gets its
    slice."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


class MeshJit:
    """`jax.jit(fn, **jit_kwargs)` that traces, lowers and runs inside `activation_rules(mesh)`,
    so the model's logical activation constraints bind to `mesh` without the caller's help."""

    def __init__(self, fn, mesh: Mesh, rules=LOGICAL_AXIS_RULES, **jit_kwargs):
        self.mesh, self.rules = mesh, rules
        self.jitted = jax.jit(fn, **jit_kwargs)

    def __call__(self, *args):
        with activation_rules(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with activation_rules(self.mesh, self.rules):
            return self.jitted.lower(*args)


def abstract(shapes, shardings):
    """ShapeDtypeStructs of a pytree of shapes (`jax.eval_shape`'s) laid out by `shardings`:
    what a program is lowered for, or a checkpoint restored into, without allocating."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def mesh_of(tree) -> Mesh | None:
    """The mesh the arrays (or ShapeDtypeStructs) of `tree` are laid out on, or None when they
    carry no NamedSharding."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(getattr(leaf, "sharding", None), NamedSharding):
            return leaf.sharding.mesh
    return None


def to_host(tree):
    """numpy copies of a pytree of arrays, gathering the shards other processes hold (every
    process must call this for a multi-host array)."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)
