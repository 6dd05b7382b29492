"""Minitron (Muralidharan et al. 2024; Sreenivas et al. 2024): depth and width pruning.

**Depth** (`minitron_depth`): remove the contiguous block of k layers whose
removal hurts the calibration loss least (paper eq. 3), or, with
``criterion="block_influence"``, the block with the lowest ShortGPT influence
``1 − cos(x_in, x_out)`` (one forward). k comes from ``prune.ratio`` (see
`maxprune.prune.structured.shapes`) or ``minitron_depth.layers_removed``. The loss of
every start i is computed in one sweep per calibration chunk: the prefix
states h_i are advanced one layer at a time and shared, and only the suffix
[i+k, L) is run for each i — ``L + (L−k)(L−k+1)/2`` layer applications per
chunk instead of ``(L−k+1)(L−k)``, with two hidden states alive (one extra
per layer of the block for block influence).

**Width** (`minitron_width`): activation importance from one forward pass of
the dense model (docs/methods.md), with two aggregations that rank channels
differently (``minitron_width.aggregation``). ``"paper"`` (default; eq. 4 and
the paper's collection run at batch size 1): a channel's score is the L2 norm
over all calibration tokens, from s_j = ``Σ_t x_tj²`` — FFN neuron j at the
down_proj input, hidden channel j with the squares added over all 2L RMSNorm
outputs before the root (no root per norm). ``"nemo"`` (NeMo / Model-Optimizer):
FFN neuron j ``sqrt(Σ_samples (mean_t |a_tj|)²)``, hidden channel j the sum over
the 2L norm outputs of that root. Either way a query head scores the L2 over its
channels of the statistic at the o_proj input. Top-k per axis in descending
order (channels get permuted; one shared hidden index), heads kept unless
``minitron_width.num_heads`` asks for fewer (then the best heads inside every
KV group). RMSNorm then normalises over the kept channels only, unrescaled —
the reference behaviour. The shape comes from ``hidden_size`` (+ ``ffn_size``),
from the architecture search (``prune.search.enabled``; `maxprune.prune.structured.search`),
or by default is the median admissible shape at the ratio
(`maxprune.prune.structured.shapes.default_candidate`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from maxprune import sharding
from maxprune.config import choice
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model.arch import Arch
from maxprune.prune import schema
from maxprune.prune.api import PruneResult, register
from maxprune.prune.engine.activations import check_calibration, mesh_of
from maxprune.prune.engine.loop import collect_stats
from maxprune.prune.engine.options import EngineOptions, options_for
from maxprune.prune.structured import search, shapes
from maxprune.prune.structured.surgery import Keep, slice_model


# ===================================================================== depth
@dataclasses.dataclass
class DepthScores:
    """Per start i of a k-layer block: calibration loss without it, and its block influence."""

    layers_removed: int
    loss_dense: float | None
    loss_I: np.ndarray | None           # [L − k + 1]
    influence_I: np.ndarray | None      # [L − k + 1]
    layer_applications: int             # decoder-layer forwards over all chunks


def depth_scores(params, arch: Arch, calibration_NL, k: int, criterion: str = "loss",
                 options: EngineOptions | None = None) -> DepthScores:
    """Loss (or block influence) of removing [i, i+k) for every start i, sharing the prefix states."""
    choice("minitron_depth.criterion", criterion, schema.DEPTH_CRITERIA)
    if not 1 <= k < arch.num_layers:
        raise MaxpruneError(f"minitron_depth.layers_removed={k} must be in [1, {arch.num_layers - 1}] for a "
                            f"{arch.num_layers}-layer model")
    options = options or options_for()
    tokens = check_calibration(calibration_NL, arch)
    passes = _depth_passes(arch, options.model_options)
    params = jax.tree.map(jnp.asarray, params)  # host arrays: upload once, not on every layer call
    starts = arch.num_layers - k + 1
    nll, cos, count, applied = np.zeros(starts), np.zeros(starts), 0.0, 0
    dense_nll = 0.0
    mesh = mesh_of(params)
    with sharding.mesh_scope(mesh):
        for b in _bar(range(0, len(tokens), options.batch_size), options, f"{options.desc} blocks"):
            chunk = search.place_tokens(tokens[b:b + options.batch_size], mesh)
            if criterion == "loss":
                chunk_nll, dense, n = _sweep_losses(params, chunk, k, passes)
                nll, dense_nll, applied = nll + chunk_nll, dense_nll + dense, applied + n
            else:
                chunk_cos, n = _sweep_influence(params, chunk, k, passes)
                cos, applied = cos + chunk_cos, applied + n
            count += chunk.shape[0] * (chunk.shape[1] - 1) if criterion == "loss" else chunk.size
    if criterion == "loss":
        return DepthScores(k, dense_nll / count, nll / count, None, applied)
    return DepthScores(k, None, None, 1.0 - cos / count, applied)


class _DepthPasses:
    """Jitted pieces, compiled once: embed, layer j of the stack, head NLL, token cosine."""

    def __init__(self, arch: Arch, mo: llama.ModelOptions):
        def layer(stack, j, x):
            one = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, 0, keepdims=False), stack)
            return llama.apply_layer(one, x, arch, options=mo)

        def head_nll(head_params, x, tokens):
            logits = llama.Llama(arch, mo).apply({"params": head_params}, x, method=_head_logits)
            return llama.next_token_loss(logits, tokens) * tokens.shape[0] * (tokens.shape[1] - 1)

        def cos_sum(a, b):
            a, b = a.astype(jnp.float32), b.astype(jnp.float32)
            cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12)
            return jnp.sum(cos)

        self.embed = jax.jit(lambda table, t: table.astype(mo.compute_dtype)[t])
        self.layer = jax.jit(layer)
        self.head_nll = jax.jit(head_nll)
        self.cos_sum = jax.jit(cos_sum)


@functools.lru_cache(maxsize=8)
def _depth_passes(arch: Arch, mo: llama.ModelOptions) -> _DepthPasses:
    return _DepthPasses(arch, mo)


def _head_logits(model: llama.Llama, h_BLD):
    """What `Llama.__call__` does after the decoder stack: final norm, then lm_head (or the tied table)."""
    h_BLD = model.final_norm(h_BLD)
    if model.arch.tie_embeddings:
        w_VD = model.embed.embedding.astype(h_BLD.dtype)
        return jnp.einsum("bld,vd->blv", h_BLD, w_VD, preferred_element_type=jnp.float32)
    return model.lm_head(h_BLD)


def _head_params(params) -> dict:
    return {k: params[k] for k in ("final_norm", "lm_head", "embed") if k in params}


def _sweep_losses(params, tokens, k, passes: _DepthPasses) -> tuple[np.ndarray, float, int]:
    """Σ NLL of the model without [i, i+k) for every i, and of the dense model, on one chunk."""
    stack, head, L = params["layers"], _head_params(params), _num_layers(params)
    h = passes.embed(params["embed"]["embedding"], tokens)
    nll, applied = [], 0
    for i in range(L - k + 1):
        x = h
        for j in range(i + k, L):  # the suffix after the removed block
            x = passes.layer(stack, j, x)
        nll.append(passes.head_nll(head, x, tokens))
        h = passes.layer(stack, i, h)  # advance the shared prefix
        applied += L - i - k + 1
    for j in range(L - k + 1, L):
        h = passes.layer(stack, j, h)
    applied += k - 1
    return np.asarray(jax.device_get(nll), np.float64), float(passes.head_nll(head, h, tokens)), applied


def _sweep_influence(params, tokens, k, passes: _DepthPasses) -> tuple[np.ndarray, int]:
    """Σ over tokens of cos(h_i, h_{i+k}) for every i, from one forward (a window of k+1 states)."""
    stack, L = params["layers"], _num_layers(params)
    window = collections.deque([passes.embed(params["embed"]["embedding"], tokens)], maxlen=k + 1)
    cos = []
    for j in range(L):
        window.append(passes.layer(stack, j, window[-1]))
        if len(window) == k + 1:
            cos.append(passes.cos_sum(window[0], window[-1]))
    return np.asarray(jax.device_get(cos), np.float64), L


def _num_layers(params) -> int:
    return int(params["layers"]["attn_norm"]["scale"].shape[0])


@register("minitron_depth")
def prune_depth(params, arch: Arch, calibration_NL, cfg) -> PruneResult:
    """Remove the best contiguous block of layers (see module doc); report the whole curve over starts."""
    c = cfg.minitron_depth
    start_time = time.perf_counter()
    k = c.layers_removed or arch.num_layers - shapes.depth_layers_kept(arch, cfg.ratio, c.ratio_of)
    if calibration_NL is None:
        raise MaxpruneError("minitron_depth needs calibration tokens: set prune.calibration")
    scores = depth_scores(params, arch, calibration_NL, k, c.criterion, options_for(cfg))
    curve = scores.loss_I if c.criterion == "loss" else scores.influence_I
    best = int(np.argmin(curve))  # first minimum: the earliest block on ties
    kept = [j for j in range(arch.num_layers) if not best <= j < best + k]
    new_params, new_arch, _ = slice_model(params, arch, Keep(layers=np.array(kept)))
    summary = {**shapes.summary(arch, new_arch, time.perf_counter() - start_time), "criterion": c.criterion,
               "layers_removed": k, "removed": [best, best + k], "kept_layers": kept,
               "layer_applications": scores.layer_applications}
    if scores.loss_dense is not None:
        summary.update(loss_dense=scores.loss_dense, loss_pruned=float(curve[best]))
    report = {"method": "minitron_depth", "summary": summary,
              "curve": [{"start": i, "layers": [i, i + k], c.criterion: float(v)} for i, v in enumerate(curve)]}
    return PruneResult(new_params, new_arch, None, report)


# ===================================================================== width
@dataclasses.dataclass(frozen=True)  # frozen: equal instances share the engine's compiled passes
class SquaredSums:
    """The paper's statistic per channel (eq. 4): Σ over every calibration token of x², fp32."""

    sites = ("attn_in", "attn_out", "mlp_in", "mlp_hidden")

    def init(self, dims: Mapping[str, int]):
        return {site: jnp.zeros((d,), jnp.float32) for site, d in dims.items()}

    def update(self, stats, inputs):
        return {site: stats[site] + jnp.sum(jnp.square(inputs[site].astype(jnp.float32)), (0, 1)) for site in stats}

    def finalize(self, stats, n_sequences: int):
        return stats


