"""Model surgery: slice params (and masks) down to kept layers, channels and heads.

Why here and not in each method: Minitron (depth and width), FLAP and
Sheared LLaMA all end the same way — given what to keep, cut every tensor
that touches it and return the smaller `Arch`. Getting one index wrong (a norm,
a bias, the lm_head) silently breaks the model, so it is done once.

What to keep is a `Keep`: per axis an index array, or None for "all".

- ``layers [L']``: decoder layers (Minitron-depth).
- ``hidden_D [D']``: one shared hidden index through the embedding, both
  norms of every layer, the q/k/v/gate/up inputs, the o/down outputs and
  biases, the final norm and the lm_head (Minitron-width, Sheared).
- ``ffn_LF [L, F']``: FFN channels per layer (gate/up outputs, down inputs).
  Counts are uniform because params are layer-stacked; indices differ per layer.
- ``kv_LK [L, K']``: KV groups per layer (k, v, and the group's query heads in
  q and o) — FLAP's GQA granularity.
- ``heads_LKG [L, K', G']``: query heads kept inside each kept group, by their
  index within the group (0..G−1), so every group keeps G' heads and query
  head n still uses KV head n // G' (Minitron-width ``num_heads``).

Per-layer indices refer to the parent's layers; layers are dropped last.
Indices are kept in the order given: Minitron keeps top-k in descending
importance, which permutes channels. Permuting hidden channels consistently
leaves the function unchanged: RMSNorm's mean square, every matmul's sum over
D and the residual additions are all invariant to a shared permutation of D
(tested). Dropping hidden channels is *not* exact even for all-zero channels:
RMSNorm then averages over fewer channels (the reference behaviour; no rescale).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch

Tree = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Keep:
    """Indices to keep per axis; None keeps the axis whole (see module doc)."""

    layers: Any = None
    hidden_D: Any = None
    ffn_LF: Any = None
    kv_LK: Any = None
    heads_LKG: Any = None


# path -> {axis: kind}; axis counts the layer axis for leaves under "layers"
_AXES: dict[str, dict[int, str]] = {
    "embed/embedding": {1: "hidden"},
    "layers/attn_norm/scale": {1: "hidden"},
    "layers/mlp_norm/scale": {1: "hidden"},
    "layers/attn/q/kernel": {1: "hidden", 2: "q"},
    "layers/attn/k/kernel": {1: "hidden", 2: "kv"},
    "layers/attn/v/kernel": {1: "hidden", 2: "kv"},
    "layers/attn/o/kernel": {1: "q", 2: "hidden"},
    "layers/attn/o/bias": {1: "hidden"},
    "layers/mlp/gate/kernel": {1: "hidden", 2: "ffn"},
    "layers/mlp/up/kernel": {1: "hidden", 2: "ffn"},
    "layers/mlp/down/kernel": {1: "ffn", 2: "hidden"},
    "layers/mlp/down/bias": {1: "hidden"},
    "final_norm/scale": {0: "hidden"},
    "lm_head/kernel": {0: "hidden"},
}


def slice_model(params: Tree, arch: Arch, keep: Keep, masks: Tree | None = None
                ) -> tuple[Tree, Arch, Tree | None]:
    """Params (and masks) with only the kept layers / channels / heads, and the new `Arch`."""
    idx = _checked(arch, keep)
    new_params, new_masks = _slice_trees(params, masks, idx, arch)
    return new_params, _new_arch(arch, idx), new_masks


def uniform(index, num_layers: int) -> np.ndarray:
    """The same per-layer index for every layer: ``[X] -> [L, X]`` (or ``[K', G'] -> [L, K', G']``)."""
    index = np.asarray(index)
    return np.broadcast_to(index, (num_layers, *index.shape))


# ------------------------------------------------------------------ checking
def _checked(arch: Arch, keep: Keep) -> dict[str, np.ndarray | None]:
    """Host int arrays of the keep indices, validated against `arch`."""
    L, G = arch.num_layers, arch.group_size
    idx = {name: None if value is None else np.asarray(value) for name, value in dataclasses.asdict(keep).items()}
    _check("layers", idx["layers"], 1, arch.num_layers, None)
    _check("hidden_D", idx["hidden_D"], 1, arch.hidden_size, None)
    _check("ffn_LF", idx["ffn_LF"], 2, arch.ffn_size, L)
    _check("kv_LK", idx["kv_LK"], 2, arch.num_kv_heads, L)
    _check("heads_LKG", idx["heads_LKG"], 3, G, L)
    if idx["heads_LKG"] is not None:
        groups = arch.num_kv_heads if idx["kv_LK"] is None else idx["kv_LK"].shape[1]
        if idx["heads_LKG"].shape[1] != groups:
            raise MaxpruneError(f"heads_LKG has {idx['heads_LKG'].shape[1]} groups per layer but {groups} KV "
                                f"groups are kept; every kept group needs the same number of query heads")
    return idx


def _check(name: str, index, ndim: int, size: int, num_layers: int | None) -> None:
    if index is None:
        return
    if index.ndim != ndim or not np.issubdtype(index.dtype, np.integer) or index.shape[-1] < 1:
        raise MaxpruneError(f"keep {name} must be a non-empty int array of {ndim} dims, got {index.dtype} "
                            f"{index.shape}")
    if num_layers is not None and index.shape[0] != num_layers:
        raise MaxpruneError(f"keep {name} has {index.shape[0]} rows; the model has {num_layers} layers")
    if index.min() < 0 or index.max() >= size:
        raise MaxpruneError(f"keep {name} indices span [{index.min()}, {index.max()}]; valid: [0, {size})")
    flat = index.reshape(-1, index.shape[-1])
    if any(len(np.unique(row)) != len(row) for row in flat):
        raise MaxpruneError(f"keep {name} repeats an index; each kept unit must appear once")


def _new_arch(arch: Arch, idx) -> Arch:
    changes = {}
    if idx["layers"] is not None:
        changes["num_layers"] = len(idx["layers"])
    if idx["hidden_D"] is not None:
        changes["hidden_size"] = len(idx["hidden_D"])
    if idx["ffn_LF"] is not None:
        changes["ffn_size"] = idx["ffn_LF"].shape[1]
    groups = arch.num_kv_heads if idx["kv_LK"] is None else idx["kv_LK"].shape[1]
    per_group = arch.group_size if idx["heads_LKG"] is None else idx["heads_LKG"].shape[2]
    changes.update(num_kv_heads=groups, num_heads=groups * per_group)
    return arch.replace(**changes)


# ------------------------------------------------------------------ slicing
@functools.partial(jax.jit, static_argnames="arch")
def _slice_trees(params: Tree, masks: Tree | None, idx, arch: Arch):
    """One compiled gather program for every tensor (sharded params stay on device)."""
    cut = lambda tree: None if tree is None else _map(tree, lambda path, x: _slice_leaf(path, x, arch, idx))
    return cut(params), cut(masks)


def _map(tree: Tree, fn, prefix: str = "") -> Tree:
    return {k: _map(v, fn, f"{prefix}{k}/") if isinstance(v, dict) else fn(f"{prefix}{k}", v)
            for k, v in tree.items()}


def _slice_leaf(path: str, x, arch: Arch, idx) -> Any:
    if path not in _AXES:
        raise MaxpruneError(f"cannot slice parameter {path!r}: surgery knows {sorted(_AXES)}")
    for axis, kind in _AXES[path].items():
        if kind == "hidden" and idx["hidden_D"] is not None:
            x = jnp.take(x, idx["hidden_D"], axis=axis, mode="clip")
        elif kind == "ffn" and idx["ffn_LF"] is not None:
            x = _take_per_layer(x, idx["ffn_LF"], axis)
        elif kind in ("q", "kv"):
            x = _slice_heads(x, axis, kind, arch, idx)
    if path.startswith("layers/") and idx["layers"] is not None:
        x = jnp.take(x, idx["layers"], axis=0, mode="clip")
    return x


def _take_per_layer(x, index_LX, axis: int):
    """``x[l, ..., index_LX[l], ...]`` along `axis` for every layer l (axis 0)."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = index_LX.shape
    return jnp.take_along_axis(x, index_LX.reshape(shape), axis=axis, mode="clip")


def _slice_heads(x, axis: int, kind: str, arch: Arch, idx):
    """Split the head axis into (K, [G,] Hd), keep groups then heads within groups, merge back."""
    kv, heads = idx["kv_LK"], idx["heads_LKG"]
    if kv is None and (heads is None or kind == "kv"):
        return x
    K, G, Hd = arch.num_kv_heads, arch.group_size, arch.head_dim
    split = (K, G, Hd) if kind == "q" else (K, Hd)
    y = x.reshape(*x.shape[:axis], *split, *x.shape[axis + 1:])
    if kv is not None:
        y = _take_per_layer(y, kv, axis)
    if kind == "q" and heads is not None:
        index = heads.reshape(heads.shape[0], *[1] * (axis - 1), *heads.shape[1:],
                                           *[1] * (y.ndim - axis - 2))
        y = jnp.take_along_axis(y, index, axis=axis + 1, mode="clip")
    return y.reshape(*x.shape[:axis], -1, *x.shape[axis + 1:])
