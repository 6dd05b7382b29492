"""SparseGPT (Frantar & Alistarh 2023): prune with OBS weight updates, block by block.

Reference: IST-DASLab/sparsegpt ``SparseGPT.fasterprune`` (blocksize 128,
percdamp 0.01; see docs/methods.md), reproduced step for step:

- ``H = (2 / n_sequences) · Σ XᵀX`` in fp32 (their running mean);
- dead inputs (``H_ii == 0``): ``H_ii = 1`` and their weights zeroed;
- ``H += percdamp · mean(diag H) · I``; ``Hinv`` = upper Cholesky factor of H⁻¹;
- per block of `blocksize` inputs ``[i1, i2)``: unstructured — one threshold over
  the block's ``W1² / diag(Hinv1)²`` chosen at the block start; N:M — at every
  input ``i % m == 0`` the n smallest of the *current* ``W1[i:i+m]``'s scores;
  then input by input ``err = (w − q) / Hinv1[i,i]``, ``W1[i:] −= Hinv1[i, i:]ᵀ ⊗ err``;
  after the block ``W[i2:] −= Hinv[i1:i2, i2:]ᵀ @ Err1``.

Layout: the reference's weight is ``[out, in]`` and walks its columns; our
kernel is ``[in, out]``, so the same walk goes over our *rows* (contiguous
here). The whole thing is one jitted program per kernel shape: `lax.fori_loop`
over blocks, over the inputs of a block, and over the blocks after it for the
lazy update (its exact triangular work, as the reference does, instead of a
masked full-width matmul that would double it). The input dim is padded to a
multiple of `blocksize` with dead inputs (identity in Hinv, zero weights), which
leaves the real part unchanged; the last block's threshold counts only real
entries. Matmuls run at full fp32 precision (TPUs default to bf16 passes).

The inverse-Hessian factor depends only on the input site, so q/k/v (and
gate/up) share one Cholesky.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from maxprune.config import at_least
from maxprune.errors import MaxpruneError
from maxprune.prune.api import register
from maxprune.prune.engine.layer import SITE_OF, get_linear, take
from maxprune.prune.sparse import nm as nm_lib
from maxprune.prune.sparse import report
from maxprune.prune.sparse.wanda import LINEAR_SITES

HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Hessians:
    """``(2 / n_sequences) · Σ_tokens x xᵀ`` per input site, fp32."""

    sites: tuple[str, ...] = LINEAR_SITES

    def init(self, dims: Mapping[str, int]):
        return {site: jnp.zeros((d, d), jnp.float32) for site, d in dims.items()}

    def update(self, stats, inputs):
        return {site: _add_gram(h_II, inputs[site].astype(jnp.float32)) for site, h_II in stats.items()}

    def finalize(self, stats, n_sequences: int):
        return {site: h * (2.0 / n_sequences) for site, h in stats.items()}


def _add_gram(h_II, x_BLI, block_elements: int = 1 << 22):
    """``h + Σ_tokens x xᵀ`` (fp32, full precision) in place, one block of rows at a time.

    Why blocks: ``h + XᵀX`` in one step makes the product a second ``[I, I]``
    buffer (784 MB for Llama-3.1-8B's down_proj input); row blocks update the
    (donated) accumulator in place. Each entry is the same dot product, so the
    sums are the same.
    """
    I = h_II.shape[0]
    rows = max(1, min(I, 1 << max(0, (block_elements // I).bit_length() - 1)))  # a power of two; ~16 MB blocks
    nb, tail = divmod(I, rows)

    def block(r, h_II, size=rows):
        x_BLR = lax.dynamic_slice_in_dim(x_BLI, r * rows, size, axis=2)
        h_RI = lax.dynamic_slice_in_dim(h_II, r * rows, size, axis=0)
        gram_RI = jnp.einsum("blr,bli->ri", x_BLR, x_BLI, precision=HIGHEST)
        return lax.dynamic_update_slice_in_dim(h_II, h_RI + gram_RI, r * rows, axis=0)

    h_II = lax.fori_loop(0, nb, block, h_II)
    return block(nb, h_II, tail) if tail else h_II


# -------------------------------------------------------- inverse Hessian
def inverse_hessian_factor(h_II: jax.Array, percdamp: float, blocksize: int):
    """(upper Cholesky factor of the damped H⁻¹, padded to a multiple of `blocksize`; dead inputs).

    Consumes `h_II`. On one CPU device it runs as three programs, each with
    two ``[I, I]`` buffers alive (the one program needs three: 2.3 GB instead
    of 1.6 GB for Llama-3.1-8B's down_proj): damped Cholesky factor (into
    H's buffer), its triangular inverse, the flipped upper factor. LAPACK works
    column-major, so the first two hand over column-major arrays — no
    transposing copies in between. The same operations either way.
    """
    if _single_cpu_device(h_II):
        fns = _factor_steps(h_II.sharding)
        lower_II, dead_I = fns[0](h_II, percdamp)
        inverse_II = fns[1](lower_II)
        del lower_II
        return fns[2](inverse_II, blocksize), dead_I
    fn = _factor_donated if h_II.shape[0] % blocksize == 0 else _factor_copied
    return fn(h_II, percdamp, blocksize)


def _damp(h_II: jax.Array, percdamp: float):
    """(H with dead inputs' diagonal 1 and percdamp · mean(diag) added; dead inputs)."""
    I = h_II.shape[0]
    dead_I = jnp.diag(h_II) == 0
    h_II = h_II + jnp.diag(dead_I.astype(h_II.dtype))
    return h_II + percdamp * jnp.mean(jnp.diag(h_II)) * jnp.eye(I, dtype=h_II.dtype), dead_I


def _pad(upper_II: jax.Array, blocksize: int):
    I = upper_II.shape[0]
    P = math.ceil(I / blocksize) * blocksize
    if P == I:
        return upper_II
    return jnp.eye(P, dtype=upper_II.dtype).at[:I, :I].set(upper_II)


def _factor(h_II: jax.Array, percdamp: float, blocksize: int):
    h_II, dead_I = _damp(h_II, percdamp)
    return _pad(_upper_cholesky_of_inverse(h_II), blocksize), dead_I


_factor_donated = jax.jit(_factor, static_argnums=(1, 2), donate_argnums=0)
_factor_copied = jax.jit(_factor, static_argnums=(1, 2))


def _single_cpu_device(x: jax.Array) -> bool:
    return isinstance(x, jax.Array) and len(x.devices()) == 1 and next(iter(x.devices())).platform == "cpu"


@functools.lru_cache(maxsize=8)
def _factor_steps(sharding):
    """`_factor` split in three jitted steps whose ``[I, I]`` hand-overs are column-major (LAPACK's layout)."""
    from jax.experimental.layout import Format, Layout
    column_major = Format(Layout(major_to_minor=(1, 0)), sharding)

    def lower(h_II, percdamp):  # of the reversed damped H: see `_upper_cholesky_of_inverse`
        h_II, dead_I = _damp(h_II, percdamp)
        return jnp.linalg.cholesky(h_II[::-1, ::-1]), dead_I

    def inverse(lower_II):
        return jax.scipy.linalg.solve_triangular(lower_II, jnp.eye(lower_II.shape[0], dtype=lower_II.dtype),
                                                 lower=True)

    def upper(inverse_II, blocksize):
        return _pad(jnp.triu(inverse_II[::-1, ::-1]), blocksize)

    return (jax.jit(lower, static_argnums=1, donate_argnums=0, out_shardings=(column_major, sharding)),
            jax.jit(inverse, in_shardings=column_major, out_shardings=column_major),
            jax.jit(upper, static_argnums=1, in_shardings=column_major, out_shardings=sharding))


def _upper_cholesky_of_inverse(h_II):
    """U upper triangular with ``UᵀU = H⁻¹``: the reference's cholesky → cholesky_inverse → cholesky(upper).

    Computed as ``P · chol(P H P)⁻¹ · P`` (P reverses the order): with
    ``P H P = L Lᵀ``, ``A = P L⁻¹ P`` is upper triangular with a positive
    diagonal and ``AᵀA = P (L Lᵀ)⁻¹ P = H⁻¹``, so it is that unique factor —
    one Cholesky and one triangular inverse instead of two Choleskys and an inverse.
    """
    I = h_II.shape[0]
    lower_rev = jnp.linalg.cholesky(h_II[::-1, ::-1])
    inv_rev = jax.scipy.linalg.solve_triangular(lower_rev, jnp.eye(I, dtype=h_II.dtype), lower=True)
    return jnp.triu(inv_rev[::-1, ::-1])


# -------------------------------------------------------------- fasterprune
@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def fasterprune(w_IO: jax.Array, hinv_PP: jax.Array, dead_I: jax.Array, ratio: float,
                n_m: tuple[int, int] | None, blocksize: int):
    """(updated kernel, keep-mask, Σ OBS losses) of one kernel ``[in, out]`` given its Hinv factor."""
    I, O = w_IO.shape
    P, B = hinv_PP.shape[0], blocksize
    nb = P // B
    w_PO = jnp.zeros((P, O), jnp.float32).at[:I].set(jnp.where(dead_I[:, None], 0.0, w_IO.astype(jnp.float32)))
    # int(numel * ratio) of the reference: full blocks, and the (maybe narrower) last one
    k_full, k_last = int(B * O * ratio), int((I - (nb - 1) * B) * O * ratio)

    def block(b, carry):
        w_PO, prune_PO, loss = carry
        i1 = b * B
        w1_BO = lax.dynamic_slice(w_PO, (i1, 0), (B, O))
        hinv1_BB = lax.dynamic_slice(hinv_PP, (i1, i1), (B, B))
        d1_B = jnp.diag(hinv1_BB)
        if n_m is None:
            prune1 = _block_threshold(w1_BO, d1_B, i1 + jnp.arange(B) < I, jnp.where(b == nb - 1, k_last, k_full))
        else:
            prune1 = jnp.zeros((B, O), bool)
        q1_BO, prune1, err1_BO, block_loss = _prune_columns(w1_BO, hinv1_BB, prune1, n_m)
        w_PO = lax.dynamic_update_slice(w_PO, q1_BO, (i1, 0))
        prune_PO = lax.dynamic_update_slice(prune_PO, prune1, (i1, 0))
        w_PO = _lazy_update(w_PO, hinv_PP, err1_BO, b, nb, B)
        return w_PO, prune_PO, loss + block_loss

    init = (w_PO, jnp.zeros((P, O), bool), jnp.zeros((), jnp.float32))
    w_PO, prune_PO, loss = lax.fori_loop(0, nb, block, init)
    return w_PO[:I].astype(w_IO.dtype), ~prune_PO[:I], loss


def _block_threshold(w1_BO, d1_B, real_B, k):
    """Unstructured: prune every ``W1² / d²`` <= the k-th smallest of the block (padded rows never)."""
    tmp = jnp.square(w1_BO) / jnp.square(d1_B)[:, None]
    tmp = jnp.where(real_B[:, None], tmp, jnp.inf)
    return ~nm_lib.prune_at_or_below_kth(tmp, k)


def _prune_columns(w1_BO, hinv1_BB, prune1_BO, n_m):
    """The reference's inner loop over one block's inputs: choose (N:M), quantize to 0, propagate."""
    B, O = w1_BO.shape
    d1_B = jnp.diag(hinv1_BB)

    def column(i, carry):
        w1, prune1, err1, loss = carry
        if n_m is not None:
            prune1 = lax.cond(i % n_m[1] == 0, lambda p: _nm_group(p, w1, d1_B, i, n_m), lambda p: p, prune1)
        w_O = w1[i]
        d = hinv1_BB[i, i]
        q_O = jnp.where(prune1[i], 0.0, w_O)
        err_O = (w_O - q_O) / d
        w1 = w1 - jnp.outer(hinv1_BB[i], err_O)  # hinv1 is upper triangular: rows < i untouched
        w1 = w1.at[i].set(q_O)
        err1 = err1.at[i].set(err_O)
        return w1, prune1, err1, loss + jnp.sum(jnp.square(w_O - q_O)) / d ** 2 / 2

    init = (w1_BO, prune1_BO, jnp.zeros((B, O), jnp.float32), jnp.zeros((), jnp.float32))
    return lax.fori_loop(0, B, column, init)


def _nm_group(prune1_BO, w1_BO, d1_B, i, n_m):
    n, m = n_m
    O = w1_BO.shape[1]
    d_M = lax.dynamic_slice(d1_B, (i,), (m,))
    tmp_MO = jnp.square(lax.dynamic_slice(w1_BO, (i, 0), (m, O))) / jnp.square(d_M)[:, None]
    return lax.dynamic_update_slice(prune1_BO, ~nm_lib.prune_n_of_m(tmp_MO, n, m), (i, 0))


def _lazy_update(w_PO, hinv_PP, err1_BO, b, nb, B):
    """``W[i2:] −= Hinv[i1:i2, i2:]ᵀ @ Err1``, one later block at a time (exact triangular work)."""
    O = w_PO.shape[1]

    def later(j, w_PO):
        h_BB = lax.dynamic_slice(hinv_PP, (b * B, j * B), (B, B))
        w_BO = lax.dynamic_slice(w_PO, (j * B, 0), (B, O))
        return lax.dynamic_update_slice(w_PO, w_BO - jnp.matmul(h_BB.T, err1_BO, precision=HIGHEST), (j * B, 0))

    return lax.fori_loop(b + 1, nb, later, w_PO)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _fasterprune_layer(stack, i, hinv_PP, dead_I, ratio, n_m, blocksize):
    """`fasterprune` of layer i's kernel, read from its stack in place."""
    return fasterprune(take(stack, i), hinv_PP, dead_I, ratio, n_m, blocksize)


# ------------------------------------------------------------------ pruner
class SparseGPTPruner:
    # down_proj's Hessian (F² fp32: 784 MB at Llama-3.1-8B) first and alone, then the other sites' (3 x D²)
    reference_groups = (("down",), ("q", "k", "v", "o", "gate", "up"))

    def __init__(self, ratio: float, n_m: tuple[int, int] | None, blocksize: int, percdamp: float):
        self.ratio, self.n_m, self.blocksize, self.percdamp = ratio, n_m, blocksize, percdamp
        self.accumulator = Hessians()

    def prune_layer(self, layers, i, stats, linears: Sequence[str]):
        """Consumes `stats`: each Hessian is freed once factored, each factor after its last linear."""
        users = collections.Counter(SITE_OF[name] for name in linears)
        factors, kernels, masks, rows = {}, {}, {}, {}
        for name in linears:
            site = SITE_OF[name]
            if site not in factors:
                factors[site] = self._factor(stats.pop(site), site)
            w, keep, loss = _fasterprune_layer(get_linear(layers, name), i, *factors[site], self.ratio,
                                               self.n_m, self.blocksize)
            kernels[name], masks[name] = w, keep
            rows[name] = {"obs_loss": float(loss), "dead_inputs": int(jnp.sum(factors[site][1]))}
            users[site] -= 1
            if not users[site]:
                del factors[site]
        return kernels, masks, rows

    def _factor(self, h_II, site):
        hinv, dead = inverse_hessian_factor(h_II, self.percdamp, self.blocksize)
        if not bool(jnp.all(jnp.isfinite(hinv))):
            raise MaxpruneError(f"the Hessian of {site} is not positive definite after damping "
                                f"(prune.sparsegpt.percdamp={self.percdamp}); raise percdamp or use more "
                                f"calibration tokens")
        return hinv, dead


def check(arch, cfg) -> None:
    """Settings and shapes, before calibration is loaded."""
    s = cfg.sparsegpt
    at_least("prune.sparsegpt.blocksize", s.blocksize, 1)
    at_least("prune.sparsegpt.percdamp", s.percdamp, 0)
    n_m = nm_lib.check_fits(arch, cfg.pattern)
    if n_m is not None and s.blocksize % n_m[1]:
        raise MaxpruneError(f"prune.sparsegpt.blocksize={s.blocksize} must be a multiple of M={n_m[1]} "
                            f"for prune.pattern={cfg.pattern!r}")


@register("sparsegpt")
def prune(params, arch, calibration_NL, cfg):
    check(arch, cfg)
    s = cfg.sparsegpt
    pruner = SparseGPTPruner(cfg.ratio, nm_lib.check_fits(arch, cfg.pattern), s.blocksize, s.percdamp)
    return report.prune_and_summarize("sparsegpt", pruner, params, arch, calibration_NL, cfg)
