"""Device mesh and logical-axis sharding.

The mesh has three axes: ``data`` (pure data parallel), ``fsdp`` (data parallel
with parameters sharded) and ``tensor`` (heads / FFN / vocab split). Every
parameter and key activation carries logical axis names; `RULES` maps them to
mesh axes, in this one table. Masks and optimizer moments share their weight's
path suffix, so they get their weight's sharding for free.

A dimension that a mesh axis does not divide is left unsharded along that axis
(pruned shapes such as 20 heads on 8 tensor devices stay valid); the fallback
is silent because it is a placement choice, not an error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from maxprune.errors import MaxpruneError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (tuple, in order of preference; None = replicated)
RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

# Logical axes of each parameter, by path suffix. Leaves under `layers/` get a
# leading "layers" axis (they are stacked for the scan).
PARAM_AXES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("attn_norm", "scale"): ("norm",),
    ("mlp_norm", "scale"): ("norm",),
    ("final_norm", "scale"): ("norm",),
    ("attn", "q", "kernel"): ("embed", "q_heads"),
    ("attn", "k", "kernel"): ("embed", "kv_heads"),
    ("attn", "v", "kernel"): ("embed", "kv_heads"),
    ("attn", "o", "kernel"): ("q_heads", "embed"),
    ("attn", "o", "bias"): ("norm",),
    ("mlp", "gate", "kernel"): ("embed", "mlp"),
    ("mlp", "up", "kernel"): ("embed", "mlp"),
    ("mlp", "down", "kernel"): ("mlp", "embed"),
    ("mlp", "down", "bias"): ("norm",),
    ("lm_head", "kernel"): ("embed", "vocab"),
}


# ----------------------------------------------------------------------- mesh
def mesh_section() -> dict[str, int]:
    """The `mesh` config section."""
    return {"data": 1, "fsdp": -1, "tensor": 1}  # -1: fill with the remaining devices


def check_mesh(cfg) -> None:
    check_mesh_axes({axis: cfg.mesh[axis] for axis in MESH_AXES})


def check_mesh_axes(sizes: dict[str, int]) -> list[str]:
    """Each axis >= 1 or -1, at most one -1; the axes to fill."""
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise MaxpruneError(f"mesh.{name}={size} must be >= 1, or -1 to use the remaining devices")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise MaxpruneError(f"at most one mesh axis may be -1, got -1 for {', '.join('mesh.' + n for n in fill)}")
    return fill


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Fill the one ``-1`` axis with the remaining devices; check the product."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    fill = check_mesh_axes(sizes)
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % fixed:
            raise MaxpruneError(
                f"mesh axes {sizes} cannot fill {num_devices} devices: "
                f"{num_devices} is not divisible by {fixed}")
        sizes[fill[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise MaxpruneError(
            f"mesh data×fsdp×tensor = {sizes['data']}×{sizes['fsdp']}×{sizes['tensor']} "
            f"= {math.prod(sizes.values())} but {num_devices} devices are available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(mesh_cfg=None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), sized by `mesh_cfg`."""
    devices = list(devices if devices is not None else jax.devices())
    data, fsdp, tensor = (1, -1, 1) if mesh_cfg is None else (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices))
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, AssertionError, NotImplementedError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """Make `mesh` and `RULES` current, so the model's activation constraints apply."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        yield mesh


def mesh_scope(mesh: Mesh | None):
    """`use_mesh` for a mesh; nothing for None (params on a single device, no constraints to apply)."""
    return use_mesh(mesh) if mesh is not None else contextlib.nullcontext()


# --------------------------------------------------------------------- specs
def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, Any]] = RULES) -> PartitionSpec:
    """PartitionSpec for logical `axes` of an array of `shape` on `mesh`.

    Mesh axes are used at most once, and only while they divide the dimension.
    """
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        wanted = table.get(name) if name is not None else None
        wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
        chosen: list[str] = []
        for axis in wanted:
            size = mesh.shape[axis]
            if axis in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in chosen) * size) == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def logical_axes(path, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of the leaf at `path` (params, masks, optimizer moments alike)."""
    keys = _path_keys(path)
    for suffix, axes in PARAM_AXES.items():
        if keys[-len(suffix):] == suffix:
            if "layers" in keys[:-len(suffix)]:
                axes = ("layers",) + axes
            if len(axes) == ndim:
                return axes
    return (None,) * ndim


def tree_shardings(tree, mesh: Mesh):
    """NamedSharding for every leaf (arrays or ShapeDtypeStructs) of a params-like tree."""
    def one(path, leaf):
        shape = np.shape(leaf) if not hasattr(leaf, "shape") else leaf.shape
        return NamedSharding(mesh, spec_for(logical_axes(path, len(shape)), shape, mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def shard_tree(tree, mesh: Mesh):
    """Place a params/masks tree on `mesh` according to its logical axes."""
    return jax.device_put(tree, tree_shardings(tree, mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation; a no-op outside `use_mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[B, L, ...]`` batch: batch over data×fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def batch_or_replicated(mesh: Mesh, batch: int, ndim: int = 2) -> NamedSharding:
    """`batch_sharding` when data×fsdp divides `batch`, else replicated (small batches on many devices)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    return batch_sharding(mesh, ndim) if batch % dp == 0 else NamedSharding(mesh, PartitionSpec())
