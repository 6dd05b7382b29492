"""The layer loop every calibration-based pruner runs on.

Why one engine: Wanda, SparseGPT, magnitude, FLAP and Minitron all walk the
decoder the same way — embed the calibration tokens, then per layer: run it on
every calibration sequence collecting statistics of its linears' inputs, decide,
and run it again to produce the next layer's inputs. Only the statistics and
the decision differ, so those are the two things a method supplies:

- an `Accumulator` (``init / update / finalize``): what to sum over the
  calibration tokens at each input *site* of a layer (fp32, jitted, summed chunk
  by chunk so one chunk of activations is alive at a time);
- a `LayerPruner` (``accumulator`` + ``prune_layer``): new layer params and masks
  from one layer's params and its finalized statistics.

Sites are the places a layer reads a tensor (q, k and v share one input, so its
statistics are computed once, not three times)::

    layer_in    x_BLD  the layer's input (residual stream)
    attn_in     h_BLD  attn_norm output = input of q, k, v
    attn_out    a_BLQ  input of o (Q = num_heads * head_dim)
    mlp_in      h_BLD  mlp_norm output = input of gate, up
    mlp_hidden  h_BLF  input of down
    layer_out   y_BLD  the layer's output

Two entry points:

- `prune_layerwise(params, arch, calibration_NL, pruner, options)`: the shared
  layer loop of Wanda / SparseGPT / magnitude (docs/methods.md): statistics from the
  *dense* layer for all seven linears (``order="reference"``; a pruner may ask
  for them in groups, last input site first, so that one group's statistics
  are alive at a time — a linear only changes the sites after its own, so the
  statistics stay the dense layer's), or group by group q,k,v → o → gate,up →
  down from the partly pruned layer (``order="sequential"``, SparseGPT's
  ``--true-sequential``); the *pruned* layer feeds the next one (the last
  layer's outputs feed nothing: no forward pass). Returns a `PruneResult` with
  masks and a report (per linear: sparsity, relative reconstruction error
  ‖XW−XŴ‖/‖XW‖ on the dense layer's inputs from the first
  ``options.error_samples`` calibration sequences — whole batches, 8 by
  default: an error pass costs about three forward passes per batch, and a few
  thousand tokens estimate the ratio well; per layer: seconds).
- `collect_stats(params, arch, calibration_NL, accumulator, options)`: one pass
  of the *unchanged* model, finalized statistics per layer (FLAP, Minitron).

Memory: the calibration activations (chunks of `batch_size` sequences in the
compute dtype) plus one group's statistics and decisions. `prune_layerwise`
makes no copy of the layer: every jitted pass and decision reads layer ``i``
from the stacked ``[num_layers, ...]`` arrays itself (`take_layer`), and the
pruned kernels and masks are written into the stacks in place (donated); only
``order="sequential"`` with reconstruction errors keeps a dense copy of the
layer (its errors are measured on the dense layer's inputs). Params may be
sharded on a mesh (found from their shardings): inside those programs layer
``i`` is gathered (replicated) for the statistics and the decision, the
stacks keep their shardings, and the activation chunks are batch-sharded.

The engine's modules (`maxprune.prune.engine`), in the order a run uses them;
methods import each name from the module that defines it:

- `layer`: linears, sites, the `Accumulator` / `LayerPruner` protocols, reading
  layer ``i`` from the stacks (`take`, `take_layer`), `run_layer`;
- `options`: `EngineOptions`, `run_options`, `options_for`;
- `activations`: checking and embedding the calibration tokens into chunks, the mesh;
- `passes`: the jitted per-chunk programs (statistics, forward, errors);
- `stack_writer`: writing pruned kernels and masks into the stacks in place;
- `loop` (this module): the loops (`collect_stats`, `prune_layerwise`) and the report.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.prune.api import PruneResult
from maxprune.prune.engine.activations import embed_calibration, mesh_of
from maxprune.prune.engine.layer import (
    ALL_LINEARS,
    SEQUENTIAL_GROUPS,
    Accumulator,
    LayerPruner,
    Tree,
    check_reference_groups,
    layer_dims,
    sites_of,
)
from maxprune.prune.engine.options import EngineOptions, options_for
from maxprune.prune.engine.passes import Passes, layer_with_masks, passes_for
from maxprune.prune.engine.stack_writer import StackWriter


# ------------------------------------------------------------- collect_stats
def collect_stats(params: Tree, arch: Arch, calibration_NL, accumulator: Accumulator,
                  options: EngineOptions | None = None, masks: Tree | None = None,
                  sites: Sequence[str] | None = None) -> list[Any]:
    """Finalized statistics of every layer from one pass of the unchanged (masked) model.

    For methods that score the dense model (FLAP, Minitron width/depth): layer
    i's inputs are the unpruned layer i−1's outputs. `sites` defaults to
    ``accumulator.sites``.
    """
    options = options or options_for()
    sites = tuple(sites or accumulator.sites)
    mesh = mesh_of(params)
    passes = passes_for(arch, options, accumulator)
    out = []
    with sharding.mesh_scope(mesh):
        chunks = embed_calibration(params, arch, calibration_NL, options, mesh)
        n = sum(x.shape[0] for x in chunks)
        for i in _layer_bar(arch, options, f"{options.desc} stats"):
            layer = layer_with_masks(params, masks, i, mesh)
            dims = {s: d for s, d in layer_dims(layer).items() if s in sites}
            stats = passes.zeros(dims, layer, mesh)
            for j, x in enumerate(chunks):
                stats, chunks[j] = passes.update_forward(layer, stats, x, sites)
            out.append(accumulator.finalize(stats, n))
    return out


def _layer_bar(arch: Arch, options: EngineOptions, desc: str):
    show = options.progress and jax.process_index() == 0
    return tqdm(range(arch.num_layers), desc=desc, unit="layer", disable=not show)


# ----------------------------------------------------------- prune_layerwise
def prune_layerwise(params: Tree, arch: Arch, calibration_NL, pruner: LayerPruner,
                    options: EngineOptions | None = None, masks: Tree | None = None) -> PruneResult:
    """The shared layer loop (Wanda, SparseGPT, magnitude); see the module docstring.

    `calibration_NL` may be None only for a pruner without an accumulator
    (magnitude): then no forward runs and the report has no reconstruction
    errors. Existing `masks` (a sparse parent) are baked into the weights as
    zeros first; the returned masks replace them. The params keep their
    sharding; with ``options.donate`` the caller's stacked arrays are reused.
    """
    options = options or options_for()
    if calibration_NL is None and pruner.accumulator is not None:
        raise MaxpruneError("this pruning method needs calibration tokens: set prune.calibration")
    mesh = mesh_of(params)
    passes = passes_for(arch, options, pruner.accumulator)
    writer = StackWriter(params, options.donate)
    sequential = options.order == "sequential"
    groups = SEQUENTIAL_GROUPS if sequential else check_reference_groups(
        getattr(pruner, "reference_groups", (ALL_LINEARS,)))
    layers_report = []
    start = time.perf_counter()
    with sharding.mesh_scope(mesh):
        chunks = None if calibration_NL is None else embed_calibration(params, arch, calibration_NL, options, mesh)
        n = 0 if chunks is None else sum(x.shape[0] for x in chunks)
        error_chunks = _error_chunks(chunks, options)
        loop = _LayerLoop(pruner, passes, writer, groups, chunks, n, mesh, error_chunks, sequential,
                          last=arch.num_layers - 1)
        errors_wanted = error_chunks > 0
        bar = _layer_bar(arch, options, options.desc)
        for i in bar:
            t0 = time.perf_counter()
            if masks:
                writer.bake(i, masks["layers"])
            kept, linears_report, sums = loop.prune(i)
            jax.block_until_ready((chunks, writer.layers, writer.masks))  # honest per-layer time
            seconds = time.perf_counter() - t0
            errors = {name: _relative(*sums.get(name, (0.0, 0.0))) for name in ALL_LINEARS} if errors_wanted else None
            layers_report.append(_layer_report(i, seconds, writer, kept, linears_report, errors))
            bar.set_postfix(seconds=f"{seconds:.1f}")
    new_params, new_masks = writer.result()
    report = {"order": options.order, "dtype": options.dtype, "batch_size": options.batch_size,
              "calibration_sequences": n,
              "calibration_tokens": 0 if calibration_NL is None else int(np.size(calibration_NL)),
              "error_sequences": sum(x.shape[0] for x in chunks[:error_chunks]) if chunks else 0,
              "seconds": time.perf_counter() - start, "layers": layers_report}
    return PruneResult(new_params, arch, new_masks, report)


def _error_chunks(chunks, options: EngineOptions) -> int:
    """How many leading chunks the reconstruction errors are measured on: whole batches covering
    ``options.error_samples`` sequences (an error pass costs about three forward passes per chunk)."""
    if chunks is None or not options.reconstruction or not options.error_samples:
        return 0
    covered, k = 0, 0
    while k < len(chunks) and covered < options.error_samples:
        covered, k = covered + chunks[k].shape[0], k + 1
    return k


@dataclasses.dataclass
class _LayerLoop:
    """What one `prune_layerwise` run does to each layer: prune it group by group, then feed it forward."""

    pruner: LayerPruner
    passes: Passes
    writer: StackWriter
    groups: tuple[tuple[str, ...], ...]
    chunks: list[jax.Array] | None  # the current layer's inputs, replaced chunk by chunk by its outputs
    n: int                          # calibration sequences
    mesh: Any
    error_chunks: int               # errors are measured on chunks[:error_chunks] (0: none)
    sequential: bool
    last: int                       # the last layer: its outputs feed nothing, so its forward pass is skipped

    def prune(self, i: int) -> tuple[dict, dict, dict]:
        """Prune layer i, replace the chunks by its outputs (not the last layer's): (kept, report, error sums)."""
        # sequential: later groups see earlier ones pruned, but errors are measured on the dense layer's inputs
        dense = (layer_with_masks({"layers": self.writer.layers}, None, i, self.mesh)
                 if self.error_chunks and self.sequential else None)
        kept, linears_report, sums = {}, {}, {}
        for linears in self.groups:
            self._prune_group(i, linears, kept, linears_report, sums, bool(self.error_chunks) and dense is None)
        if dense is not None:
            _add_errors(sums, (self.passes.dense_errors(dense, self.writer.layers, i, x)
                               for x in self.chunks[:self.error_chunks]))
            del dense
        if self.chunks is not None and i != self.last:
            for j, x in enumerate(self.chunks):
                self.chunks[j] = self.passes.forward(self.writer.layers, i, x)
        return kept, linears_report, sums

    def _prune_group(self, i: int, linears: Sequence[str], kept: dict, linears_report: dict, sums: dict,
                     group_errors: bool) -> None:
        """Decide one group of layer i's linears and write it into the stacks (errors measured before the write)."""
        stats = None
        if self.pruner.accumulator is not None:
            sites = tuple(s for s in sites_of(linears) if s in self.pruner.accumulator.sites)
            stats = self.passes.stats(self.writer.layers, i, self.chunks, sites, self.n, self.mesh)
        kernels, keeps, group_report = self.pruner.prune_layer(self.writer.layers, i, stats, linears)
        del stats
        if group_errors and (kernels or keeps):
            _add_errors(sums, (self.passes.group_errors(self.writer.layers, i, x, kernels, keeps, tuple(linears))
                               for x in self.chunks[:self.error_chunks]))
        linears_report.update(group_report)
        kept.update(self.writer.write(i, kernels, keeps))
        del kernels, keeps


# -------------------------------------------------------------------- report
def _add_errors(sums: dict, per_chunk) -> None:
    """Add each chunk's ``{linear: (Σ‖X(W−Ŵ)‖², Σ‖XW‖²)}`` to `sums` (on the host)."""
    for errors in per_chunk:
        for name, (err, ref) in jax.device_get(errors).items():
            sums[name] = sums.get(name, np.zeros(2)) + (err, ref)


def _relative(err, ref) -> float:
    return float(np.sqrt(err / ref)) if ref > 0 else 0.0


def _layer_report(i, seconds, writer, kept, linears_report, errors) -> dict:
    linears, kept = {}, jax.device_get(kept)
    for name in ALL_LINEARS:
        row = dict(linears_report.get(name, {}))
        if name in kept:
            row["sparsity"] = float(1.0 - int(kept[name]) / math.prod(writer.masks[name].shape[1:]))
        if errors is not None:
            row["rel_error"] = errors[name]
        linears[name] = row
    return {"layer": i, "seconds": seconds, "linears": linears}
