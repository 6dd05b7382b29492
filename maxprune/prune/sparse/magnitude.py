"""Magnitude pruning: the baseline of the Wanda repository (``prune_magnitude``).

Unstructured: ONE threshold per matrix, ``sort(|W|.flatten())[int(numel · ratio)]``,
pruning ``|W| <= threshold`` (so one weight more than ``int(numel · ratio)`` on
tie-free data, as there). N:M: the n smallest |W| of every m consecutive inputs
of each output. Needs no calibration; given some, the report still measures
each linear's reconstruction error on it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from maxprune.prune.api import register
from maxprune.prune.engine.layer import get_linear, take
from maxprune.prune.sparse import nm as nm_lib
from maxprune.prune.sparse import report


@functools.partial(jax.jit, static_argnums=(1, 2))
def magnitude_keep(w_IO: jax.Array, ratio: float, n_m: tuple[int, int] | None) -> jax.Array:
    score_IO = jnp.abs(w_IO.astype(jnp.float32))
    if n_m is not None:
        return nm_lib.prune_n_of_m(score_IO, *n_m)
    return nm_lib.prune_at_or_below_kth(score_IO, int(w_IO.size * ratio))


class MagnitudePruner:
    accumulator = None  # no statistics

    def __init__(self, ratio: float, n_m: tuple[int, int] | None):
        self.ratio, self.n_m = ratio, n_m

    def prune_layer(self, layers, i, stats, linears: Sequence[str]):
        stacks = {name: get_linear(layers, name) for name in linears}
        return {}, _magnitude_layer(stacks, i, self.ratio, self.n_m), {}


@functools.partial(jax.jit, static_argnums=(2, 3))
def _magnitude_layer(stacks, i, ratio, n_m):
    """All of layer i's keep-masks in one program (kernels read from their stacks in place)."""
    return {name: magnitude_keep(take(w, i), ratio, n_m) for name, w in stacks.items()}


def check(arch, cfg) -> None:
    nm_lib.check_fits(arch, cfg.pattern)


@register("magnitude")
def prune(params, arch, calibration_NL, cfg):
    pruner = MagnitudePruner(cfg.ratio, nm_lib.check_fits(arch, cfg.pattern))
    return report.prune_and_summarize("magnitude", pruner, params, arch, calibration_NL, cfg)
