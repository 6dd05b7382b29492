"""Pruning masks: a bool pytree mirroring the seven prunable kernels of every layer.

``masks["layers"]["attn"]["q"]["kernel"]`` has the shape of the q kernel
``[L, D, N*Hd]``; True keeps a weight, False prunes it. A kernel without an
entry is dense. Embeddings, norms, biases and lm_head are never masked.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxprune.errors import MaxpruneError

PRUNABLE: tuple[tuple[str, str], ...] = (
    ("attn", "q"), ("attn", "k"), ("attn", "v"), ("attn", "o"),
    ("mlp", "gate"), ("mlp", "up"), ("mlp", "down"),
)

Tree = dict[str, Any]


def kernel_name(block: str, name: str) -> str:
    return f"layers/{block}/{name}/kernel"


def get_kernel(tree: Tree, block: str, name: str):
    """The stacked kernel (or mask) of one prunable linear, or None if absent."""
    return tree.get("layers", {}).get(block, {}).get(name, {}).get("kernel")


def iter_masks(masks: Tree | None) -> Iterator[tuple[str, str, Any]]:
    """(block, name, mask) for every prunable kernel that has a mask."""
    for block, name in PRUNABLE:
        mask = get_kernel(masks or {}, block, name)
        if mask is not None:
            yield block, name, mask


def from_kernels(kernels: dict[tuple[str, str], Any]) -> Tree:
    """Build a masks tree from ``{(block, name): mask}``."""
    tree: Tree = {"layers": {}}
    for (block, name), mask in kernels.items():
        if (block, name) not in PRUNABLE:
            raise MaxpruneError(f"{block}/{name} is not a prunable kernel; valid: {PRUNABLE}")
        tree["layers"].setdefault(block, {})[name] = {"kernel": mask}
    return tree


def dense_masks(params: Tree) -> Tree:
    """All-True masks for the seven prunable kernels."""
    return from_kernels({(b, n): jnp.ones(get_kernel(params, b, n).shape, bool) for b, n in PRUNABLE})


def apply_masks(params: Tree, masks: Tree | None) -> Tree:
    """Params with every masked weight set to exactly zero (a new tree)."""
    if not masks:
        return params
    out = jax.tree.map(lambda x: x, params)  # shallow structural copy
    for block, name, mask in iter_masks(masks):
        kernel = out["layers"][block][name]["kernel"]
        out["layers"][block][name]["kernel"] = jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
    return out


def validate_masks(params: Tree, masks: Tree | None) -> None:
    """Masks must be bool and shaped like their kernels; nothing else may be masked."""
    if not masks:
        return
    allowed = {kernel_name(b, n) for b, n in PRUNABLE}
    for path, leaf in jax.tree_util.tree_leaves_with_path(masks):
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        if key not in allowed:
            raise MaxpruneError(f"mask {key!r} is not a prunable kernel; valid: {sorted(allowed)}")
        if leaf.dtype != np.bool_:
            raise MaxpruneError(f"mask {key!r} must be bool, got {leaf.dtype}")
    for block, name, mask in iter_masks(masks):
        kernel = get_kernel(params, block, name)
        if kernel is None or tuple(kernel.shape) != tuple(mask.shape):
            want = None if kernel is None else tuple(kernel.shape)
            raise MaxpruneError(
                f"mask {kernel_name(block, name)} has shape {tuple(mask.shape)} but the kernel is {want}")


def sparsity(masks: Tree | None, params: Tree) -> dict[str, float]:
    """Fraction of pruned weights per prunable kernel (0.0 where unmasked)."""
    out = {}
    for block, name in PRUNABLE:
        mask = get_kernel(masks or {}, block, name)
        out[f"{block}/{name}"] = 0.0 if mask is None else float(1.0 - np.mean(np.asarray(mask)))
    return out


def count_nonzero_prunable(params: Tree) -> int:
    """Non-zero weights in the seven prunable kernels (what sparse methods report)."""
    return int(sum(np.count_nonzero(np.asarray(get_kernel(params, b, n))) for b, n in PRUNABLE))