@dataclasses.dataclass(frozen=True)
class ActivationNorms:
    """NeMo's statistic per channel: Σ over sequences of (mean over tokens of |x|)², sqrt at the end."""

    sites = ("attn_in", "attn_out", "mlp_in", "mlp_hidden")

    def init(self, dims: Mapping[str, int]):
        return {site: jnp.zeros((d,), jnp.float32) for site, d in dims.items()}

    def update(self, stats, inputs):
        return {site: stats[site] + jnp.sum(jnp.square(jnp.mean(jnp.abs(inputs[site].astype(jnp.float32)), 1)), 0)
                for site in stats}

    def finalize(self, stats, n_sequences: int):
        return {site: jnp.sqrt(s) for site, s in stats.items()}


ACCUMULATORS = {"paper": SquaredSums(), "nemo": ActivationNorms()}


@dataclasses.dataclass
class WidthScores:
    hidden_D: np.ndarray   # over the 2L norm outputs
    ffn_LF: np.ndarray     # down_proj input
    head_LN: np.ndarray    # L2 over each query head's o_proj-input channels


def width_scores(params, arch: Arch, calibration_NL, options: EngineOptions | None = None,
                 aggregation: str = "paper") -> WidthScores:
    """Minitron's activation importance from one forward pass of the unchanged model."""
    accumulator = _accumulator(aggregation)
    layers = collect_stats(params, arch, calibration_NL, accumulator, options or options_for())
    stats = {site: np.stack([np.asarray(s[site], np.float64) for s in layers]) for site in accumulator.sites}
    return combine_width_stats(stats, arch, aggregation)


