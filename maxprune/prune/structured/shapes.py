"""Pruning ratio → the target shapes a structured method may produce.

Why a module of its own: a ratio does not name a shape. Minitron-width can
trade hidden size against FFN size, FLAP KV groups against FFN size, Sheared
LLaMA all three; the paper enumerates candidate shapes of (about) the target
size and picks the one with the lowest calibration loss (Appendix D.3,
`maxprune.prune.structured.search`). This module is that enumeration, and the one place
that turns a ratio into a parameter target.

Conventions (inferred from the paper's Tables 1 and 5–7, pinned in
``tests/test_shapes.py``):

- **Counting**: parameters as Table 1 counts them, `Arch.num_params()`
  (embeddings, norms and lm_head included). FLAP's compensation biases are not
  part of a candidate's count (Table 1's FLAP row has none).
- **Target** (`target_params`), by `ratio_of`:
  ``"prunable"`` (default): the count of the parent with `ratio` of its seven
  prunable kernels removed — what ratio means for Wanda / SparseGPT, and what
  *every* 50 % row of the paper holds (4.51–4.54 B for Llama-3.1-8B: Minitron-D
  16 layers, Minitron-W 3072/9216, all FLAP and Sheared candidates). The
  paper's premise, every method at the same ratio holds the same count, needs it.
  ``"params"``: ``(1 − ratio) ·`` the parent's count. The paper's 62.5 / 75 /
  81.3 % rows (Minitron only; 1 − 3/8, 1 − 2/8, 1 − 1.5/8 of an "8 B" model)
  follow it: Minitron-D's 8 / 4 / 2 layers, Minitron-W's hidden sizes.
- **Size**: the largest shape whose count does not exceed the target. The free
  dimensions (hidden size, KV groups, layers) are enumerated; the dependent one
  (FFN) is the largest multiple of `multiple` under the target.
- **Multiples**: hidden and FFN sizes are multiples of 128 for Llama-3.1-8B
  (every size in Tables 1, 5–7 is); `auto_multiple` scales that down for small
  models.
- **Minitron-W** keeps the heads (unless told a head count) and admits a
  hidden size h only if its FFN satisfies ``2h ≤ FFN ≤ 4h`` (Appendix D.2).
- **FLAP / Sheared** prune whole KV groups (20 heads = 5 of 8 groups) and keep
  at least half of them by default: the paper's candidates span 16–32 heads.
- **Without a search** (`default_candidate`, `target_arch`) a method takes the
  (lower) median candidate: the paper's selection for every Minitron-W ratio.

With these, Tables 6 and 7 (FLAP, Sheared) come out exactly, shape for shape,
as do Table 1's Minitron-D and 50 % rows. Known difference (tested): Table 5's
Minitron-W FFN sizes at 62.5 / 75 / 81.3 % are not what any one target per
ratio gives — its candidates hold 2.77–3.09 B, 2.04–2.09 B and 1.58–1.60 B.
We reproduce its hidden sizes exactly; our FFN sizes fill each ratio's target
(−1152 to +640 from the paper's). Its 75 % and 81.3 % FFN sizes are what the
same floor-to-128 rule gives at round targets of 2.1 B and 1.6 B (capped at
4h), not at those ratios' 2.0 B / 1.5 B; its 62.5 % ones fit no single target.
"""

from __future__ import annotations

import math

from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.prune import schema

RATIO_OF = schema.RATIO_OF  # ("prunable", "params")
PAPER_MULTIPLE = 128


# ------------------------------------------------------------------- targets
def target_params(base: Arch, ratio: float, ratio_of: str = "prunable") -> int:
    """The parameter count a model pruned from `base` at `ratio` may hold (see module doc)."""
    if not 0.0 < ratio < 1.0:
        raise MaxpruneError(f"prune.ratio={ratio} must be in (0, 1)")
    if ratio_of == "prunable":
        target = base.num_params() - ratio * base.num_prunable_params()
    elif ratio_of == "params":
        target = (1.0 - ratio) * base.num_params()
    else:
        raise MaxpruneError(f"ratio_of={ratio_of!r} is not valid; choose one of {', '.join(RATIO_OF)}")
    return math.floor(target + 1e-3)  # ratios like 0.5 hit integer targets exactly


