"""FLAP (An et al. 2024), adapted to grouped-query attention at KV-group granularity.

Reference: CASIA-IVA-Lab/FLAP (``prune_flap``, ``BiasGPT``, ``compress``), as
docs/methods.md reads it, reproduced detail by detail:

- Statistics only at the inputs of o_proj and down_proj, from one pass of the
  **dense** model (layer i sees the unpruned layer i−1).
- Baseline: running mean over sequences of each sequence's token mean.
- Fluctuation with both quirks of the original: the "old" baseline aliases the
  updated one, and the first sequence contributes nothing —
  ``F_1 = 0; F_k = F_{k−1}(k−2)/(k−1) + Σ_t (x_{k,t} − m_k)² / k`` with m_k the
  running mean after k sequences. Unrolled, ``F_n = Σ_{k≥2} d_k (k−1)/k / (n−1)``
  with ``d_k = Σ_t (x_{k,t} − m_k)²``, so chunks of any size give the original's
  one-sequence-at-a-time result exactly (m_k inside a chunk from a cumulative sum).
- Metric per input channel j of the output projection W (our kernel
  ``[in, out]``): WIFV ``F_j · Σ_o W[j, o]²`` (default), IFV ``F_j``, WIFN
  ``sqrt(s_j) · mean_o |W[j, o]|`` with s_j the running mean of Σ_t x_j². The
  attention metric is then squared, the MLP metric is not.
- GQA: whole KV groups go (20 heads = 5 of 8 groups, as the paper's shapes
  imply); a group's score is the mean of its query-head channels' scores.
  UL-MM (the paper's): every layer keeps the same number of KV groups and FFN
  channels, the configured shape (or the search's). UL-UM: the same fraction of
  groups and of FFN channels (`maxprune.prune.structured.shapes.flap_uniform_shape`).
  AL-AM (global ranking, non-uniform widths) is not implemented: layer-stacked
  params need uniform widths.
- Bias compensation: ``bias += (baseline · removed) @ W`` into the o_proj and
  down_proj biases (the result has ``out_bias=True``), so a layer whose removed
  inputs sit at their calibration mean computes exactly what the dense one did.
Kept units stay in their original order (FLAP masks, it does not permute).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.prune.api import PruneResult, register
from maxprune.prune.engine.loop import collect_stats
from maxprune.prune.engine.options import EngineOptions, options_for
from maxprune.prune.structured import search, shapes
from maxprune.prune.structured.surgery import Keep, slice_model

SITES = ("attn_out", "mlp_hidden")  # inputs of o_proj and down_proj
OUTPUT_OF = {"attn_out": ("attn", "o"), "mlp_hidden": ("mlp", "down")}


# ---------------------------------------------------------------- statistics
class FluctuationStats:
    """Per channel: Σ of sequence means, Σ d_k (k−1)/k, Σ_t x² — and the sequence count so far."""

    sites = SITES

    def init(self, dims: Mapping[str, int]):
        zeros = lambda d: jnp.zeros((d,), jnp.float32)
        return {site: {"n": jnp.zeros((), jnp.float32), "mean_sum": zeros(d), "fluct_sum": zeros(d),
                       "square_sum": zeros(d)} for site, d in dims.items()}

    def update(self, stats, inputs):
        return {site: _update(stats[site], inputs[site].astype(jnp.float32)) for site in stats}

    def finalize(self, stats, n_sequences: int):
        out = {}
        for site, s in stats.items():
            n = s["n"]
            out[site] = {"baseline": s["mean_sum"] / n, "fluctuation": s["fluct_sum"] / jnp.maximum(n - 1, 1),
                         "scaler": s["square_sum"] / n}
        return out


def _update(s, x_BLC):
    """Add a chunk of sequences, one after the other as the original does (see module doc)."""
    mean_BC = jnp.mean(x_BLC, axis=1)
    k_B = s["n"] + jnp.arange(1, x_BLC.shape[0] + 1, dtype=jnp.float32)  # 1-based sequence numbers
    running_BC = (s["mean_sum"] + jnp.cumsum(mean_BC, axis=0)) / k_B[:, None]  # m_k after each sequence
    d_BC = jnp.sum(jnp.square(x_BLC - running_BC[:, None, :]), axis=1)
    return {"n": k_B[-1], "mean_sum": s["mean_sum"] + jnp.sum(mean_BC, 0),
            "fluct_sum": s["fluct_sum"] + jnp.sum(d_BC * ((k_B - 1) / k_B)[:, None], 0),
            "square_sum": s["square_sum"] + jnp.sum(jnp.square(x_BLC), axis=(0, 1))}


@dataclasses.dataclass
class FlapStats:
    """Finalized per-layer statistics, ``{site: {"baseline"|"fluctuation"|"scaler": [L, C]}}``."""

    sites: dict[str, dict[str, np.ndarray]]


def flap_stats(params, arch: Arch, calibration_NL, options: EngineOptions | None = None) -> FlapStats:
    layers = collect_stats(params, arch, calibration_NL, FluctuationStats(), options or options_for())
    return FlapStats({site: {key: np.stack([np.asarray(layer[site][key]) for layer in layers])
                             for key in ("baseline", "fluctuation", "scaler")} for site in SITES})


# -------------------------------------------------------------------- scores
def channel_metric(stats: dict[str, np.ndarray], w_LIO, metric: str) -> np.ndarray:
    """FLAP's metric of every input channel of an output projection, ``[L, I]``."""
    if metric == "IFV":
        return stats["fluctuation"]
    if metric == "WIFV":
        return stats["fluctuation"] * np.asarray(_row_reduce(w_LIO, "sum_square"), np.float64)
    if metric == "WIFN":
        return np.sqrt(stats["scaler"]) * np.asarray(_row_reduce(w_LIO, "mean_abs"), np.float64)
    raise MaxpruneError(f"prune.flap.metric={metric!r} is not valid; choose WIFV, WIFN or IFV")


