"""Each method's paper settings (Table 1, Appendix D.2), in one place.

The config files under ``configs/prune/`` and the study (``study.method_settings="paper"``)
both build a method's ``prune`` section from `method_config`, so a run planned by
the study and a run started by hand with the method's config file execute the
same settings.

- **Calibration** (Appendix D.2): Minitron-depth and -width score on 1024 x 8192
  tokens of WikiText-103, the first windows of its joined train stream (the
  paper's scripts score them like a perplexity stream, batch size 1); FLAP, Wanda
  and SparseGPT on 128 x 8192 tokens of C4, random windows of long documents (the
  Wanda/SparseGPT loaders); Sheared LLaMA learns its masks on the training data,
  3200 steps of 32 x 4096 tokens. `CALIBRATION` names each method's corpus; the
  study maps a corpus name to a source (`study.calibration`).
- **Shapes** (Table 1) apply only to a Llama-3.1-8B-shaped parent
  (`prune.paper_shapes`; `pin_shapes`). Any other parent gets its shape from the
  ratio (`maxprune.prune.structured.shapes`), or from the search, so the same config file
  prunes a 135M model without flags.
- **Ratios**: the paper's 50 % counts the prunable weights; Minitron's 62.5-81.3 %
  count all parameters (1 - 3/8, 2/8, 1.5/8 of an "8 B" model; 81.3 % is 13/16).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from maxprune.errors import MaxpruneError
from maxprune.model.arch import PRESETS, Arch

LLAMA31_8B = PRESETS["llama3.1-8b"]
SHEARED_STEPS, SHEARED_BATCH, SHEARED_SEQ = 3200, 32, 4096


@dataclasses.dataclass(frozen=True)
class Calibration:
    corpus: str          # "wikitext103", "c4" or "train" (the study's training data)
    n_samples: int
    seq_len: int
    sampling: str        # "stream" (first windows of the joined stream) or "random" (random windows of documents)


CALIBRATION = {
    "minitron_depth": Calibration("wikitext103", 1024, 8192, "stream"),
    "minitron_width": Calibration("wikitext103", 1024, 8192, "stream"),
    "flap": Calibration("c4", 128, 8192, "random"),
    "wanda": Calibration("c4", 128, 8192, "random"),
    "sparsegpt": Calibration("c4", 128, 8192, "random"),
    "magnitude": Calibration("c4", 128, 8192, "random"),
    # The masks are learned on the training data; n_samples only matters for a non-dir source (cycled through).
    "sheared_llama": Calibration("train", 128, SHEARED_SEQ, "random"),
}
CORPORA = ("wikitext103", "c4", "train")

# (method, ratio) -> Table 1's shape for Llama-3.1-8B, as prune.<method>.* keys
TABLE1: dict[tuple[str, float], dict[str, int]] = {
    ("minitron_depth", 0.5): {"layers_removed": 16},
    ("minitron_depth", 0.625): {"layers_removed": 24},
    ("minitron_depth", 0.75): {"layers_removed": 28},
    ("minitron_depth", 0.8125): {"layers_removed": 30},
    ("minitron_width", 0.5): {"hidden_size": 3072, "ffn_size": 9216},
    ("minitron_width", 0.625): {"hidden_size": 2432, "ffn_size": 6144},
    ("minitron_width", 0.75): {"hidden_size": 1792, "ffn_size": 6016},
    ("minitron_width", 0.8125): {"hidden_size": 1536, "ffn_size": 4736},
    ("flap", 0.5): {"num_heads": 20, "ffn_size": 6656},
    ("sheared_llama", 0.5): {"hidden_size": 3456, "num_heads": 32, "ffn_size": 7552, "num_layers": 32},
}
# Minitron's ratios above 50 % count all parameters (see module doc)
PARAMS_RATIOS = (0.625, 0.75, 0.8125)
RATIO_LABELS = {"0.5": 0.5, "0.625": 0.625, "0.75": 0.75, "0.813": 0.8125}


def same_ratio(a: float, b: float) -> bool:
    """Ratios as the paper rounds them: 81.3 % is 13/16."""
    return abs(a - b) < 1e-3


def is_llama31_8b(arch: Arch) -> bool:
    """The dimensions Table 1's shapes are stated for (vocabulary, rope and biases aside)."""
    dims = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "ffn_size")
    return all(getattr(arch, d) == getattr(LLAMA31_8B, d) for d in dims)


