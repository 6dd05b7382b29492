"""The jitted per-chunk programs of an engine run: statistics, forward, reconstruction errors.

`passes_for` returns the `Passes` of one (arch, dtype, accumulator), compiled
once for all layers and reused across runs when the accumulator is hashable.
Every program reads layer ``i`` from the stacked params itself (`take_layer`),
so no copy of the layer is made outside them; `layer_with_masks` is the one
deliberate copy (the unchanged layer of `collect_stats`, the dense reference of
``order="sequential"`` errors).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch
from maxprune.prune.engine.activations import replicate
from maxprune.prune.engine.layer import (
    ALL_LINEARS,
    SITE_OF,
    Accumulator,
    Tree,
    get_linear,
    layer_dims,
    run_layer,
    take_layer,
)
from maxprune.prune.engine.options import EngineOptions

_PASSES: dict = {}


def passes_for(arch: Arch, options: EngineOptions, accumulator: Accumulator | None) -> "Passes":
    """The jitted passes for (arch, dtype, accumulator), reused across runs when the accumulator is hashable."""
    try:
        key = (arch, options.dtype, accumulator)
        hash(key)
    except TypeError:
        return Passes(arch, options.dtype, accumulator)
    if key not in _PASSES:
        _PASSES[key] = Passes(arch, options.dtype, accumulator)
    return _PASSES[key]


class Passes:
    """The jitted per-chunk functions of one engine run (compiled once for all layers)."""

    def __init__(self, arch: Arch, dtype: str, accumulator: Accumulator | None):
        mo = llama.ModelOptions(dtype=dtype)
        self.accumulator = accumulator

        def update(layers, i, stats, x_BLD, sites):
            _, acts = run_layer(take_layer(layers, i), x_BLD, arch, mo)
            return accumulator.update(stats, {s: acts[s] for s in sites})

        def update_forward(layer, stats, x_BLD, sites):
            y, acts = run_layer(layer, x_BLD, arch, mo)
            return accumulator.update(stats, {s: acts[s] for s in sites}), y

        def forward(layers, i, x_BLD):
            return llama.apply_layer(take_layer(layers, i), x_BLD, arch, options=mo)

        def group_errors(layers, i, x_BLD, kernels, keeps, linears):
            """Per linear of a group, before it is written: Σ‖X(W−Ŵ)‖² and Σ‖XW‖² (X, W: the layer as it is)."""
            layer = take_layer(layers, i)
            _, acts = run_layer(layer, x_BLD, arch, mo)
            errors = {}
            for name in linears:
                w = get_linear(layer, name)
                w_hat = kernels[name].astype(w.dtype) if name in kernels else w
                if name in keeps:
                    w_hat = jnp.where(keeps[name], w_hat, jnp.zeros((), w.dtype))
                errors[name] = _squared_errors(acts[SITE_OF[name]], w, w_hat)
            return errors

        def dense_errors(dense, layers, i, x_BLD):
            """Per linear: Σ‖X(W−Ŵ)‖² and Σ‖XW‖² on the inputs of a dense copy of the layer."""
            _, acts = run_layer(dense, x_BLD, arch, mo)
            pruned = take_layer(layers, i)
            return {name: _squared_errors(acts[SITE_OF[name]], get_linear(dense, name), get_linear(pruned, name))
                    for name in ALL_LINEARS}

        self._inits: dict = {}
        self._finalize = jax.jit(accumulator.finalize, static_argnums=1) if accumulator is not None else None
        self.update = jax.jit(update, static_argnums=4, donate_argnums=2)
        self.update_forward = jax.jit(update_forward, static_argnums=3, donate_argnums=1)
        self.forward = jax.jit(forward)
        self.group_errors = jax.jit(group_errors, static_argnums=5)
        self.dense_errors = jax.jit(dense_errors)

    def stats(self, layers, i, chunks, sites, n_sequences, mesh) -> Any:
        """Finalized statistics of layer `i` (read from the stack as it is now) at `sites`."""
        dims = {s: d for s, d in layer_dims(layers, stacked=True).items() if s in sites}
        stats = self.zeros(dims, layers, mesh)
        for x in chunks:
            stats = self.update(layers, i, stats, x, tuple(sites))
        return self._finalize(stats, n_sequences)

    def zeros(self, dims, params, mesh) -> Any:
        """``accumulator.init(dims)`` from one program, placed like `params` (replicated on a mesh): an
        `update` first called on uncommitted zeros would compile a second copy of itself."""
        key = (tuple(dims.items()), _placement(params, mesh))
        if key not in self._inits:
            self._inits[key] = jax.jit(lambda: self.accumulator.init(dict(key[0])), out_shardings=key[1])
        return self._inits[key]()


def _placement(layers, mesh):
    """Where statistics live: replicated on the mesh, else on the params' device."""
    if mesh is not None:
        return NamedSharding(mesh, PartitionSpec())
    s = getattr(jax.tree.leaves(layers)[0], "sharding", None)
    if isinstance(s, NamedSharding):  # a one-device mesh: outputs of programs on it carry its sharding
        return NamedSharding(s.mesh, PartitionSpec())
    return s if isinstance(s, jax.sharding.SingleDeviceSharding) else None


def _squared_errors(x_BLI, w_IO, w_hat_IO):
    """(Σ‖X(W−Ŵ)‖², Σ‖XW‖²) in fp32, one sequence at a time so only an ``[L, out]`` product is alive."""
    dw_IO = (w_IO - w_hat_IO).astype(jnp.float32)

    def one(x_LI):
        x_LI = x_LI.astype(jnp.float32)
        ref = jnp.matmul(x_LI, w_IO.astype(jnp.float32), precision=lax.Precision.HIGHEST)
        diff = jnp.matmul(x_LI, dw_IO, precision=lax.Precision.HIGHEST)
        return jnp.stack([jnp.sum(diff * diff), jnp.sum(ref * ref)])

    err, ref = jnp.sum(lax.map(one, x_BLI), axis=0)
    return err, ref


def layer_with_masks(params, masks, i, mesh) -> Tree:
    """Layer i's params, replicated, with any existing mask baked in as zeros."""
    return replicate(_take_layer(params["layers"], masks["layers"] if masks else None, i), mesh)


@jax.jit
def _take_layer(layers, masks, i):
    layer = jax.tree.map(lambda a: a[i], layers)
    if masks:
        layer = masks_lib.apply_masks({"layers": layer}, {"layers": jax.tree.map(lambda a: a[i], masks)})["layers"]
    return layer