def auto_multiple(base: Arch) -> int:
    """Rounding multiple of hidden/FFN sizes: 128 (the paper's) scaled down for narrow models."""
    cap = max(1, base.hidden_size // 16)
    return min(PAPER_MULTIPLE, 1 << (cap.bit_length() - 1))


def _bare(arch: Arch) -> Arch:
    """The arch as counted for shape selection: no compensation biases."""
    return arch.replace(out_bias=False)


def ffn_for(arch: Arch, target: int, multiple: int) -> int:
    """Largest multiple of `multiple` as FFN size with ``num_params <= target`` (may be <= 0)."""
    at = lambda f: _bare(arch).replace(ffn_size=f).num_params()
    slope = at(2) - at(1)  # 3 · layers · hidden
    fixed = at(1) - slope
    return (target - fixed) // (slope * multiple) * multiple


# --------------------------------------------------------------------- depth
def depth_layers_kept(base: Arch, ratio: float, ratio_of: str = "prunable") -> int:
    """Most layers whose model fits the target (at least one must stay)."""
    target = target_params(base, ratio, ratio_of)
    per_layer = _bare(base).layer_params()
    kept = (target - _bare(base).replace(num_layers=1).num_params() + per_layer) // per_layer
    if kept < 1:
        one = _bare(base).replace(num_layers=1).num_params()
        room = base.num_prunable_params() if ratio_of == "prunable" else base.num_params()
        raise MaxpruneError(f"prune.ratio={ratio} ({ratio_of}) leaves under {target:,} parameters: not even one "
                            f"of the {base.num_layers} layers fits (the embeddings alone hold more); the largest "
                            f"ratio that keeps one layer is "
                            f"{math.floor((base.num_params() - one) / room * 1000) / 1000}")
    return int(kept)  # < num_layers: any ratio > 0 removes at least one layer


def depth_shape(base: Arch, p) -> Arch:
    """Minitron-depth's target: ``minitron_depth.layers_removed`` layers fewer, else what fits the ratio."""
    c = p.minitron_depth
    removed = c.layers_removed or base.num_layers - depth_layers_kept(base, p.ratio, c.ratio_of)
    if not 1 <= removed < base.num_layers:
        raise MaxpruneError(f"prune.minitron_depth.layers_removed={removed} must be in [1, {base.num_layers - 1}] "
                            f"for a {base.num_layers}-layer model")
    return base.replace(num_layers=base.num_layers - removed)


# --------------------------------------------------------------------- heads
def kv_groups_for(base: Arch, num_heads: int) -> int:
    """KV groups kept when `num_heads` query heads stay as whole groups (FLAP, Sheared)."""
    if not 1 <= num_heads <= base.num_heads or num_heads % base.group_size:
        valid = list(range(base.group_size, base.num_heads + 1, base.group_size))
        raise MaxpruneError(f"num_heads={num_heads} cannot be whole KV groups of {base.group_size} query heads "
                            f"({base.num_heads} heads / {base.num_kv_heads} KV heads); valid: {valid}")
    return num_heads // base.group_size


def check_heads_per_group(base: Arch, num_heads: int) -> int:
    """Query heads per KV group when `num_heads` are kept evenly in every group (Minitron-W)."""
    if not 1 <= num_heads <= base.num_heads or num_heads % base.num_kv_heads:
        valid = list(range(base.num_kv_heads, base.num_heads + 1, base.num_kv_heads))
        raise MaxpruneError(f"num_heads={num_heads} cannot keep the same number of query heads in each of the "
                            f"{base.num_kv_heads} KV groups of {base.num_heads} heads; valid: {valid}")
    return num_heads // base.num_kv_heads


# ---------------------------------------------------------------- candidates
def minitron_width_candidates(base: Arch, ratio: float, ratio_of: str = "prunable",
                              multiple: int | None = None, num_heads: int | None = None) -> list[Arch]:
    """Every hidden size (a multiple) whose FFN at the target satisfies 2h ≤ FFN ≤ 4h; heads fixed."""
    multiple = multiple or auto_multiple(base)
    heads = base.num_heads if num_heads is None else num_heads
    check_heads_per_group(base, heads)
    target = target_params(base, ratio, ratio_of)
    out = []
    for hidden in range(multiple, base.hidden_size + 1, multiple):
        arch = base.replace(hidden_size=hidden, num_heads=heads)
        ffn = ffn_for(arch, target, multiple)
        if 2 * hidden <= ffn <= min(4 * hidden, base.ffn_size):
            out.append(arch.replace(ffn_size=ffn))
    return _nonempty(out, "minitron_width", base, ratio, ratio_of, multiple)


def kv_group_candidates(base: Arch, ratio: float, ratio_of: str = "prunable", multiple: int | None = None,
                        hidden_sizes: tuple[int, ...] | None = None, min_kv_groups: int | None = None,
                        method: str = "flap") -> list[Arch]:
    """For each hidden size and KV-group count, the FFN that fills the target (FLAP: hidden fixed; Sheared)."""
    multiple = multiple or auto_multiple(base)
    hidden_sizes = hidden_sizes or (base.hidden_size,)
    lo = max(1, base.num_kv_heads // 2) if min_kv_groups is None else min_kv_groups
    if not 1 <= lo <= base.num_kv_heads:
        raise MaxpruneError(f"min_kv_groups={lo} must be in [1, {base.num_kv_heads}]")
    target = target_params(base, ratio, ratio_of)
    out = []
    for hidden in hidden_sizes:
        if not 0 < hidden <= base.hidden_size:
            raise MaxpruneError(f"hidden size {hidden} must be in [1, {base.hidden_size}]")
        for groups in range(lo, base.num_kv_heads + 1):
            arch = base.replace(hidden_size=hidden, num_kv_heads=groups, num_heads=groups * base.group_size)
            ffn = ffn_for(arch, target, multiple)
            if multiple <= ffn <= base.ffn_size:
                out.append(arch.replace(ffn_size=ffn))
    return _nonempty(out, method, base, ratio, ratio_of, multiple)


def flap_uniform_shape(base: Arch, ratio: float, ratio_of: str = "prunable", multiple: int | None = None) -> Arch:
    """FLAP UL-UM: the same fraction of KV groups and FFN channels (groups rounded, FFN fills the target)."""
    multiple = multiple or auto_multiple(base)
    groups = max(1, round((1.0 - ratio) * base.num_kv_heads))
    arch = base.replace(num_kv_heads=groups, num_heads=groups * base.group_size)
    ffn = ffn_for(arch, target_params(base, ratio, ratio_of), multiple)
    if not multiple <= ffn <= base.ffn_size:
        raise MaxpruneError(f"prune.ratio={ratio} ({ratio_of}) has no UL-UM shape with {groups} KV groups")
    return arch.replace(ffn_size=ffn)


def sheared_hidden_sizes(base: Arch, multiple: int | None = None) -> tuple[int, ...]:
    """The paper's two Sheared LLaMA hidden sizes as fractions of the parent's: 3072 = 3/4, 3456 = 27/32 of 4096."""
    multiple = multiple or auto_multiple(base)
    return tuple(max(multiple, round(base.hidden_size * f / multiple) * multiple) for f in (3 / 4, 27 / 32))


def default_candidate(candidates: list[Arch]) -> Arch:
    """The shape a method takes without a search or an explicit size: the (lower) median candidate.

    Why the median: it balances the traded dimensions, and for Minitron-width
    it is the paper's selected hidden size at every ratio (Tables 1 and 5:
    3072, 2432, 1792, 1536 of 6, 5, 4, 3 candidates). FLAP's 20 heads and
    Sheared's 3456/32 came out of the paper's search instead; their configs pin them.
    """
    return candidates[(len(candidates) - 1) // 2]


def target_arch(method: str, parent: Arch, ratio: float, ratio_of: str = "prunable",
                multiple: int | None = None) -> Arch:
    """The Arch `method` makes of `parent` at `ratio` with its defaults (no search), e.g. for planning a study."""
    if method == "minitron_depth":
        return parent.replace(num_layers=depth_layers_kept(parent, ratio, ratio_of))
    if method == "minitron_width":
        return default_candidate(minitron_width_candidates(parent, ratio, ratio_of, multiple))
    if method == "flap":
        return default_candidate(kv_group_candidates(parent, ratio, ratio_of, multiple)).replace(out_bias=True)
    if method == "sheared_llama":  # the paper's choice: the larger hidden size, every head
        return kv_group_candidates(parent, ratio, ratio_of, multiple, sheared_hidden_sizes(parent, multiple),
                                   method=method)[-1]
    raise MaxpruneError(f"{method!r} is not a structured method with a target shape; valid: minitron_depth, "
                        f"minitron_width, flap, sheared_llama")


def _nonempty(out: list[Arch], method: str, base: Arch, ratio: float, ratio_of: str, multiple: int) -> list[Arch]:
    if not out:
        raise MaxpruneError(f"prune.ratio={ratio} ({ratio_of}) has no admissible {method} shape for this model "
                            f"(hidden {base.hidden_size}, ffn {base.ffn_size}, sizes in multiples of {multiple}); "
                            f"choose another ratio or multiple")
    return out


def describe(arch: Arch) -> dict:
    """A candidate as one row of a Table 5–7 style table."""
    return {"num_layers": arch.num_layers, "hidden_size": arch.hidden_size, "num_heads": arch.num_heads,
            "num_kv_heads": arch.num_kv_heads, "ffn_size": arch.ffn_size, "params": _bare(arch).num_params()}


def summary(parent: Arch, arch: Arch, seconds: float) -> dict:
    """What a structured prune's provenance keeps: the shape, its count, the fraction removed both ways."""
    return {**describe(arch), "params_with_biases": arch.num_params(),
            "params_removed": 1 - arch.num_params() / parent.num_params(),
            "prunable_removed": 1 - arch.num_prunable_params() / parent.num_prunable_params(),
            "seconds": seconds}
