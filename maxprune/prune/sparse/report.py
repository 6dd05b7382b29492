"""Prune reports: a summary of the engine's per-layer report, and mask verification.

The engine's report has one row per layer (seconds, and per linear: sparsity,
relative reconstruction error ‖XW−XŴ‖/‖XW‖ on the calibration inputs, method
extras). `summarize` condenses it to what the provenance keeps and the CLI
prints: per-matrix sparsity over all layers, N:M validity, mean / max error,
seconds per layer. `verify_masks` is what `maxprune inspect` checks: a model dir
someone compares against the reference must hold bool masks of the right
shapes, exact zeros under them, and the N:M pattern its provenance claims.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maxprune.errors import MaxpruneError
from maxprune.model import masks as masks_lib
from maxprune.prune.api import PruneResult
from maxprune.prune.engine.loop import prune_layerwise
from maxprune.prune.engine.options import options_for
from maxprune.prune.schema import parse_pattern
from maxprune.prune.sparse import nm as nm_lib


def prune_and_summarize(method: str, pruner, params, arch, calibration_NL, cfg) -> PruneResult:
    """A sparse method's whole run: the layer loop with `pruner`, then `finish`."""
    result = prune_layerwise(params, arch, calibration_NL, pruner, options_for(cfg))
    return finish(result, method, cfg.pattern, cfg.ratio)


def finish(result: PruneResult, method: str, pattern: str, ratio: float) -> PruneResult:
    """Add ``method / pattern / ratio / summary`` to a sparse method's report."""
    result.report.update(method=method, pattern=pattern, ratio=ratio)
    result.report["summary"] = summarize(result.report, result.masks, pattern)
    return result


def summarize(report: dict, masks, pattern: str | None) -> dict[str, Any]:
    """Per-matrix sparsity, N:M validity, reconstruction error and timing of a layer-wise report."""
    n_m = parse_pattern(pattern) if pattern else None
    present = {(block, name): mask for block, name in masks_lib.PRUNABLE
               if (mask := masks_lib.get_kernel(masks or {}, block, name)) is not None}
    stats = jax.device_get(_mask_stats(present, n_m)) if present else {}  # one program; masks may be sharded
    matrices, pruned, total = {}, 0, 0
    for block, name in masks_lib.PRUNABLE:
        mask = present.get((block, name))
        errors = [row["linears"][name]["rel_error"] for row in report.get("layers", [])
                  if "rel_error" in row["linears"].get(name, {})]
        entry: dict[str, Any] = {}
        if mask is not None:
            kept, valid = stats[block, name]
            kept = int(np.sum(kept, dtype=np.int64))
            pruned, total = pruned + int(mask.size - kept), total + mask.size
            entry["sparsity"] = float(1.0 - kept / mask.size)
            if n_m is not None:
                entry["nm_valid"] = bool(valid)
        if errors:
            entry.update(rel_error_mean=float(np.mean(errors)), rel_error_max=float(np.max(errors)))
        matrices[f"{block}/{name}"] = entry
    seconds = [row["seconds"] for row in report.get("layers", [])]
    summary = {"sparsity": pruned / total if total else 0.0, "matrices": matrices,
               "seconds": report.get("seconds"), "seconds_per_layer": float(np.mean(seconds)) if seconds else None,
               "calibration_tokens": report.get("calibration_tokens")}
    if n_m is not None:
        summary["nm_valid"] = all(m.get("nm_valid", False) for m in matrices.values())
    return summary


@functools.partial(jax.jit, static_argnums=1)
def _mask_stats(keeps, n_m):
    """``{key: (kept count per layer, N:M valid)}`` of stacked keep-masks ``[..., in, out]``."""
    return {key: _one_mask_stats(keep, n_m) for key, keep in keeps.items()}


def _one_mask_stats(keep, n_m):
    """Per layer, one layer at a time: XLA:CPU widens a whole bool array before a reduction (4x the
    stacked masks' size, ~400 MB for SmolLM2-135M), one layer's widening is small."""
    lead, (rows, cols) = keep.shape[:-2], keep.shape[-2:]
    if n_m is not None and rows % n_m[1]:
        return jnp.zeros(lead, jnp.int32), False

    def one(keep_IO):
        valid = jnp.bool_(True)
        if n_m is not None:
            n, m = n_m
            valid = jnp.all(jnp.sum(keep_IO.reshape(rows // m, m, cols), axis=-2) <= m - n)
        return jnp.sum(keep_IO, dtype=jnp.int32), valid  # per layer: no int32 overflow on big models

    kept, valid = lax.map(one, keep.reshape(-1, rows, cols))
    return kept.reshape(lead), jnp.all(valid)


def format_summary(summary: dict) -> list[str]:
    """Human-readable lines of a summary (the CLI's output)."""
    lines = [f"{'matrix':10} {'sparsity':>9} {'rel err mean':>13} {'max':>8}"]
    for name, m in summary.get("matrices", {}).items():
        sparsity = f"{m['sparsity']:.2%}" if "sparsity" in m else "-"
        err = f"{m['rel_error_mean']:.4f}" if "rel_error_mean" in m else "-"
        worst = f"{m['rel_error_max']:.4f}" if "rel_error_max" in m else "-"
        lines.append(f"{name:10} {sparsity:>9} {err:>13} {worst:>8}")
    lines.append(f"overall sparsity {summary.get('sparsity', 0.0):.2%}"
                 + (f", N:M valid: {summary['nm_valid']}" if "nm_valid" in summary else "")
                 + (f", {summary['seconds_per_layer']:.2f} s/layer" if summary.get("seconds_per_layer") else ""))
    return lines


def verify_masks(params, masks, pattern: str | None = None) -> dict[str, float]:
    """Check masks (bool, shapes, masked weights exactly zero, N:M); per-kernel sparsity.

    Raises `MaxpruneError` naming the first kernel that fails.
    """
    masks_lib.validate_masks(params, masks)
    n_m = parse_pattern(pattern) if pattern else None
    out = {}
    for block, name in masks_lib.PRUNABLE:
        mask = masks_lib.get_kernel(masks or {}, block, name)
        if mask is None:
            out[f"{block}/{name}"] = 0.0
            continue
        keep = np.asarray(mask)
        kernel = np.asarray(masks_lib.get_kernel(params, block, name))
        nonzero = int(np.count_nonzero(kernel[~keep]))
        if nonzero:
            raise MaxpruneError(f"mask {masks_lib.kernel_name(block, name)}: {nonzero} masked weights are not "
                                f"zero in the kernel")
        if n_m is not None and not nm_lib.is_n_of_m(keep, *n_m):
            raise MaxpruneError(f"mask {masks_lib.kernel_name(block, name)} is not {n_m[0]}:{n_m[1]} along "
                                f"the input axis, as the provenance's pattern={pattern!r} says")
        out[f"{block}/{name}"] = float(1.0 - keep.mean())
    return out
