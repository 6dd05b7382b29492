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
  layer loop of Wanda / SparseGPT / magnitude (METHODS.md): statistics from the
  *dense* layer for all seven linears (``order="reference"``; a pruner may ask
  for them in groups, last input site first, so that one group's statistics
  are alive at a time — a linear only changes the sites after its own, so the
  statistics stay the dense layer's), or group by group q,k,v → o → gate,up →
  down from the partly pruned layer (``order="sequential"``, SparseGPT's
  ``--true-sequential``); the *pruned* layer feeds the next one. Returns a
  `PruneResult` with masks and a report (per linear: sparsity, relative
  reconstruction error ‖XW−XŴ‖/‖XW‖ on the dense layer's calibration inputs;
  per layer: seconds).
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
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch
from maxprune.prune.api import PruneResult

Tree = dict[str, Any]

# linear name -> (block, name) in the params tree
LINEARS: dict[str, tuple[str, str]] = {name: (block, name) for block, name in masks_lib.PRUNABLE}
SITE_OF: dict[str, str] = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_out",
                           "gate": "mlp_in", "up": "mlp_in", "down": "mlp_hidden"}
SITES = ("layer_in", "attn_in", "attn_out", "mlp_in", "mlp_hidden", "layer_out")
ALL_LINEARS = tuple(LINEARS)
SEQUENTIAL_GROUPS = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
ORDERS = ("reference", "sequential")


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


# -------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the layer loop runs (not what it decides)."""

    batch_size: int = 8            # calibration sequences per jitted forward
    order: str = "reference"       # see `ORDERS`
    dtype: str = "float32"         # compute dtype of the layer passes and the stored activations
    progress: bool = True          # tqdm bar over layers
    donate: bool = False           # may reuse the caller's stacked params buffers (saves a copy)
    reconstruction: bool = True    # measure per-linear relative reconstruction errors
    desc: str = "prune"            # progress bar label

    def __post_init__(self):
        if self.batch_size < 1:
            raise MaxpruneError(f"prune.batch_size={self.batch_size} must be >= 1")
        if self.order not in ORDERS:
            raise MaxpruneError(f"prune.order={self.order!r} is not valid; choose one of {', '.join(ORDERS)}")
        llama.ModelOptions(dtype=self.dtype)  # validates the dtype

    @property
    def model_options(self) -> llama.ModelOptions:
        return llama.ModelOptions(dtype=self.dtype)


_DEFAULTS: contextvars.ContextVar[dict] = contextvars.ContextVar("maxprune_engine_defaults", default={})


@contextlib.contextmanager
def run_options(**defaults) -> Iterator[None]:
    """Defaults for every `EngineOptions` built inside (e.g. by a registered pruner).

    Why: the pruner signature is ``fn(params, arch, calibration_NL, cfg)``; the
    caller (`maxprune.prune.run`) still needs to say how to run — compute dtype
    from ``cfg.model.dtype``, progress on/off, donate the freshly loaded params —
    without every method threading those through.
    """
    token = _DEFAULTS.set({**_DEFAULTS.get(), **defaults})
    try:
        yield
    finally:
        _DEFAULTS.reset(token)


def options_for(prune_cfg=None, **changes) -> EngineOptions:
    """EngineOptions from the `prune` config section (batch_size, order), `run_options` and `changes`."""
    values = dict(_DEFAULTS.get())
    if prune_cfg is not None:
        values.update(batch_size=prune_cfg.batch_size, order=prune_cfg.order, desc=prune_cfg.method)
    values.update(changes)
    return EngineOptions(**values)


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


def stacked_linear(layers: Tree, name: str) -> jax.Array:
    """The stacked ``[num_layers, in, out]`` kernel of a linear."""
    return get_linear(layers, name)


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
    block, _ = LINEARS[name]
    return layer_params[block][name]["kernel"]


def set_linears(layer_params: Tree, kernels: Mapping[str, jax.Array]) -> Tree:
    """A copy of `layer_params` with some kernels replaced."""
    out = jax.tree.map(lambda a: a, layer_params)
    for name, kernel in kernels.items():
        block, _ = LINEARS[name]
        out[block][name] = {**out[block][name], "kernel": kernel}
    return out