def combine_width_stats(stats: Mapping[str, np.ndarray], arch: Arch, aggregation: str = "paper") -> WidthScores:
    """Per-axis scores from the finalized per-layer site statistics (``{site: [L, width]}``).

    paper: every score is an L2 norm over tokens of the sum of squares — the
    hidden one over the tokens of all 2L norm outputs at once (squares added
    across norms), a head's over its channels too. nemo: the hidden score sums
    the per-norm statistics (already square-rooted).
    """
    _accumulator(aggregation)
    if aggregation == "nemo":
        head = np.sqrt(np.sum(np.square(stats["attn_out"]).reshape(arch.num_layers, arch.num_heads, -1), -1))
        return WidthScores(hidden_D=np.sum(stats["attn_in"] + stats["mlp_in"], 0), ffn_LF=stats["mlp_hidden"],
                           head_LN=head)
    head = np.sqrt(np.sum(stats["attn_out"].reshape(arch.num_layers, arch.num_heads, -1), -1))
    return WidthScores(hidden_D=np.sqrt(np.sum(stats["attn_in"] + stats["mlp_in"], 0)),
                       ffn_LF=np.sqrt(stats["mlp_hidden"]), head_LN=head)


def _accumulator(aggregation: str):
    choice("minitron_width.aggregation", aggregation, schema.WIDTH_AGGREGATIONS)
    return ACCUMULATORS[aggregation]


