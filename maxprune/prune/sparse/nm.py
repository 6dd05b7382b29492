"""Mask selection rules shared by the sparse methods: N:M groups, per-output counts, thresholds.

Our kernels are ``[in, out]``, so a torch weight's *row* (one output) is a
*column* here, and N:M groups of m consecutive weights run along the **input**
axis (axis 0). Masks are keep-masks: True keeps a weight.

Each rule reproduces the reference's choice exactly, ties included (scores are >= 0):
- `prune_lowest_per_output`: Wanda's ``sort(stable=True)`` per row, prune the k lowest;
- `prune_at_or_below_kth`: magnitude's / SparseGPT's one threshold
  ``sort(score.flatten())[k]`` and ``score <= threshold`` (k+1 pruned on tie-free data);
- `prune_n_of_m`: the n lowest of every m consecutive inputs of each output
  (torch's ``topk(largest=False)``; ties broken towards the lower index).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.prune.schema import parse_pattern


def prune_lowest_per_output(score_IO: jax.Array, k: int) -> jax.Array:
    """Keep-mask pruning the `k` lowest scores (>= 0) of every output column; ties: lower index first.

    Same choice as a stable sort of each column; no sort: the k-th smallest per
    column by `kth_smallest`, then ties at it are pruned in index order.
    """
    if k == 0:
        return jnp.ones(score_IO.shape, bool)
    threshold_O = kth_smallest(score_IO, k - 1, axis=0)
    below = score_IO < threshold_O
    at = score_IO == threshold_O
    room_O = k - jnp.sum(below, axis=0)  # how many of the ties to prune
    return ~(below | (at & (jnp.cumsum(at, axis=0) <= room_O)))


def by_output_blocks(fn, x_IO: jax.Array, max_elements: int = 1 << 18) -> jax.Array:
    """``fn(x_IO)`` for a per-output rule `fn` ([in, c] -> [in, c]), computed on blocks of outputs.

    Why: the rules' temporaries (scores, bit patterns, counts) are a few times
    the kernel's size when made for the whole kernel at once (2 GB for a
    Llama-3.1-8B layer's seven); one block of ~`max_elements` entries at a time
    keeps them small (MBs) and in cache. Each output's column is computed
    exactly as alone, so the result is identical.

    The block width divides the output count where a divisor at least half the
    widest block fits (then `fn` is traced once, inside the loop: every traced
    copy of a rule costs about a second of XLA:CPU compile time); otherwise it is
    a power of two with a tail block.
    """
    I, O = x_IO.shape
    c = _block_width(I, O, max_elements)
    if c >= O:
        return fn(x_IO)
    nb, tail = divmod(O, c)
    dtype = jax.eval_shape(fn, jax.ShapeDtypeStruct((I, c), x_IO.dtype)).dtype

    def block(b, out_IO):
        x_Ic = lax.dynamic_slice_in_dim(x_IO, b * c, c, axis=1)
        return lax.dynamic_update_slice_in_dim(out_IO, fn(x_Ic), b * c, axis=1)

    out_IO = lax.fori_loop(0, nb, block, jnp.zeros((I, O), dtype))
    if tail:
        out_IO = out_IO.at[:, nb * c:].set(fn(lax.slice_in_dim(x_IO, nb * c, O, axis=1)))
    return out_IO


def stacked_by_output_blocks(fn, stacks, i, extras, max_elements: int = 1 << 18) -> list[jax.Array] | None:
    """``[fn(stack[i], extra) for stack, extra in zip(stacks, extras)]`` for a per-output rule, in ONE loop.

    The kernels ``stacks[k][i]`` (``[in, out_k]``, one `in` for all) are cut
    into blocks of one width dividing every ``out_k``, and a single loop walks
    the blocks of all of them, so `fn` (``([in, c], extra) -> [in, c]``) is
    traced once instead of once per kernel (XLA:CPU compiles each traced copy
    of a rule for about a second; a Llama layer has seven kernels). Blocks are
    read from the stacks in place. Each output's column is computed exactly as
    alone, so the result is `by_output_blocks`'s. None when no common width
    of at least half the widest block exists (call `by_output_blocks` then).
    """
    I = stacks[0].shape[1]
    g = math.gcd(*(st.shape[2] for st in stacks))
    c = _block_width(I, g, max_elements)
    if g % c or 2 * c * I < min(max_elements, I * g):
        return None
    kernel_b = np.concatenate([np.full(st.shape[2] // c, k) for k, st in enumerate(stacks)]).astype(np.int32)
    offset_b = np.concatenate([np.arange(0, st.shape[2], c) for st in stacks]).astype(np.int32)
    dtype = jax.eval_shape(fn, jax.ShapeDtypeStruct((I, c), stacks[0].dtype), extras[0]).dtype
    branches = [lambda off, st=st, ex=ex: (lax.dynamic_slice(st, (i, 0, off), (1, I, c))[0], ex)
                for st, ex in zip(stacks, extras)]

    def block(b, outs):
        kernel, offset = jnp.asarray(kernel_b)[b], jnp.asarray(offset_b)[b]
        r_Ic = fn(*lax.switch(kernel, branches, offset))
        new = []
        for k, out_IO in enumerate(outs):  # write the block into its kernel's output; the others stay as they are
            mine = kernel == k
            at = jnp.where(mine, offset, 0)
            new.append(lax.dynamic_update_slice_in_dim(
                out_IO, jnp.where(mine, r_Ic, lax.dynamic_slice_in_dim(out_IO, at, c, axis=1)), at, axis=1))
        return tuple(new)

    init = tuple(jnp.zeros((I, st.shape[2]), dtype) for st in stacks)
    return list(lax.fori_loop(0, len(kernel_b), block, init))


def _block_width(I: int, O: int, max_elements: int) -> int:
    """Outputs per block: the widest divisor of O within budget if it is at least half the widest power of two."""
    widest = max(1, max_elements // max(I, 1))
    if widest >= O:
        return O
    power = 1 << (widest.bit_length() - 1)
    divisor = next(d for d in range(widest, 0, -1) if O % d == 0)
    return divisor if 2 * divisor >= power else power


def prune_at_or_below_kth(score: jax.Array, k) -> jax.Array:
    """Keep-mask pruning every score (>= 0) <= the k-th smallest (0-based) of the whole array."""
    return score > kth_smallest(score.ravel(), k, axis=0)


def kth_smallest(x: jax.Array, k, axis: int = 0) -> jax.Array:
    """``sort(x, axis)[k]`` for non-negative float32 `x` (inf allowed), exactly, without sorting.

    Why: XLA's CPU sort is several times slower than a scan, and these arrays are
    large (a whole 4096 x 14336 kernel for magnitude). Non-negative floats order
    like their int32 bit patterns, so 32 bisection steps on the bit pattern —
    each one count over the array — find the smallest value with more than k
    entries at or below it: the k-th smallest. `k` may be traced.
    """
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    shape = tuple(1 if i == axis % x.ndim else d for i, d in enumerate(x.shape))
    lo = jnp.full(shape, -1, jnp.int32)               # count(bits <= lo) <= k
    hi = jnp.max(bits, axis=axis, keepdims=True)      # count(bits <= hi) > k

    def step(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits <= mid, axis=axis, keepdims=True) > k
        return jnp.where(enough, lo, mid), jnp.where(enough, mid, hi)

    _, hi = lax.fori_loop(0, 32, step, (lo, hi))
    return lax.bitcast_convert_type(hi, jnp.float32)


def prune_n_of_m(score_IO: jax.Array, n: int, m: int) -> jax.Array:
    """Keep-mask pruning the n lowest of each group of m consecutive inputs, per output (ties: lower index).

    Ranks within a group by pairwise comparison (m² elementwise ops, no sort).
    """
    I, O = score_IO.shape
    g = score_IO.reshape(I // m, m, O)
    a, b = g[:, :, None, :], g[:, None, :, :]      # [G, j, l, O]: entry j vs entry l
    idx = jnp.arange(m)
    earlier = (idx[None, :] < idx[:, None])[None, :, :, None]  # l < j
    rank = jnp.sum((b < a) | ((b == a) & earlier), axis=2)    # entries before j in a stable sort
    return (rank >= n).reshape(I, O)


def check_fits(arch: Arch, pattern: str) -> tuple[int, int] | None:
    """(n, m) of an N:M `pattern` after checking m divides every prunable input dim; None if unstructured."""
    nm = parse_pattern(pattern)
    if nm is None:
        return None
    m = nm[1]
    dims = {"hidden_size": arch.hidden_size, "num_heads*head_dim": arch.num_heads * arch.head_dim,
            "ffn_size": arch.ffn_size}
    for name, dim in dims.items():
        if dim % m:
            raise MaxpruneError(f"prune.pattern={pattern!r} needs every prunable input dim divisible by "
                                f"{m}, but {name}={dim} is not")
    return nm


def is_n_of_m(keep_IO, n: int, m: int) -> bool:
    """True if every group of m consecutive inputs of every output keeps at most m − n weights."""
    keep = np.asarray(keep_IO)
    if keep.shape[-2] % m:
        return False
    groups = keep.reshape(*keep.shape[:-2], keep.shape[-2] // m, m, keep.shape[-1])
    return bool(np.all(groups.sum(axis=-2) <= m - n))
