"""Architecture search (paper Appendix D.3): prune to every candidate shape, keep the lowest calibration loss.

Why: at a given ratio Minitron-width (hidden vs FFN) and FLAP (KV groups vs
FFN) admit several shapes of about the same size (`maxprune.prune.structured.shapes`).
The paper prunes the parent to each without retraining, measures the loss on
the calibration set and keeps the best (Tables 5–7). Importance scores do not
depend on the target shape, so a method scores once and `search` only
slices and evaluates per candidate: one statistics pass plus one forward per
candidate. Only the best result so far is held besides the current one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from maxprune import sharding
from maxprune.model import llama
from maxprune.model.arch import Arch
from maxprune.prune.api import PruneResult
from maxprune.prune.engine.activations import check_calibration, mesh_of
from maxprune.prune.engine.options import EngineOptions
from maxprune.prune.structured import shapes


def search(candidates: list[Arch], build: Callable[[Arch], PruneResult], calibration_NL,
           options: EngineOptions) -> tuple[PruneResult, dict]:
    """The candidate with the lowest calibration loss, and a Table 5–7 style report of all of them."""
    best, best_i, rows = None, -1, []
    bar = tqdm(candidates, desc=f"{options.desc} search", unit="shape",
               disable=not (options.progress and jax.process_index() == 0))
    for i, shape in enumerate(bar):
        result = build(shape)
        loss = calibration_loss(result.params, result.arch, calibration_NL, options)
        rows.append({**shapes.describe(result.arch), "loss": loss, "selected": False})
        if best is None or loss < rows[best_i]["loss"]:  # the first of equal losses stays
            best, best_i = result, i
        del result
    rows[best_i]["selected"] = True
    report = {"candidates": rows, "selected": rows[best_i], "forward_passes": len(candidates)}
    return best, {**report, "table": format_table(report)}


def build_or_search(build: Callable[[Arch], PruneResult], shape: Arch | None, candidates: Callable[[], list[Arch]],
                    calibration_NL, options: EngineOptions, report: dict) -> PruneResult:
    """`build(shape)`, or with no shape (``prune.search.enabled``) the best of `candidates()` by calibration
    loss, its table in ``report["search"]``; `report` is merged into the result's."""
    if shape is None:
        result, report["search"] = search(candidates(), build, calibration_NL, options)
    else:
        result = build(shape)
    result.report.update(report)
    return result


def calibration_loss(params, arch: Arch, calibration_NL, options: EngineOptions) -> float:
    """Mean next-token loss over the calibration sequences (chunks of ``options.batch_size``)."""
    tokens = check_calibration(calibration_NL, arch)
    loss_fn = _loss_fn(arch, options.model_options)
    params = jax.tree.map(jnp.asarray, params)  # host arrays: upload once, not per chunk
    mesh = mesh_of(params)
    total = 0.0
    with sharding.mesh_scope(mesh):
        for i in range(0, len(tokens), options.batch_size):
            chunk = tokens[i:i + options.batch_size]
            total += float(loss_fn(params, place_tokens(chunk, mesh))) * chunk.shape[0]
    return total / len(tokens)


@functools.lru_cache(maxsize=16)
def _loss_fn(arch: Arch, mo: llama.ModelOptions):
    return jax.jit(lambda p, t: llama.next_token_loss(llama.forward(p, t, arch, options=mo), t))


def place_tokens(tokens_BL: np.ndarray, mesh):
    """A chunk of tokens batch-sharded over data×fsdp when that divides it, else replicated."""
    if mesh is None:
        return jnp.asarray(tokens_BL)
    return jax.device_put(tokens_BL, sharding.batch_or_replicated(mesh, tokens_BL.shape[0]))


def format_table(report: dict) -> list[str]:
    """The search report as text lines, like the paper's Tables 5–7."""
    lines = [f"{'hidden':>7} {'heads':>5} {'kv':>3} {'ffn':>6} {'params':>14} {'loss':>9} sel"]
    for r in report["candidates"]:
        lines.append(f"{r['hidden_size']:>7} {r['num_heads']:>5} {r['num_kv_heads']:>3} {r['ffn_size']:>6} "
                     f"{r['params']:>14,} {r['loss']:>9.4f} {'*' if r['selected'] else ''}")
    return lines