def width_keep(scores: WidthScores, arch: Arch, shape: Arch) -> Keep:
    """Top-k per axis in descending score order (stable: lower index first on ties)."""
    top = lambda s, k: np.argsort(-s, axis=-1, kind="stable")[..., :k]
    heads = None
    if shape.num_heads != arch.num_heads:
        per_group = shapes.check_heads_per_group(arch, shape.num_heads)
        heads = top(scores.head_LN.reshape(arch.num_layers, arch.num_kv_heads, arch.group_size), per_group)
    return Keep(hidden_D=top(scores.hidden_D, shape.hidden_size), ffn_LF=top(scores.ffn_LF, shape.ffn_size),
                heads_LKG=heads)


def width_shape(arch: Arch, cfg) -> Arch:
    """``minitron_width.hidden_size`` (FFN: ``ffn_size`` or what fills the ratio), else the default candidate."""
    c = cfg.minitron_width
    heads = arch.num_heads if c.num_heads is None else c.num_heads
    shapes.check_heads_per_group(arch, heads)
    if c.hidden_size is None:
        candidates = shapes.minitron_width_candidates(arch, cfg.ratio, c.ratio_of, c.multiple, heads)
        return shapes.default_candidate(candidates)
    shape = arch.replace(hidden_size=c.hidden_size, num_heads=heads)
    ffn = c.ffn_size or shapes.ffn_for(shape, shapes.target_params(arch, cfg.ratio, c.ratio_of),
                                       c.multiple or shapes.auto_multiple(arch))
    if not 1 <= c.hidden_size <= arch.hidden_size or not 1 <= ffn <= arch.ffn_size:
        raise MaxpruneError(f"minitron_width shape hidden {c.hidden_size} / ffn {ffn} must fit the parent's "
                            f"hidden {arch.hidden_size} / ffn {arch.ffn_size}")
    return shape.replace(ffn_size=ffn)


@register("minitron_width")
def prune_width(params, arch: Arch, calibration_NL, cfg) -> PruneResult:
    """Score once, then slice to the configured shape or to the best candidate of the search."""
    start_time = time.perf_counter()
    if calibration_NL is None:
        raise MaxpruneError("minitron_width needs calibration tokens: set prune.calibration")
    options, c = options_for(cfg), cfg.minitron_width
    shape = None if cfg.search.enabled else width_shape(arch, cfg)  # before the long pass: fail fast
    scores = width_scores(params, arch, calibration_NL, options, c.aggregation)
    build = lambda s: _width_result(params, arch, scores, s)
    candidates = lambda: shapes.minitron_width_candidates(arch, cfg.ratio, c.ratio_of, c.multiple, c.num_heads)
    result = search.build_or_search(build, shape, candidates, calibration_NL, options, {"method": "minitron_width"})
    result.report["summary"] = {**shapes.summary(arch, result.arch, time.perf_counter() - start_time),
                                "aggregation": cfg.minitron_width.aggregation}
    return result


def _width_result(params, arch: Arch, scores: WidthScores, shape: Arch) -> PruneResult:
    new_params, new_arch, _ = slice_model(params, arch, width_keep(scores, arch, shape))
    return PruneResult(new_params, new_arch, None, {})


# ------------------------------------------------------------------ helpers
def _bar(iterable, options: EngineOptions, desc: str):
    return tqdm(iterable, desc=desc, unit="chunk", disable=not (options.progress and jax.process_index() == 0))