# ---------------------------------------------------------------- activations
def mesh_of(tree) -> jax.sharding.Mesh | None:
    """The mesh the params live on, or None (single device / host numpy)."""
    for leaf in jax.tree.leaves(tree):
        s = getattr(leaf, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh.size > 1:
            return s.mesh
    return None


def _mesh_scope(mesh):
    return sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _place_chunk(x, mesh):
    """Batch-shard a chunk over data×fsdp when the mesh divides it, else replicate it."""
    if mesh is None:
        return x
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    spec = sharding.batch_sharding(mesh, x.ndim) if x.shape[0] % dp == 0 else NamedSharding(mesh, PartitionSpec())
    return jax.device_put(x, spec)


def _replicate(tree, mesh):
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


# -------------------------------------------------------------- jitted passes
_PASSES: dict = {}


def _passes(arch: Arch, options: EngineOptions, accumulator: Accumulator | None) -> "_Passes":
    """The jitted passes for (arch, dtype, accumulator), reused across runs when the accumulator is hashable."""
    try:
        key = (arch, options.dtype, accumulator)
        hash(key)
    except TypeError:
        return _Passes(arch, options.dtype, accumulator)
    if key not in _PASSES:
        _PASSES[key] = _Passes(arch, options.dtype, accumulator)
    return _PASSES[key]


class _Passes:
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

        self.update = jax.jit(update, static_argnums=4, donate_argnums=2)
        self.update_forward = jax.jit(update_forward, static_argnums=3, donate_argnums=1)
        self.forward = jax.jit(forward)
        self.group_errors = jax.jit(group_errors, static_argnums=5)
        self.dense_errors = jax.jit(dense_errors)

    def stats(self, layers, i, chunks, sites, n_sequences, mesh) -> Any:
        """Finalized statistics of layer `i` (read from the stack as it is now) at `sites`."""
        dims = {s: d for s, d in layer_dims(layers, stacked=True).items() if s in sites}
        stats = _replicate(self.accumulator.init(dims), mesh)
        for x in chunks:
            stats = self.update(layers, i, stats, x, tuple(sites))
        return self.accumulator.finalize(stats, n_sequences)


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
    passes = _passes(arch, options, accumulator)
    out = []
    with _mesh_scope(mesh):
        chunks = embed_calibration(params, arch, calibration_NL, options, mesh)
        n = sum(x.shape[0] for x in chunks)
        for i in _layer_bar(arch, options, f"{options.desc} stats"):
            layer = _layer_with_masks(params, masks, i, mesh)
            dims = {s: d for s, d in layer_dims(layer).items() if s in sites}
            stats = _replicate(accumulator.init(dims), mesh)
            for j, x in enumerate(chunks):
                stats, chunks[j] = passes.update_forward(layer, stats, x, sites)
            out.append(accumulator.finalize(stats, n))
    return out


def _layer_with_masks(params, masks, i, mesh) -> Tree:
    """Layer i's params, replicated, with any existing mask baked in as zeros."""
    return _replicate(_take_layer(params["layers"], masks["layers"] if masks else None, i), mesh)


@jax.jit
def _take_layer(layers, masks, i):
    layer = jax.tree.map(lambda a: a[i], layers)
    if masks:
        layer = masks_lib.apply_masks({"layers": layer}, {"layers": jax.tree.map(lambda a: a[i], masks)})["layers"]
    return layer


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
    passes = _passes(arch, options, pruner.accumulator)
    writer = _StackWriter(params, options.donate)
    sequential = options.order == "sequential"
    groups = SEQUENTIAL_GROUPS if sequential else check_reference_groups(
        getattr(pruner, "reference_groups", (ALL_LINEARS,)))
    layers_report = []
    start = time.perf_counter()
    with _mesh_scope(mesh):
        chunks = None if calibration_NL is None else embed_calibration(params, arch, calibration_NL, options, mesh)
        n = 0 if chunks is None else sum(x.shape[0] for x in chunks)
        errors_wanted = options.reconstruction and chunks is not None
        bar = _layer_bar(arch, options, options.desc)
        for i in bar:
            t0 = time.perf_counter()
            if masks:
                writer.bake(i, masks["layers"])
            # sequential: later groups see earlier ones pruned, but errors are measured on the dense layer's inputs
            dense = _layer_with_masks({"layers": writer.layers}, None, i, mesh) if errors_wanted and sequential else None
            kept, linears_report, sums = {}, {}, {}
            for linears in groups:
                stats = None
                if pruner.accumulator is not None:
                    sites = tuple(s for s in sites_of(linears) if s in pruner.accumulator.sites)
                    stats = passes.stats(writer.layers, i, chunks, sites, n, mesh)
                kernels, keeps, group_report = pruner.prune_layer(writer.layers, i, stats, linears)
                del stats
                if errors_wanted and dense is None and (kernels or keeps):
                    _add_errors(sums, (passes.group_errors(writer.layers, i, x, kernels, keeps, tuple(linears))
                                       for x in chunks))
                if keeps:
                    kept.update(_count_kept(dict(keeps)))
                linears_report.update(group_report)
                writer.write(i, kernels, keeps)
                del kernels, keeps
            if dense is not None:
                _add_errors(sums, (passes.dense_errors(dense, writer.layers, i, x) for x in chunks))
                del dense
            if chunks is not None:
                for j, x in enumerate(chunks):
                    chunks[j] = passes.forward(writer.layers, i, x)
            jax.block_until_ready((chunks, writer.layers, writer.masks))  # honest per-layer time
            seconds = time.perf_counter() - t0
            errors = {name: _relative(*sums.get(name, (0.0, 0.0))) for name in ALL_LINEARS} if errors_wanted else None
            layers_report.append(_layer_report(i, seconds, writer, kept, linears_report, errors))
            bar.set_postfix(seconds=f"{seconds:.1f}")
    new_params, new_masks = writer.result()
    report = {"order": options.order, "dtype": options.dtype, "batch_size": options.batch_size,
              "calibration_sequences": n,
              "calibration_tokens": 0 if calibration_NL is None else int(np.size(calibration_NL)),
              "seconds": time.perf_counter() - start, "layers": layers_report}
    return PruneResult(new_params, arch, new_masks, report)


def _add_errors(sums: dict, per_chunk) -> None:
    """Add each chunk's ``{linear: (Σ‖X(W−Ŵ)‖², Σ‖XW‖²)}`` to `sums` (on the host)."""
    for errors in per_chunk:
        for name, (err, ref) in jax.device_get(errors).items():
            sums[name] = sums.get(name, np.zeros(2)) + (err, ref)


def _relative(err, ref) -> float:
    return float(np.sqrt(err / ref)) if ref > 0 else 0.0


@jax.jit
def _count_kept(keeps):
    """Kept entries of each mask, counted one block of rows at a time.

    XLA:CPU widens a whole bool array before a plain sum (4x its size: 832 MB
    for a Llama-3.1-8B layer's masks); blocks of rows keep that small.
    """
    def count(keep):
        rows = keep.shape[0]
        b = max(1, min(rows, (1 << 20) // max(keep.shape[1], 1)))
        nb, tail = divmod(rows, b)
        body = lambda j, acc: acc + jnp.sum(lax.dynamic_slice_in_dim(keep, j * b, b, axis=0), dtype=jnp.int32)
        total = lax.fori_loop(0, nb, body, jnp.int32(0))
        return total + jnp.sum(keep[nb * b:], dtype=jnp.int32) if tail else total
    return {name: count(keep) for name, keep in keeps.items()}


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


class _StackWriter:
    """Writes each pruned group (kernels and masks) into the stacked arrays in place.

    The stacked arrays keep their shardings; updates are jitted with the stacks
    donated, so memory stays one model (and one set of masks, made on a
    linear's first write). Unless `donate`, a kernel's first write copies its
    stack (the caller's params stay valid).
    """

    def __init__(self, params: Tree, donate: bool):
        self.params = params
        self.layers = jax.tree.map(jnp.asarray, params["layers"])
        self.masks: dict[str, jax.Array] = {}
        self.owned: set[str] = set(ALL_LINEARS) if donate else set()

    def _stacks(self, names) -> tuple[dict, dict]:
        """(stacks we may donate, the caller's stacks to copy) of `names`."""
        stacks = {name: get_linear(self.layers, name) for name in names}
        return ({n: a for n, a in stacks.items() if n in self.owned},
                {n: a for n, a in stacks.items() if n not in self.owned})

    def _set(self, name: str, stack: jax.Array) -> None:
        block, _ = LINEARS[name]
        self.layers = {**self.layers, block: {**self.layers[block], name: {**self.layers[block][name], "kernel": stack}}}
        self.owned.add(name)

    def write(self, i: int, kernels: Mapping[str, jax.Array], keeps: Mapping[str, jax.Array]) -> None:
        """Layer i of each named kernel := (its new kernel, or itself) with masked weights zeroed; masks := keeps."""
        names = tuple(n for n in ALL_LINEARS if n in kernels or n in keeps)
        if not names:
            return
        for name in keeps:
            if name not in self.masks:
                self.masks.update(_all_true({name: get_linear(self.layers, name)}))
        owned, theirs = self._stacks(names)
        new = {n: kernels[n] for n in names if n in kernels}
        masks = {n: self.masks[n] for n in keeps}
        out, out_masks = _write_donated(owned, masks, i, new, dict(keeps))
        if theirs:
            copies, _ = _write_copy(theirs, {}, i, new, dict(keeps))
            out.update(copies)
        for name, stack in out.items():
            self._set(name, stack)
        self.masks.update(out_masks)

    def bake(self, i: int, parent: Tree) -> None:
        """Zero layer i's weights under a parent's masks (in place)."""
        keeps = {name: get_linear(parent, name) for name in ALL_LINEARS
                 if LINEARS[name][0] in parent and name in parent[LINEARS[name][0]]}
        if not keeps:
            return
        owned, theirs = self._stacks(keeps)
        out = _bake_donated(owned, {n: keeps[n] for n in owned}, i)
        if theirs:
            out.update(_bake_copy(theirs, {n: keeps[n] for n in theirs}, i))
        for name, stack in out.items():
            self._set(name, stack)

    def result(self) -> tuple[Tree, Tree | None]:
        params = {**self.params, "layers": self.layers}
        masks = masks_lib.from_kernels({LINEARS[n]: self.masks[n] for n in ALL_LINEARS if n in self.masks})
        return params, (masks if self.masks else None)


def _write(stacks, masks, i, kernels, keeps):
    """Stacked kernels with layer i replaced (new kernel or the old one, masked weights zero); masks[i] := keeps."""
    out = {}
    for name, stack in stacks.items():
        if name in kernels:
            w = kernels[name].astype(stack.dtype)
            if name in keeps:
                w = jnp.where(keeps[name], w, jnp.zeros((), stack.dtype))
            out[name] = lax.dynamic_update_index_in_dim(stack, w, i, 0)
        elif name in keeps:
            out[name] = _zero_in_place(stack, keeps[name], i)
        else:
            out[name] = stack
    return out, {name: lax.dynamic_update_index_in_dim(m, keeps[name], i, 0) for name, m in masks.items()}


def _zero_in_place(stack, keep, i, block_elements: int = 1 << 20):
    """``stack[i] = where(keep, stack[i], 0)``, one block of rows at a time.

    Why blocks: XLA materialises a whole-layer update read from the buffer it
    updates (a copy of the kernel); a loop of row blocks updates it in place.
    """
    rows, cols = keep.shape
    b = max(1, min(rows, block_elements // max(cols, 1)))
    nb, tail = divmod(rows, b)
    zero = jnp.zeros((), stack.dtype)

    def block(r, stack, size=b):
        start = (i, r * b, 0)
        w = lax.dynamic_slice(stack, start, (1, size, cols))
        k = lax.dynamic_slice(keep, (r * b, 0), (size, cols))
        return lax.dynamic_update_slice(stack, jnp.where(k[None], w, zero), start)

    stack = lax.fori_loop(0, nb, block, stack)
    return block(nb, stack, tail) if tail else stack


_write_donated = jax.jit(_write, donate_argnums=(0, 1))
_write_copy = jax.jit(_write)


def _bake(stacks, parent, i):
    return _write(stacks, {}, i, {}, {n: lax.dynamic_index_in_dim(parent[n], i, 0, False) for n in stacks})[0]


_bake_donated = jax.jit(_bake, donate_argnums=0)
_bake_copy = jax.jit(_bake)


def _all_true(kernels: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """All-True bool arrays shaped and sharded like `kernels` (one small program)."""
    spec = tuple((name, tuple(k.shape), k.sharding) for name, k in kernels.items())
    return _all_true_fn(spec)()


@functools.lru_cache(maxsize=16)
def _all_true_fn(spec):
    return jax.jit(lambda: {name: jnp.ones(shape, bool) for name, shape, _ in spec},
                   out_shardings={name: s for name, _, s in spec})


# ---------------------------------------------------------------- utilities
def kernel_dims(arch: Arch) -> dict[str, tuple[int, int]]:
    """``{linear: (in, out)}`` of the seven prunable kernels."""
    D, Q, K, F = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim, arch.ffn_size
    return {"q": (D, Q), "k": (D, K), "v": (D, K), "o": (Q, D), "gate": (D, F), "up": (D, F), "down": (F, D)}

