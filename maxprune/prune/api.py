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

import dataclasses
import importlib
from typing import Any, Callable

from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch

# method name -> module that registers it (imported on first use)
METHOD_MODULES = {
    "magnitude": "maxprune.prune.magnitude",
    "wanda": "maxprune.prune.wanda",
    "sparsegpt": "maxprune.prune.sparsegpt",
    "minitron_depth": "maxprune.prune.minitron",
    "minitron_width": "maxprune.prune.minitron",
    "flap": "maxprune.prune.flap",
    "sheared_llama": "maxprune.prune.sheared",
}
SPARSE_METHODS = ("magnitude", "wanda", "sparsegpt")


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


def prune(params: dict, arch: Arch, calibration_NL, cfg) -> PruneResult:
    """Run the pruner named by `cfg.method`."""
    return get_pruner(cfg.method)(params, arch, calibration_NL, cfg)
