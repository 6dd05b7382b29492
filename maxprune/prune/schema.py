"""The `prune` config section: shared keys, then one subsection per method.

Each method owns its subsection builder below; shared checks live in `check`.
"""

from __future__ import annotations

import re
from typing import Any

from ml_collections.config_dict import placeholder

from maxprune.errors import MaxpruneError

NM_PATTERN = re.compile(r"(\d+):(\d+)")


def _sparsegpt() -> dict[str, Any]:
    return {"blocksize": 128, "percdamp": 0.01}


def _minitron_depth() -> dict[str, Any]:
    return {"criterion": "loss", "layers_removed": placeholder(int)}


def _minitron_width() -> dict[str, Any]:
    return {"hidden_size": placeholder(int), "ffn_size": placeholder(int), "prune_heads": False}


def _flap() -> dict[str, Any]:
    return {"structure": "UL-MM", "metric": "WIFV", "num_heads": placeholder(int), "ffn_size": placeholder(int)}


def _search() -> dict[str, Any]:
    return {"enabled": False}


def section() -> dict[str, Any]:
    return {
        "method": "wanda",                 # see `maxprune.prune.pruner_names()`
        "input": placeholder(str),         # parent model dir
        "output": placeholder(str),        # pruned model dir to write
        "pattern": "unstructured",         # sparse methods: "unstructured" or "N:M" (e.g. "2:4")
        "ratio": 0.5,                      # fraction of parameters removed
        "calibration": placeholder(str),   # source spec, prepared dataset dir, or a .npy of int token ids
        "n_samples": 128,                  # calibration sequences
        "seq_len": placeholder(int),       # calibration window (default: the prepared data's / 8192)
        "seed": 0,
        "batch_size": 8,                   # calibration sequences per forward pass
        "order": "reference",              # "reference": all seven linears from one dense pass; "sequential"
        "sparsegpt": _sparsegpt(),
        "minitron_depth": _minitron_depth(),
        "minitron_width": _minitron_width(),
        "flap": _flap(),
        "search": _search(),
    }


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """None for unstructured, (n, m) for "n:m"; error otherwise."""
    if pattern == "unstructured":
        return None
    match = NM_PATTERN.fullmatch(pattern)
    if not match:
        raise MaxpruneError(f"prune.pattern={pattern!r} must be 'unstructured' or 'N:M' such as '2:4'")
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise MaxpruneError(f"prune.pattern={pattern!r} needs 0 < N < M")
    return n, m


def check(cfg) -> None:
    p = cfg.prune
    from maxprune.prune.api import pruner_names
    if p.method not in pruner_names():
        raise MaxpruneError(f"prune.method={p.method!r} is not valid; choose one of {', '.join(pruner_names())}")
    if not 0.0 < p.ratio < 1.0:
        raise MaxpruneError(f"prune.ratio={p.ratio} must be in (0, 1)")
    nm = parse_pattern(p.pattern)
    if nm is not None:
        from maxprune.prune.api import SPARSE_METHODS
        if p.method not in SPARSE_METHODS:
            raise MaxpruneError(f"prune.pattern={p.pattern!r} is for sparse methods ({', '.join(SPARSE_METHODS)}), "
                                f"not {p.method}")
        if abs(p.ratio - nm[0] / nm[1]) > 1e-9:
            raise MaxpruneError(f"prune.pattern={p.pattern!r} prunes {nm[0]}/{nm[1]} of the weights; "
                                f"set prune.ratio={nm[0] / nm[1]:g} (got {p.ratio})")
    for key in ("n_samples", "batch_size"):
        if p[key] < 1:
            raise MaxpruneError(f"prune.{key}={p[key]} must be >= 1")
    if p.seq_len is not None and p.seq_len < 2:
        raise MaxpruneError(f"prune.seq_len={p.seq_len} must be >= 2")
    if p.order not in ("reference", "sequential"):
        raise MaxpruneError(f"prune.order={p.order!r} is not valid; choose reference or sequential")