def table1_shape(method: str, ratio: float) -> dict[str, int] | None:
    for (m, r), shape in TABLE1.items():
        if m == method and same_ratio(r, ratio):
            return dict(shape)
    return None


def ratio_of(method: str, ratio: float) -> str:
    """How the paper counts `ratio` for `method` (see module doc)."""
    if method.startswith("minitron") and any(same_ratio(ratio, r) for r in PARAMS_RATIOS):
        return "params"
    return "prunable"


def method_config(method: str, ratio: float = 0.5, pattern: str = "unstructured") -> dict[str, Any]:
    """The paper's ``prune`` section for `method` at `ratio` (and a sparse `pattern`)."""
    if method not in CALIBRATION:
        raise MaxpruneError(f"no paper settings for method {method!r}; valid: {', '.join(CALIBRATION)}")
    cal = CALIBRATION[method]
    # seq_len stays unset (the prepared data's length, or 8192 for a source spec) except for Sheared's 4096
    prune: dict[str, Any] = {"method": method, "ratio": ratio, "n_samples": cal.n_samples,
                             "calibration_sampling": cal.sampling, "batch_size": 8, "paper_shapes": True}
    if method in ("wanda", "sparsegpt", "magnitude"):
        prune.update(pattern=pattern, order="reference")
        if method == "sparsegpt":
            prune["sparsegpt"] = {"blocksize": 128, "percdamp": 0.01}
    elif method == "minitron_depth":
        prune["minitron_depth"] = {"criterion": "loss", "ratio_of": ratio_of(method, ratio)}
    elif method == "minitron_width":
        prune["minitron_width"] = {"ratio_of": ratio_of(method, ratio)}
    elif method == "flap":
        prune["flap"] = {"structure": "UL-MM", "metric": "WIFV", "ratio_of": "prunable"}
    elif method == "sheared_llama":
        prune["seq_len"] = SHEARED_SEQ
        prune["sheared_llama"] = {
            "tokens": str(SHEARED_STEPS * SHEARED_BATCH * SHEARED_SEQ), "global_batch": SHEARED_BATCH,
            "lagrangian_warmup": 320, "lr": 1e-4, "mask_lr": 1.0, "lambda_lr": -1.0, "warmup_ratio": 0.1,
            "min_lr_ratio": 0.1, "remat": "full", "ratio_of": "prunable"}
    return prune


def sparse_config(method: str, arg: str | None) -> dict[str, Any]:
    """A sparse method's config-file section: `arg` is its pattern, ``unstructured`` (50 %) or ``N:M`` (N/M)."""
    from maxprune.prune.schema import parse_pattern
    pattern = arg or "unstructured"
    nm = parse_pattern(pattern)
    return method_config(method, 0.5 if nm is None else nm[0] / nm[1], pattern)


def model_dtype(method: str) -> str:
    """Statistics in fp32 where they are sums of squares or Hessians; loss-scored or learned methods in bf16."""
    return "bfloat16" if method in ("minitron_depth", "sheared_llama") else "float32"


def pin_shapes(p, parent: Arch) -> tuple[dict[str, int], str]:
    """Table 1's shape keys for this prune section and parent, and where the shape comes from.

    Returns ({key: value} of ``prune.<method>`` to set, source) with source one of
    "table1" (a Llama-3.1-8B parent with ``prune.paper_shapes`` and a Table 1 row
    for the method and ratio), "config" (the shape keys the section sets itself),
    "search" or "ratio". Keys the section already sets are never replaced.
    """
    if p.method not in {m for m, _ in TABLE1}:
        return {}, "dense"
    if p.search.enabled:
        return {}, "search"
    section = p[p.method]
    shape = table1_shape(p.method, p.ratio) if p.paper_shapes and is_llama31_8b(parent) else None
    given = [key for key in (shape or {}) if section[key] is not None]
    if shape and not given:
        return shape, "table1"
    keys = ("layers_removed", "hidden_size", "ffn_size", "num_heads", "num_layers")
    return {}, "config" if any(k in section and section[k] is not None for k in keys) else "ratio"
