"""The `prune` config section: shared keys, then one subsection per method.

Each method owns its subsection builder below; shared checks live in `check`.
"""

from __future__ import annotations

import re
from typing import Any

from ml_collections.config_dict import placeholder

from maxprune.config import at_least, choice
from maxprune.data.budgets import parse_tokens
from maxprune.errors import MaxpruneError
from maxprune.model.llama import REMAT_POLICIES
from maxprune.prune.api import SPARSE_METHODS, pruner_names
from maxprune.train.schema import check_optimizer, optimizer_keys

NM_PATTERN = re.compile(r"(\d+):(\d+)")
CALIBRATION_SAMPLING = ("random", "stream")


def _sparsegpt() -> dict[str, Any]:
    return {"blocksize": 128, "percdamp": 0.01}


# Structured methods (see maxprune.prune.structured.shapes for ratio_of / multiple).
RATIO_OF = ("prunable", "params")  # prune.ratio of the seven prunable kernels (as sparsity) or of all params
DEPTH_CRITERIA = ("loss", "block_influence")
WIDTH_AGGREGATIONS = ("paper", "nemo")  # Minitron-width channel importance (maxprune.prune.structured.minitron)
FLAP_STRUCTURES = ("UL-MM", "UL-UM")  # AL-AM (global, non-uniform widths) is not implemented
FLAP_METRICS = ("WIFV", "WIFN", "IFV")
SEARCHABLE = ("minitron_width", "flap")  # methods with an architecture search (maxprune.prune.structured.search)


def _minitron_depth() -> dict[str, Any]:
    return {"criterion": "loss",                # "loss" (Minitron) or "block_influence" (ShortGPT, one forward)
            "layers_removed": placeholder(int),  # default: from prune.ratio
            "ratio_of": "prunable"}


def _minitron_width() -> dict[str, Any]:
    return {"aggregation": "paper",              # "paper": Σ_tokens x² (eq. 4); "nemo": Σ_samples (mean_t |x|)²
            "hidden_size": placeholder(int),     # target hidden size (or prune.search.enabled)
            "ffn_size": placeholder(int),        # default: fills prune.ratio at that hidden size
            "num_heads": placeholder(int),       # query heads kept, evenly per KV group; default all (the paper)
            "ratio_of": "prunable",
            "multiple": placeholder(int)}        # size rounding; default 128 (scaled down for small models)


def _flap() -> dict[str, Any]:
    return {"structure": "UL-MM",                # UL-MM (the paper's) or UL-UM
            "metric": "WIFV",
            "num_heads": placeholder(int),       # UL-MM: query heads kept, whole KV groups (or prune.search.enabled)
            "ffn_size": placeholder(int),        # default: fills prune.ratio
            "ratio_of": "prunable",
            "multiple": placeholder(int)}


def _sheared() -> dict[str, Any]:
    """Sheared LLaMA's mask learning (maxprune.prune.sheared.method); defaults are the original's but the budget."""
    return {"tokens": "64K",                    # mask-learning budget (the paper's: 3200 steps x 32 x 4096 = 0.42B)
            "global_batch": 8,                  # sequences per step (one hard-concrete sample per step)
            "microbatches": 1,                  # gradient accumulation inside a step
            "lr": 1e-4,                         # model weights
            "mask_lr": 1.0,                     # log-alpha of the gates
            "lambda_lr": -1.0,                  # Lagrange multipliers; negative = gradient ascent (original's sign)
            **optimizer_keys(warmup_ratio=0.1),  # LR warmup (320 of 3200 steps), then cosine to min_lr_ratio
            "lagrangian_warmup": placeholder(int),  # steps for the target sparsity to ramp from 0; default 10 %
            "hidden_size": placeholder(int),    # target shape; unset: shapes.target_arch at prune.ratio
            "num_heads": placeholder(int),      # query heads kept, whole KV groups
            "ffn_size": placeholder(int),       # default: fills prune.ratio
            "num_layers": placeholder(int),
            "ratio_of": "prunable",
            "multiple": placeholder(int),
            "remat": "none",                    # model.remat choices; "full" for long sequences
            "log_every": 10}                    # steps between recorded trajectory points (and the last)


def _search() -> dict[str, Any]:
    return {"enabled": False}                   # minitron_width / flap: try every candidate shape at prune.ratio


def _check_structured(p) -> None:
    def one_of(key, value, valid):
        choice(f"prune.{key}", value, valid)

    d, w, f = p.minitron_depth, p.minitron_width, p.flap
    one_of("minitron_depth.criterion", d.criterion, DEPTH_CRITERIA)
    one_of("minitron_width.aggregation", w.aggregation, WIDTH_AGGREGATIONS)
    if f.structure == "AL-AM":
        raise MaxpruneError("prune.flap.structure='AL-AM' (global, non-uniform widths) is not implemented; "
                            "choose UL-MM (the paper's) or UL-UM")
    one_of("flap.structure", f.structure, FLAP_STRUCTURES)
    one_of("flap.metric", f.metric, FLAP_METRICS)
    for name, sub in (("minitron_depth", d), ("minitron_width", w), ("flap", f)):
        one_of(f"{name}.ratio_of", sub.ratio_of, RATIO_OF)
    for key in ("minitron_depth.layers_removed", "minitron_width.hidden_size", "minitron_width.ffn_size",
                "minitron_width.num_heads", "minitron_width.multiple", "flap.num_heads", "flap.ffn_size",
                "flap.multiple"):
        section, name = key.split(".")
        if p[section][name] is not None:
            at_least(f"prune.{key}", p[section][name], 1)
    if f.structure == "UL-UM" and (f.num_heads is not None or f.ffn_size is not None):
        raise MaxpruneError("prune.flap.structure='UL-UM' derives the shape from prune.ratio; unset "
                            "prune.flap.num_heads and prune.flap.ffn_size (or use UL-MM)")
    if w.ffn_size is not None and w.hidden_size is None:
        raise MaxpruneError("prune.minitron_width.ffn_size needs prune.minitron_width.hidden_size too")
    if p.search.enabled:
        if p.method not in SEARCHABLE:
            raise MaxpruneError(f"prune.search.enabled is for {', '.join(SEARCHABLE)}, not {p.method}")
        fixed = {"minitron_width": ("hidden_size", "ffn_size"), "flap": ("num_heads", "ffn_size")}[p.method]
        given = [k for k in fixed if p[p.method][k] is not None]
        if given:
            raise MaxpruneError(f"prune.search.enabled searches the shape; unset prune.{p.method}.{given[0]}")
        if p.method == "flap" and f.structure == "UL-UM":
            raise MaxpruneError("prune.flap.structure='UL-UM' fixes the shape; prune.search.enabled needs UL-MM")


