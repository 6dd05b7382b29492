"""Wanda (Sun et al. 2023): prune by |W| · ‖X_j‖, per output, from one calibration pass.

Reference: locuslab/wanda ``prune_wanda`` (see docs/methods.md). Per input channel j,
``s_j = Σ_tokens x_j² / n_sequences`` in fp32 (their running mean over
sequences); score ``|W_ji| · sqrt(s_j)`` (our kernel is ``[in, out]``: torch's
row i is our column i). Unstructured: every output keeps exactly
``in − int(in · ratio)`` weights, the lowest scores pruned by a stable sort.
N:M: the n lowest of every m consecutive inputs of each output.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from maxprune.prune.api import register
from maxprune.prune.engine.layer import SITE_OF, get_linear, take
from maxprune.prune.sparse import nm as nm_lib
from maxprune.prune.sparse import report

LINEAR_SITES = ("attn_in", "attn_out", "mlp_in", "mlp_hidden")


@dataclasses.dataclass(frozen=True)
class SquaredNorms:
    """Σ over tokens of x_j² per input channel, divided by the number of sequences."""

    sites: tuple[str, ...] = LINEAR_SITES

    def init(self, dims: Mapping[str, int]):
        return {site: jnp.zeros((d,), jnp.float32) for site, d in dims.items()}

    def update(self, stats, inputs):
        return {site: stats[site] + jnp.sum(jnp.square(inputs[site].astype(jnp.float32)), axis=(0, 1))
                for site in stats}

    def finalize(self, stats, n_sequences: int):
        return {site: s / n_sequences for site, s in stats.items()}


@functools.partial(jax.jit, static_argnums=(2, 3))
def wanda_keep(w_IO: jax.Array, s_I: jax.Array, ratio: float, n_m: tuple[int, int] | None) -> jax.Array:
    """Keep-mask of one kernel from its input channels' mean squared norms (one block of outputs at a time)."""
    return nm_lib.by_output_blocks(lambda w_Ic: _keep_block(w_Ic, s_I, ratio, n_m), w_IO)


def _keep_block(w_Ic, s_I, ratio, n_m):
    score_Ic = jnp.abs(w_Ic.astype(jnp.float32)) * jnp.sqrt(s_I)[:, None]
    if n_m is not None:
        return nm_lib.prune_n_of_m(score_Ic, *n_m)
    return nm_lib.prune_lowest_per_output(score_Ic, int(w_Ic.shape[0] * ratio))


class WandaPruner:
    def __init__(self, ratio: float, n_m: tuple[int, int] | None):
        self.ratio, self.n_m = ratio, n_m
        self.accumulator = SquaredNorms()

    def prune_layer(self, layers, i, stats, linears: Sequence[str]):
        stacks = {name: get_linear(layers, name) for name in linears}
        norms = {name: stats[SITE_OF[name]] for name in linears}
        return {}, _wanda_layer(stacks, i, norms, self.ratio, self.n_m), {}


@functools.partial(jax.jit, static_argnums=(3, 4))
def _wanda_layer(stacks, i, norms, ratio, n_m):
    """All of layer i's keep-masks in one program (kernels read from their stacks in place).

    Off a mesh, the kernels sharing an input width go through one blocked loop
    (`nm.stacked_by_output_blocks`: the rule compiled once per input width, not
    once per kernel); on a mesh each kernel is gathered and done alone.
    """
    out = {}
    if jax.sharding.get_abstract_mesh().empty:
        for names in _by_input_width(stacks):
            keeps = nm_lib.stacked_by_output_blocks(
                lambda w_Ic, s_I: _keep_block(w_Ic, s_I, ratio, n_m), [stacks[n] for n in names], i,
                [norms[n] for n in names])
            if keeps is not None:
                out.update(zip(names, keeps))
    for name, w in stacks.items():
        if name not in out:
            out[name] = wanda_keep(take(w, i), norms[name], ratio, n_m)
    return out


def _by_input_width(stacks) -> list[tuple[str, ...]]:
    groups: dict[int, list[str]] = {}
    for name, w in stacks.items():
        groups.setdefault(w.shape[1], []).append(name)
    return [tuple(g) for g in groups.values()]


def check(arch, cfg) -> None:
    """Before calibration is loaded: the pattern fits the shapes."""
    nm_lib.check_fits(arch, cfg.pattern)


@register("wanda")
def prune(params, arch, calibration_NL, cfg):
    pruner = WandaPruner(cfg.ratio, nm_lib.check_fits(arch, cfg.pattern))
    return report.prune_and_summarize("wanda", pruner, params, arch, calibration_NL, cfg)
