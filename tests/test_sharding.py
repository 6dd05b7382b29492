"""Mesh sizing, logical-axis rules and the divisibility fallback."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from maxprune import sharding
from maxprune.errors import MaxpruneError


def _mesh(devices8, data, fsdp, tensor):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)), devices8)


@pytest.mark.parametrize("sizes, n, expected", [
    ((1, -1, 1), 8, (1, 8, 1)),
    ((2, -1, 2), 8, (2, 2, 2)),
    ((-1, 1, 4), 8, (2, 1, 4)),
    ((1, 1, 1), 1, (1, 1, 1)),
])
def test_resolve_mesh_shape(sizes, n, expected):
    assert sharding.resolve_mesh_shape(*sizes, n) == expected


@pytest.mark.parametrize("sizes, n, fragment", [
    ((-1, -1, 1), 8, "at most one"),
    ((3, -1, 1), 8, "not divisible"),
    ((2, 2, 1), 8, "devices are available"),
    ((0, -1, 1), 8, "mesh.data"),
])
def test_resolve_mesh_shape_errors(sizes, n, fragment):
    with pytest.raises(MaxpruneError, match=fragment):
        sharding.resolve_mesh_shape(*sizes, n)


def test_rules_map_params_to_mesh(devices8):
    mesh = _mesh(devices8, 2, 2, 2)
    q = jax.ShapeDtypeStruct((4, 64, 128), np.float32)
    spec = sharding.tree_shardings({"layers": {"attn": {"q": {"kernel": q}}}}, mesh)
    assert spec["layers"]["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor")


def test_non_divisible_dims_fall_back_to_replicated(devices8):
    mesh = _mesh(devices8, 1, 2, 4)
    # 20 heads x 128 = 2560 columns split 4 ways is fine; 6 columns are not
    assert sharding.spec_for(("embed", "q_heads"), (64, 2560), mesh) == P("fsdp", "tensor")
    assert sharding.spec_for(("embed", "q_heads"), (63, 6), mesh) == P(None, None)
    # a batch of 2 cannot split over data x fsdp = 1 x 2 ... it can; 3 cannot
    assert sharding.spec_for(("act_batch",), (2,), mesh) == P("fsdp")
    assert sharding.spec_for(("act_batch",), (3,), mesh) == P(None)


def test_mesh_axis_used_once_per_array(devices8):
    mesh = _mesh(devices8, 1, 1, 8)
    # vocab and mlp both want `tensor`; only the first dimension gets it
    assert sharding.spec_for(("vocab", "mlp"), (16, 16), mesh) == P("tensor", None)


def test_optimizer_moments_follow_their_weights(devices8):
    mesh = _mesh(devices8, 1, 4, 2)
    w = jax.ShapeDtypeStruct((2, 64, 192), np.float32)
    tree = {"opt": ({"mu": {"layers": {"mlp": {"up": {"kernel": w}}}}},), "count": jax.ShapeDtypeStruct((), np.int32)}
    shardings = sharding.tree_shardings(tree, mesh)
    assert shardings["opt"][0]["mu"]["layers"]["mlp"]["up"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert shardings["count"].spec == P()


def test_constrain_is_noop_without_mesh():
    x = np.ones((4, 4), np.float32)
    assert sharding.constrain(x, ("act_batch", "act_embed")) is x