@functools.partial(jax.jit, static_argnums=1)
def _row_reduce(w_LIO, how: str):
    """Per input channel over the outputs, on device (only ``[L, I]`` comes back)."""
    w = w_LIO.astype(jnp.float32)
    return jnp.sum(jnp.square(w), -1) if how == "sum_square" else jnp.mean(jnp.abs(w), -1)


def flap_scores(params, arch: Arch, stats: FlapStats, metric: str = "WIFV") -> tuple[np.ndarray, np.ndarray]:
    """KV-group scores ``[L, K]`` (mean of the squared attention metric over the group) and FFN ``[L, F]``."""
    layers = params["layers"]
    attn = channel_metric(stats.sites["attn_out"], layers["attn"]["o"]["kernel"], metric) ** 2
    group_LK = attn.reshape(arch.num_layers, arch.num_kv_heads, -1).mean(-1)
    ffn_LF = channel_metric(stats.sites["mlp_hidden"], layers["mlp"]["down"]["kernel"], metric)
    return group_LK, ffn_LF


def flap_keep(group_LK: np.ndarray, ffn_LF: np.ndarray, shape: Arch) -> Keep:
    """The best groups and channels of every layer, in their original order."""
    top = lambda s, k: np.sort(np.argsort(-s, axis=-1, kind="stable")[:, :k], axis=-1)
    return Keep(kv_LK=top(group_LK, shape.num_kv_heads), ffn_LF=top(ffn_LF, shape.ffn_size))


# ----------------------------------------------------------- compensation
def compensate(params, arch: Arch, stats: FlapStats, keep: Keep) -> dict:
    """Params with ``bias += (baseline · removed) @ W`` in o_proj and down_proj (biases created if absent)."""
    L = arch.num_layers
    removed = {"attn_out": _removed_channels(keep.kv_LK, arch.num_kv_heads, arch.group_size * arch.head_dim),
               "mlp_hidden": _removed_channels(keep.ffn_LF, arch.ffn_size, 1)}
    layers = {block: dict(sub) for block, sub in params["layers"].items()}
    for site, (block, name) in OUTPUT_OF.items():
        linear = dict(layers[block][name])
        bias = linear.get("bias", jnp.zeros((L, arch.hidden_size), jnp.float32))
        shift_LI = jnp.asarray(stats.sites[site]["baseline"] * removed[site], jnp.float32)
        linear["bias"] = bias + _bias_shift(shift_LI, linear["kernel"])
        layers[block][name] = linear
    return {**params, "layers": layers}


