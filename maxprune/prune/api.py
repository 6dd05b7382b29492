"""The pruner contract and registry.

A pruner is ``fn(params, arch, calibration_NL, cfg) -> PruneResult``:

- `params`: the parent's params (plain nested dict, layer-stacked; see
  `maxprune.model.llama`), possibly sharded; dense or already masked.
- `arch`: the parent's `Arch`.
- `calibration_NL`: int32 ``[n_samples, seq_len]`` calibration tokens.
- `cfg`: the frozen `prune` config section (method, pattern, ratio, ...).

It returns new params, the new `Arch` (smaller for structured methods, the
same for sparse ones), masks (sparse methods) or None, and a JSON-able
report (per-matrix sparsity, reconstruction errors, scores, timings).
Methods register themselves with `@register("name")`; the registry imports
the method modules lazily so `maxprune --help` stays fast.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from typing import Any, Callable

import ml_collections

from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.prune import paper

# method name -> module that registers it (imported on first use)
METHOD_MODULES = {
    "magnitude": "maxprune.prune.sparse.magnitude",
    "wanda": "maxprune.prune.sparse.wanda",
    "sparsegpt": "maxprune.prune.sparse.sparsegpt",
    "minitron_depth": "maxprune.prune.structured.minitron",
    "minitron_width": "maxprune.prune.structured.minitron",
    "flap": "maxprune.prune.structured.flap",
    "sheared_llama": "maxprune.prune.sheared.method",
}
SPARSE_METHODS = ("magnitude", "wanda", "sparsegpt")
# structured method -> "module:function(parent_arch, prune_cfg) -> Arch", the shape it prunes to without a search
SHAPE_FUNCTIONS = {
    "minitron_depth": "maxprune.prune.structured.shapes:depth_shape",
    "minitron_width": "maxprune.prune.structured.minitron:width_shape",
    "flap": "maxprune.prune.structured.flap:flap_shape",
    "sheared_llama": "maxprune.prune.sheared.plan:target_shape",
}


@dataclasses.dataclass
class PruneResult:
    params: dict
    arch: Arch
    masks: dict | None
    report: dict[str, Any]


Pruner = Callable[[dict, Arch, Any, Any], PruneResult]
_REGISTRY: dict[str, Pruner] = {}


def register(name: str) -> Callable[[Pruner], Pruner]:
    def wrap(fn: Pruner) -> Pruner:
        _REGISTRY[name] = fn
        return fn
    return wrap


def pruner_names() -> list[str]:
    return sorted(METHOD_MODULES)


def get_pruner(name: str) -> Pruner:
    if name not in METHOD_MODULES:
        raise MaxpruneError(f"unknown pruning method {name!r}; valid: {', '.join(pruner_names())}")
    if name not in _REGISTRY:
        importlib.import_module(METHOD_MODULES[name])
    if name not in _REGISTRY:
        raise MaxpruneError(f"pruning method {name!r} is not available in this version of maxprune")
    return _REGISTRY[name]


def resolve(cfg, parent: Arch):
    """`cfg` (the prune section) with Table 1's shape filled in where it applies, and the shape's source.

    See `maxprune.prune.paper.pin_shapes`: a Llama-3.1-8B-shaped parent with
    ``prune.paper_shapes`` gets the paper's shape; any other parent keeps the
    shape keys it was given, or none (the shape then comes from the ratio).
    """

    pinned, source = paper.pin_shapes(cfg, parent)
    if not pinned:
        return cfg, source
    # deepcopy: FrozenConfigDict.as_configdict() shares its nodes with the frozen original
    mutable = copy.deepcopy(cfg.as_configdict() if hasattr(cfg, "as_configdict") else ml_collections.ConfigDict(cfg))
    for key, value in pinned.items():
        mutable[cfg.method][key] = value
    return ml_collections.FrozenConfigDict(mutable), source


def target_shape(parent: Arch, cfg) -> Arch | None:
    """The Arch `cfg.method` prunes `parent` to: the parent for sparse methods, None when a search decides."""
    if cfg.method in SPARSE_METHODS:
        return parent
    cfg, _ = resolve(cfg, parent)
    if cfg.search.enabled:
        return None
    module, _, name = SHAPE_FUNCTIONS[cfg.method].partition(":")
    shape = getattr(importlib.import_module(module), name)(parent, cfg)
    return shape.replace(out_bias=True) if cfg.method == "flap" else shape


def prune(params: dict, arch: Arch, calibration_NL, cfg) -> PruneResult:
    """Run the pruner named by `cfg.method` (on the shape `resolve` gives); the report says where the shape
    came from."""
    cfg, source = resolve(cfg, arch)
    result = get_pruner(cfg.method)(params, arch, calibration_NL, cfg)
    if cfg.method not in SPARSE_METHODS:
        result.report.setdefault("summary", {})["shape_source"] = source
    return result
