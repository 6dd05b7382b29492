"""In-place writes into the stacked ``[num_layers, ...]`` params: pruned kernels, masks, parent masks.

`StackWriter` owns the stacks of one `prune_layerwise` run: it writes each
pruned group's kernels and keep-masks into layer ``i`` (jitted, stacks donated,
so memory stays one model and one set of masks) and bakes a sparse parent's
masks in as zeros. `zero_in_place` and `count_kept` work one block of rows at
a time, which keeps XLA from materialising a whole-layer copy or a widened
bool array.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from maxprune.model import masks as masks_lib
from maxprune.prune.engine.layer import ALL_LINEARS, LINEARS, Tree, get_linear


class StackWriter:
    """Writes each pruned group (kernels and masks) into the stacked arrays in place.

    The stacked arrays keep their shardings; updates are jitted with the stacks
    donated, so memory stays one model (and one set of masks, made on a
    linear's first write). Unless `donate`, a kernel's first write copies its
    stack (the caller's params stay valid).
    """

    def __init__(self, params: Tree, donate: bool):
        self.params = params
        self.layers = jax.tree.map(jnp.asarray, params["layers"])
        self.masks: dict[str, jax.Array] = {}
        self.owned: set[str] = set(ALL_LINEARS) if donate else set()

    def _stacks(self, names) -> tuple[dict, dict]:
        """(stacks we may donate, the caller's stacks to copy) of `names`."""
        stacks = {name: get_linear(self.layers, name) for name in names}
        return ({n: a for n, a in stacks.items() if n in self.owned},
                {n: a for n, a in stacks.items() if n not in self.owned})

    def _set(self, name: str, stack: jax.Array) -> None:
        block, _ = LINEARS[name]
        linear = {**self.layers[block][name], "kernel": stack}
        self.layers = {**self.layers, block: {**self.layers[block], name: linear}}
        self.owned.add(name)

    def write(self, i: int, kernels: Mapping[str, jax.Array], keeps: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Layer i of each named kernel := (its new kernel, or itself) with masked weights zeroed; masks := keeps.

        Returns the kept count of each of `keeps` (int32 device scalars, counted by the same program).
        """
        names = tuple(n for n in ALL_LINEARS if n in kernels or n in keeps)
        if not names:
            return {}
        missing = {name: get_linear(self.layers, name) for name in keeps if name not in self.masks}
        if missing:
            self.masks.update(_all_true(missing))
        owned, theirs = self._stacks(names)
        new = {n: kernels[n] for n in names if n in kernels}
        masks = {n: self.masks[n] for n in keeps}
        out, out_masks, counts = _write_donated(owned, masks, i, new, dict(keeps))
        if theirs:
            copies, _, _ = _write_copy(theirs, {}, i, new, dict(keeps))
            out.update(copies)
        for name, stack in out.items():
            self._set(name, stack)
        self.masks.update(out_masks)
        return counts

    def bake(self, i: int, parent: Tree) -> None:
        """Zero layer i's weights under a parent's masks (in place)."""
        keeps = {name: get_linear(parent, name) for name in ALL_LINEARS
                 if LINEARS[name][0] in parent and name in parent[LINEARS[name][0]]}
        if not keeps:
            return
        owned, theirs = self._stacks(keeps)
        out = _bake_donated(owned, {n: keeps[n] for n in owned}, i)
        if theirs:
            out.update(_bake_copy(theirs, {n: keeps[n] for n in theirs}, i))
        for name, stack in out.items():
            self._set(name, stack)

    def result(self) -> tuple[Tree, Tree | None]:
        params = {**self.params, "layers": self.layers}
        masks = masks_lib.from_kernels({LINEARS[n]: self.masks[n] for n in ALL_LINEARS if n in self.masks})
        return params, (masks if self.masks else None)


def _write(stacks, masks, i, kernels, keeps):
    """Stacked kernels with layer i replaced (new kernel or the old one, masked weights zero); masks[i] := keeps;
    the kept count of each keep-mask."""
    out = {}
    for name, stack in stacks.items():
        if name in kernels:
            w = kernels[name].astype(stack.dtype)
            if name in keeps:
                w = jnp.where(keeps[name], w, jnp.zeros((), stack.dtype))
            out[name] = lax.dynamic_update_index_in_dim(stack, w, i, 0)
        elif name in keeps:
            out[name] = zero_in_place(stack, keeps[name], i)
        else:
            out[name] = stack
    new_masks = {name: lax.dynamic_update_index_in_dim(m, keeps[name], i, 0) for name, m in masks.items()}
    return out, new_masks, {name: _count(keep) for name, keep in keeps.items()}


def zero_in_place(stack, keep, i, block_elements: int = 1 << 20):
    """``stack[i] = where(keep, stack[i], 0)``, one block of rows at a time.

    Why blocks: XLA materialises a whole-layer update read from the buffer it
    updates (a copy of the kernel); a loop of row blocks updates it in place.
    """
    rows, cols = keep.shape
    b = max(1, min(rows, block_elements // max(cols, 1)))
    nb, tail = divmod(rows, b)
    zero = jnp.zeros((), stack.dtype)

    def block(r, stack, size=b):
        start = (i, r * b, 0)
        w = lax.dynamic_slice(stack, start, (1, size, cols))
        k = lax.dynamic_slice(keep, (r * b, 0), (size, cols))
        return lax.dynamic_update_slice(stack, jnp.where(k[None], w, zero), start)

    stack = lax.fori_loop(0, nb, block, stack)
    return block(nb, stack, tail) if tail else stack


_write_donated = jax.jit(_write, donate_argnums=(0, 1))
_write_copy = jax.jit(_write)


def _bake(stacks, parent, i):
    keeps = {n: lax.dynamic_index_in_dim(parent[n], i, 0, False) for n in stacks}
    return {n: zero_in_place(stack, keeps[n], i) for n, stack in stacks.items()}


_bake_donated = jax.jit(_bake, donate_argnums=0)
_bake_copy = jax.jit(_bake)


def _all_true(kernels: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """All-True bool arrays shaped and sharded like `kernels` (one small program)."""
    spec = tuple((name, tuple(k.shape), k.sharding) for name, k in kernels.items())
    return _all_true_fn(spec)()


@functools.lru_cache(maxsize=16)
def _all_true_fn(spec):
    return jax.jit(lambda: {name: jnp.ones(shape, bool) for name, shape, _ in spec},
                   out_shardings={name: s for name, _, s in spec})


@jax.jit
def count_kept(keeps):
    """Kept entries of each mask (see `_count`)."""
    return {name: _count(keep) for name, keep in keeps.items()}


def _count(keep):
    """Kept entries of one keep-mask, counted one block of rows at a time.

    XLA:CPU widens a whole bool array before a plain sum (4x its size: 832 MB
    for a Llama-3.1-8B layer's masks); blocks of rows keep that small.
    """
    rows = keep.shape[0]
    b = max(1, min(rows, (1 << 20) // max(keep.shape[1], 1)))
    nb, tail = divmod(rows, b)
    body = lambda j, acc: acc + jnp.sum(lax.dynamic_slice_in_dim(keep, j * b, b, axis=0), dtype=jnp.int32)
    total = lax.fori_loop(0, nb, body, jnp.int32(0))
    return total + jnp.sum(keep[nb * b:], dtype=jnp.int32) if tail else total