def section() -> dict[str, Any]:
    return {
        "method": "wanda",                 # see `maxprune.prune.pruner_names()`
        "input": placeholder(str),         # parent model dir
        "output": placeholder(str),        # pruned model dir to write
        "pattern": "unstructured",         # sparse methods: "unstructured" or "N:M" (e.g. "2:4")
        "ratio": 0.5,                      # fraction of parameters removed
        "calibration": placeholder(str),   # source spec, prepared dataset dir, or a .npy of int token ids
        "calibration_sampling": "random",  # source specs: "random" windows of long documents (Wanda/SparseGPT) or
                                           # "stream": the first windows of the joined stream (Minitron's scripts)
        "paper_shapes": False,             # structured methods on a Llama-3.1-8B-shaped parent: Table 1's shape
        "n_samples": 128,                  # calibration sequences
        "seq_len": placeholder(int),       # calibration window (default: the prepared data's / 8192)
        "seed": 0,
        "batch_size": 8,                   # calibration sequences per forward pass
        "order": "reference",              # "reference": all seven linears from one dense pass; "sequential"
        "error_samples": 8,                # reconstruction errors on the first this many sequences (0: none)
        "sparsegpt": _sparsegpt(),
        "minitron_depth": _minitron_depth(),
        "minitron_width": _minitron_width(),
        "flap": _flap(),
        "sheared_llama": _sheared(),
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
    choice("prune.method", p.method, pruner_names())
    if not 0.0 < p.ratio < 1.0:
        raise MaxpruneError(f"prune.ratio={p.ratio} must be in (0, 1)")
    nm = parse_pattern(p.pattern)
    if nm is not None:
        if p.method not in SPARSE_METHODS:
            raise MaxpruneError(f"prune.pattern={p.pattern!r} is for sparse methods ({', '.join(SPARSE_METHODS)}), "
                                f"not {p.method}")
        if abs(p.ratio - nm[0] / nm[1]) > 1e-9:
            raise MaxpruneError(f"prune.pattern={p.pattern!r} prunes {nm[0]}/{nm[1]} of the weights; "
                                f"set prune.ratio={nm[0] / nm[1]:g} (got {p.ratio})")
    for key in ("n_samples", "batch_size"):
        at_least(f"prune.{key}", p[key], 1)
    if p.error_samples < 0:
        raise MaxpruneError(f"prune.error_samples={p.error_samples} must be >= 0 (0: no reconstruction errors)")
    if p.seq_len is not None and p.seq_len < 2:
        raise MaxpruneError(f"prune.seq_len={p.seq_len} must be >= 2")
    choice("prune.calibration_sampling", p.calibration_sampling, CALIBRATION_SAMPLING)
    if p.order not in ("reference", "sequential"):
        raise MaxpruneError(f"prune.order={p.order!r} is not valid; choose reference or sequential")
    _check_structured(p)
    _check_sheared(p.sheared_llama)


def _check_sheared(c) -> None:
    for key in ("global_batch", "microbatches", "log_every"):
        at_least(f"prune.sheared_llama.{key}", c[key], 1)
    for key in ("hidden_size", "num_heads", "ffn_size", "num_layers", "multiple"):
        if c[key] is not None:
            at_least(f"prune.sheared_llama.{key}", c[key], 1)
    if c.global_batch % c.microbatches:
        raise MaxpruneError(f"prune.sheared_llama.global_batch={c.global_batch} is not divisible by "
                            f"prune.sheared_llama.microbatches={c.microbatches}")
    if c.lagrangian_warmup is not None and c.lagrangian_warmup < 0:
        raise MaxpruneError(f"prune.sheared_llama.lagrangian_warmup={c.lagrangian_warmup} must be >= 0 steps")
    if not (c.lr > 0 and c.mask_lr > 0):
        raise MaxpruneError(f"prune.sheared_llama.lr={c.lr} and mask_lr={c.mask_lr} must be > 0")
    if not c.lambda_lr < 0:
        raise MaxpruneError(f"prune.sheared_llama.lambda_lr={c.lambda_lr} must be < 0: the multipliers follow "
                            f"gradient ascent (the original's convention, -1.0)")
    check_optimizer("prune.sheared_llama", c)
    choice("prune.sheared_llama.ratio_of", c.ratio_of, RATIO_OF)
    parse_tokens(c.tokens)
    choice("prune.sheared_llama.remat", c.remat, REMAT_POLICIES)