@jax.jit
def _bias_shift(shift_LI, w_LIO):
    return jnp.einsum("li,lio->lo", shift_LI, w_LIO.astype(jnp.float32))


def _removed_channels(keep_LX: np.ndarray, units: int, width: int) -> np.ndarray:
    """``[L, units·width]`` float mask of the channels of the units not in `keep_LX`."""
    removed = np.ones((keep_LX.shape[0], units), np.float32)
    np.put_along_axis(removed, keep_LX, 0.0, axis=1)
    return np.repeat(removed, width, axis=1)


# ------------------------------------------------------------------- method
def flap_shape(arch: Arch, cfg) -> Arch:
    """UL-UM: from the ratio. UL-MM: ``flap.num_heads`` (FFN: ``ffn_size`` or what fills the ratio), else the
    default (median) candidate — the paper's 20 heads came from its search (``configs/prune/flap.py`` pins it)."""
    f = cfg.flap
    multiple = f.multiple or shapes.auto_multiple(arch)
    if f.structure == "UL-UM":
        return shapes.flap_uniform_shape(arch, cfg.ratio, f.ratio_of, multiple)
    if f.num_heads is None:
        return shapes.default_candidate(shapes.kv_group_candidates(arch, cfg.ratio, f.ratio_of, multiple))
    groups = shapes.kv_groups_for(arch, f.num_heads)
    shape = arch.replace(num_kv_heads=groups, num_heads=f.num_heads)
    ffn = f.ffn_size or shapes.ffn_for(shape, shapes.target_params(arch, cfg.ratio, f.ratio_of), multiple)
    if not 1 <= ffn <= arch.ffn_size:
        raise MaxpruneError(f"flap ffn_size {ffn} must be in [1, {arch.ffn_size}] (ratio {cfg.ratio} with "
                            f"{f.num_heads} heads)")
    return shape.replace(ffn_size=ffn)


@register("flap")
def prune(params, arch: Arch, calibration_NL, cfg) -> PruneResult:
    """Dense statistics once; then, per shape, keep the best groups/channels and compensate the biases."""
    start_time = time.perf_counter()
    if calibration_NL is None:
        raise MaxpruneError("flap needs calibration tokens: set prune.calibration")
    f = cfg.flap
    shape = None if cfg.search.enabled else flap_shape(arch, cfg)  # fail fast, before the pass
    options = options_for(cfg)
    stats = flap_stats(params, arch, calibration_NL, options)
    group_LK, ffn_LF = flap_scores(params, arch, stats, f.metric)
    build = lambda s: _flap_result(params, arch, stats, flap_keep(group_LK, ffn_LF, s))
    candidates = lambda: shapes.kv_group_candidates(arch, cfg.ratio, f.ratio_of, f.multiple)
    result = search.build_or_search(build, shape, candidates, calibration_NL, options,
                                    {"method": "flap", "structure": f.structure, "metric": f.metric})
    result.report["summary"] = shapes.summary(arch, result.arch, time.perf_counter() - start_time)
    return result


def _flap_result(params, arch: Arch, stats: FlapStats, keep: Keep) -> PruneResult:
    compensated = compensate(params, arch, stats, keep)
    new_params, new_arch, _ = slice_model(compensated, arch.replace(out_bias=True), keep)
    layers = [{"layer": i, "kv_groups": keep.kv_LK[i].tolist()} for i in range(arch.num_layers)]
    return PruneResult(new_params, new_arch, None, {"layers": layers})
