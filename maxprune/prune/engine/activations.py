"""The calibration activations: checked tokens, embedded into chunks, placed on the params' mesh.

`check_calibration` validates the token array; `embed_calibration` turns it
into layer 0's inputs, chunks of ``batch_size`` sequences ``[B, L, D]`` in the
compute dtype (batch-sharded when the params live on a mesh). `mesh_of` finds
that mesh from the params' shardings; `mesh_scope` makes it current and
`replicate` puts a small tree (statistics, one layer) on every device.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model.arch import Arch
from maxprune.prune.engine.layer import Tree
from maxprune.prune.engine.options import EngineOptions


def mesh_of(tree) -> jax.sharding.Mesh | None:
    """The mesh the params live on, or None (single device / host numpy)."""
    for leaf in jax.tree.leaves(tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def _place_chunk(x, mesh):
    """Batch-shard a chunk over data×fsdp when the mesh divides it, else replicate it."""
    if mesh is None:
        return x
    return jax.device_put(x, sharding.batch_or_replicated(mesh, x.shape[0], x.ndim))


def replicate(tree, mesh):
    return tree if mesh is None else jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def check_calibration(calibration_NL, arch: Arch) -> np.ndarray:
    tokens = np.asarray(calibration_NL)
    if tokens.ndim != 2 or 0 in tokens.shape or not np.issubdtype(tokens.dtype, np.integer):
        raise MaxpruneError(f"calibration tokens must be a non-empty int [n_samples, seq_len] array, "
                            f"got {tokens.dtype} {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= arch.vocab_size:
        raise MaxpruneError(f"calibration token ids span [{tokens.min()}, {tokens.max()}]; they must be in "
                            f"[0, {arch.vocab_size}) for vocab_size={arch.vocab_size}")
    if tokens.shape[1] > arch.max_position_embeddings:
        raise MaxpruneError(f"calibration seq_len={tokens.shape[1]} exceeds the model's "
                            f"max_position_embeddings={arch.max_position_embeddings}")
    return tokens.astype(np.int32)


def embed_calibration(params: Tree, arch: Arch, calibration_NL, options: EngineOptions,
                      mesh=None) -> list[jax.Array]:
    """Layer 0's inputs as chunks of `batch_size` sequences, ``[B, L, D]`` in the compute dtype."""
    tokens = check_calibration(calibration_NL, arch)
    table = params["embed"]["embedding"]
    return [_place_chunk(_embed(table, tokens[i:i + options.batch_size], options.dtype), mesh)
            for i in range(0, tokens.shape[0], options.batch_size)]


@functools.partial(jax.jit, static_argnums=2)
def _embed(table_VD, tokens_BL, dtype: str):
    return table_VD.astype(llama.DTYPES[dtype])[tokens_BL]  # what nn.Embed(dtype=...) computes
