"""One decoder layer as the engine sees it: its linears, input sites, and what a method supplies.

Holds the names (`LINEARS`, `SITES`, `SITE_OF`, the linear groups), the two
protocols a method implements (`Accumulator`, `LayerPruner`), reading layer
``i`` of the stacked ``params["layers"]`` inside a jitted function (`take`,
`take_layer`, no copy outside the program), and `run_layer`, one layer with
every site captured. Nothing here runs the layer loop; see `engine`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
from jax import lax
from jax.sharding import PartitionSpec

from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch

Tree = dict[str, Any]

# linear name -> (block, name) in the params tree
LINEARS: dict[str, tuple[str, str]] = {name: (block, name) for block, name in masks_lib.PRUNABLE}
SITE_OF: dict[str, str] = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out",
                           "gate": "mlp_in", "up": "mlp_in", "down": "mlp_hidden"}
SITES = ("layer_in", "attn_in", "attn_out", "mlp_in", "mlp_hidden", "layer_out")
ALL_LINEARS = tuple(LINEARS)
SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))


# ------------------------------------------------------------------ protocols
class Accumulator(Protocol):
    """Statistics of a layer's input sites, summed over calibration chunks.

    `sites`: the sites it can use. The engine calls ``init(dims)`` with the
    widths of the sites it wants now (a subset in sequential order), then
    ``update(stats, inputs)`` per chunk — jitted, `inputs` maps each of those
    sites to its ``[B, L, width]`` activation in the compute dtype (cast to fp32
    yourself) — and ``finalize(stats, n_sequences)`` once. Stats are any pytree.
    """

    sites: tuple[str, ...]

    def init(self, dims: Mapping[str, int]) -> Any: ...

    def update(self, stats: Any, inputs: Mapping[str, jax.Array]) -> Any: ...

    def finalize(self, stats: Any, n_sequences: int) -> Any: ...


class LayerPruner(Protocol):
    """One layer's decision: ``prune_layer(layers, i, stats, linears)``.

    `layers`: the stacked ``params["layers"]`` (``[num_layers, ...]``, kernels
    ``[L, in, out]``) and `i` the layer index — read layer i inside your jitted
    functions with `take_layer` / `take` (no copy of the layer outside them);
    `stats`: the finalized accumulator output for the sites of `linears` (None
    when `accumulator` is None: magnitude needs no statistics; yours to consume),
    `linears`: the names (q, k, v, o, gate, up, down) to prune now. Returns
    ``{linear: new kernel [in, out]}`` for the kernels it changed besides
    masking (SparseGPT's updates; ``{}`` for Wanda), ``{linear: keep-mask
    [in, out] bool}`` for those linears, and a JSON-able ``{linear: {...}}``
    report merged into the engine's per-linear report. The engine zeroes masked
    weights and writes both into the stacks in place.

    `reference_groups` (optional, default ``(ALL_LINEARS,)``): the groups of
    linears ``order="reference"`` prunes one after another, last input site
    first (see `check_reference_groups`): fewer statistics alive at a time for
    a few more partial forward passes.
    """

    accumulator: Accumulator | None

    def prune_layer(self, layers: Tree, i: int, stats: Any, linears: Sequence[str]
                    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array], dict[str, dict]]: ...


# ------------------------------------------------------------------ the layer
def slice_layer(tree: Tree | None, i: int) -> Tree | None:
    """Layer `i` of a layer-stacked ``params["layers"]`` (or masks) subtree."""
    return None if tree is None else jax.tree.map(lambda a: a[i], tree)


def take(stack: jax.Array, i) -> jax.Array:
    """``stack[i]`` inside a jitted function; gathered (replicated) when a mesh is current.

    Why inside: a slice taken outside a program is a copy of the layer (832 MB
    for a Llama-3.1-8B layer in fp32); inside, XLA reads it where it is used
    (a one-layer stack: not copied at all).
    """
    x = lax.dynamic_index_in_dim(stack, i, 0, keepdims=False)
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return lax.with_sharding_constraint(x, PartitionSpec())


def take_layer(layers: Tree, i) -> Tree:
    """Layer `i` of the stacked ``params["layers"]`` inside a jitted function (see `take`)."""
    return jax.tree.map(lambda a: take(a, i), layers)


def layer_dims(layer_params: Tree, stacked: bool = False) -> dict[str, int]:
    """Width of every site, read off the layer's kernels (so pruned shapes work too)."""
    kernel = lambda name: layer_params[LINEARS[name][0]][name]["kernel"].shape[int(stacked):]
    D, F = kernel("q")[0], kernel("down")[0]
    return {"layer_in": D, "attn_in": D, "attn_out": kernel("o")[0], "mlp_in": D,
            "mlp_hidden": F, "layer_out": kernel("o")[1]}


def sites_of(linears: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(SITE_OF[name] for name in linears))


def check_reference_groups(groups: Sequence[Sequence[str]]) -> tuple[tuple[str, ...], ...]:
    """Groups for ``order="reference"``: every linear once, no group reading a site after an earlier group's linear.

    A linear changes only the activations after its own input site, so with
    groups pruned last site first each group's statistics are the dense layer's.
    """
    groups = tuple(tuple(g) for g in groups)
    names = [name for g in groups for name in g]
    if sorted(names) != sorted(ALL_LINEARS):
        raise MaxpruneError(f"reference groups {groups} must name each of {ALL_LINEARS} once")
    position = {site: k for k, site in enumerate(SITES)}
    for k, group in enumerate(groups):
        earliest_pruned = min((position[SITE_OF[n]] for g in groups[:k] for n in g), default=len(SITES))
        if any(position[SITE_OF[n]] > earliest_pruned for n in group):
            raise MaxpruneError(f"reference group {group} reads a site after a linear pruned before it")
    return groups


def run_layer(layer_params: Tree, x_BLD: jax.Array, arch: Arch, options: llama.ModelOptions,
              layer_masks: Tree | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(y_BLD, {site: activation})``: one decoder layer with every site captured."""
    y, inter = llama.apply_layer(layer_params, x_BLD, arch, layer_masks=layer_masks, options=options,
                                 capture=True)
    sites = {"layer_in": x_BLD, "attn_in": inter["attn"]["q"]["input"][0],
             "attn_out": inter["attn"]["o"]["input"][0], "mlp_in": inter["mlp"]["gate"]["input"][0],
             "mlp_hidden": inter["mlp"]["down"]["input"][0], "layer_out": y}
    return y, sites


def get_linear(layer_params: Tree, name: str) -> jax.Array:
    """A linear's kernel: ``[in, out]`` of one layer, ``[num_layers, in, out]`` of the stacked layers."""
    block, _ = LINEARS[name]
    return layer_params[block][name]["kernel"]


def set_linears(layer_params: Tree, kernels: Mapping[str, jax.Array]) -> Tree:
    """A copy of `layer_params` with some kernels replaced."""
    out = jax.tree.map(lambda a: a, layer_params)
    for name, kernel in kernels.items():
        block, _ = LINEARS[name]
        out[block][name] = {**out[block][name], "kernel": kernel}
    return out


def kernel_dims(arch: Arch) -> dict[str, tuple[int, int]]:
    """``{linear: (in, out)}`` of the seven prunable kernels."""
    D, Q, K, F = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.ffn_size
    return {"q": (D, Q), "k": (D, K), "v": (D, K), "o": (Q, D), "gate": (D, F), "up": (D, F), "down": (F, D)}
