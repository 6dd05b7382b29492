"""Llama building blocks: masked dense, RMSNorm, RoPE, GQA attention, SwiGLU.

Kernels are stored ``[in, out]`` in fp32 and cast to the compute dtype at use.
A kernel may have a boolean mask in the ``masks`` collection under the same
path as its parameter; the forward pass multiplies the kernel by it, so a
masked model computes exactly what the same model with those weights zeroed
computes.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxprune import sharding
from maxprune.model.arch import Arch, RopeScaling

Dtype = jnp.dtype

# Llama-style init (HF `initializer_range`): truncated normal, std 0.02.
KERNEL_INIT = nn.initializers.truncated_normal(stddev=0.02)


constrain = sharding.constrain  # logical-axis constraint on an activation


@jax.custom_vjp
def matmul_f32acc(x_ND: jax.Array, w_DF: jax.Array) -> jax.Array:
    """``x @ w`` on 2-D operands of the compute dtype, accumulated and returned in fp32.

    Forward and both backward matmuls take compute-dtype operands and accumulate
    in fp32 (autodiff alone would run the backward on the fp32 cotangent, i.e.
    in fp32). Flat 2-D operands matter on XLA:CPU: the backward of a
    [B, L, in] x [in, out] contraction runs ~1.4x slower than the flattened
    one's, and bf16 x bf16 -> fp32 uses the AVX512-BF16 kernels (~2x fp32)
    where bf16 -> bf16 does not. Accelerators accumulate in fp32 anyway.
    """
    return jnp.dot(x_ND, w_DF, preferred_element_type=jnp.float32)


def _matmul_fwd(x_ND, w_DF):
    return matmul_f32acc(x_ND, w_DF), (x_ND, w_DF)


def _matmul_bwd(res, g_NF):
    x_ND, w_DF = res
    g_NF = g_NF.astype(x_ND.dtype)
    dx_ND = jnp.dot(g_NF, _transposed(w_DF), preferred_element_type=jnp.float32).astype(x_ND.dtype)
    dw_DF = jnp.dot(_transposed(x_ND), g_NF, preferred_element_type=jnp.float32).astype(w_DF.dtype)
    return dx_ND, dw_DF


def _transposed(a_XY: jax.Array) -> jax.Array:
    """``a.T`` for a matmul operand. On CPU, a 16-bit one is transposed in memory: XLA:CPU
    otherwise folds the transpose into the dot, and its bf16 kernels are fast (~2x fp32)
    only on untransposed row-major operands (a folded one ran at ~0.3x). Elsewhere, and
    in fp32, the folded transpose is free."""
    if a_XY.dtype == jnp.float32:
        return a_XY.T
    def in_memory(a):  # the barrier keeps XLA from making the reshape a layout change
        return jax.lax.optimization_barrier(a.T.reshape(-1)).reshape(a.shape[::-1])
    return jax.lax.platform_dependent(a_XY, cpu=in_memory, default=lambda a: a.T)


matmul_f32acc.defvjp(_matmul_fwd, _matmul_bwd)


class MaskedDense(nn.Module):
    """``y = x @ (W ⊙ M) (+ b)`` with W ``[in, out]`` and an optional bool mask M."""

    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None  # e.g. fp32 logits from bf16 inputs
    matmul_dtype: Dtype | None = None  # the operands' dtype (default: dtype), e.g. bf16 under fp32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Pruners read every linear's input from the "intermediates" collection;
        # sow is a no-op unless that collection is mutable.
        self.sow("intermediates", "input", x)
        kernel = self.param("kernel", KERNEL_INIT, (x.shape[-1], self.features), self.param_dtype)
        if self.has_variable("masks", "kernel"):
            mask = self.get_variable("masks", "kernel")
            kernel = jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
        operand = self.matmul_dtype or self.dtype
        x_ND = x.reshape(-1, x.shape[-1]).astype(operand)
        y = matmul_f32acc(x_ND, kernel.astype(operand))
        y = y.astype(self.out_dtype or self.dtype).reshape(*x.shape[:-1], self.features)
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """HF Llama RMSNorm: normalise in fp32, cast back, then scale."""

    eps: float = 1e-5
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = (scale.astype(jnp.float32) * x32.astype(x.dtype).astype(jnp.float32)).astype(self.dtype)
        self.sow("intermediates", "output", y)  # Minitron-width's hidden-channel statistic
        return y


# ---------------------------------------------------------------------- RoPE
def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies, with Llama-3.1 scaling when `scaling` is given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions_BL: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[B, L, head_dim]`` in the HF (rotate-half) layout, fp32."""
    angles = positions_BL.astype(jnp.float32)[..., None] * inv_freq  # [B, L, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BLNH: jax.Array, cos_BLH: jax.Array, sin_BLH: jax.Array) -> jax.Array:
    half = x_BLNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BLNH[..., half:], x_BLNH[..., :half]], axis=-1)
    cos, sin = cos_BLH[:, :, None, :], sin_BLH[:, :, None, :]
    return (x_BLNH.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x_BLNH.dtype)


# ----------------------------------------------------------------- attention
MIN_BLOCK, MAX_BLOCKS = 64, 16  # the einsum path's block-causal loop: rows per block, blocks


def attention_impl(requested: str, dtype, head_dim: int, backend: str | None = None,
                   capability: float | None = None) -> str:
    """The attention kernel to run: `requested`, or for "auto" the fastest that applies here —
    cuDNN's fused flash attention on NVIDIA GPUs of compute capability >= 8.0 in bf16/fp16
    with head_dim <= 128 (a multiple of 8), XLA's fused attention on other accelerators,
    and on CPU the block-causal einsum (measured fastest there)."""
    if requested != "auto":
        return requested
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "einsum"
    if backend in ("gpu", "cuda"):
        if capability is None:
            capability = float(getattr(jax.devices()[0], "compute_capability", 0) or 0)
        if (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and capability >= 8.0
                and head_dim <= 128 and head_dim % 8 == 0):
            return "cudnn"
    return "xla"


def gqa_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, impl: str,
                  visible_BTS: jax.Array | None = None) -> jax.Array:
    """Causal grouped-query attention without repeating K/V; fp32 softmax.

    `visible_BTS` (bool, queries and keys the same sequence) further limits
    which keys each query sees, e.g. to its own sequence when several are
    packed into one row (see `packed_visibility`).

    The einsum path is block-causal when queries and keys are the same
    sequence: each block of queries (64 rows, or T/16 for long sequences, so
    the unrolled loop stays short) attends only to the keys up to its last row.
    That skips ~45 % of the score work at 512 tokens and keeps each block's
    scores in cache: 1.9x faster forward and backward on CPU at 512 tokens.
    """
    B, T, N, H = q_BTNH.shape
    K, S = k_BSKH.shape[2], k_BSKH.shape[1]
    if visible_BTS is not None and T != S:
        raise ValueError(f"a visibility mask needs queries and keys of one sequence; got {T} and {S}")
    if impl in ("xla", "cudnn"):
        if visible_BTS is None:
            return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True, implementation=impl)
        # cuDNN's fused kernel takes no arbitrary mask; packed scoring is rare enough for XLA's.
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=visible_BTS[:, None], is_causal=True,
                                            implementation="xla")
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    block = max(MIN_BLOCK, -(-T // MAX_BLOCKS))
    if T != S or T <= block:
        return _attend(q_BTKGH, k_BSKH, v_BSKH, 0, visible_BTS).reshape(B, T, N, H)
    blocks = [_attend(q_BTKGH[:, start:start + block], k_BSKH[:, :start + block], v_BSKH[:, :start + block],
                      start, None if visible_BTS is None else visible_BTS[:, start:start + block, :start + block])
              for start in range(0, T, block)]
    return jnp.concatenate(blocks, axis=1).reshape(B, T, N, H)


def packed_visibility(segments_BL: jax.Array, branches_BL: jax.Array | None = None) -> jax.Array:
    """``[B, L, L]``: may query t see key s (before causality)? Only within its segment
    (one packed sequence; id 0 is padding, which sees only padding), and, with
    `branches_BL`, only the segment's shared prefix (branch 0) and its own branch
    (the continuations of one question after its shared context)."""
    visible_BLL = segments_BL[:, :, None] == segments_BL[:, None, :]
    if branches_BL is not None:
        q_BL1, k_B1L = branches_BL[:, :, None], branches_BL[:, None, :]
        visible_BLL &= (k_B1L == 0) | (k_B1L == q_BL1)
    return visible_BLL


def _attend(q_BTKGH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, offset: int,
            visible_BTS: jax.Array | None = None) -> jax.Array:
    """Queries at positions offset.. attending causally to keys 0..S-1 (key s <= query position),
    and, given `visible_BTS`, only to the keys it allows."""
    T, S, H = q_BTKGH.shape[1], k_BSKH.shape[1], q_BTKGH.shape[-1]
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                        preferred_element_type=jnp.float32) / math.sqrt(H)
    visible = jnp.arange(S)[None, :] <= offset + jnp.arange(T)[:, None]  # [T, S]
    if visible_BTS is not None:
        visible = (visible & visible_BTS)[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH, preferred_element_type=jnp.float32)
    return out_BTKGH.astype(v_BSKH.dtype)


class Attention(nn.Module):
    arch: Arch
    impl: str = "auto"
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x_BLD: jax.Array, cos_BLH: jax.Array, sin_BLH: jax.Array,
                 visible_BLL: jax.Array | None = None) -> jax.Array:
        a = self.arch
        dense = lambda n, f, bias=False: MaskedDense(f, bias, self.dtype, self.param_dtype,
                                                     matmul_dtype=self.matmul_dtype, name=n)
        B, L, _ = x_BLD.shape
        q = dense("q", a.q_dim)(x_BLD).reshape(B, L, a.num_heads, a.head_dim)
        k = dense("k", a.kv_dim)(x_BLD).reshape(B, L, a.num_kv_heads, a.head_dim)
        v = dense("v", a.kv_dim)(x_BLD).reshape(B, L, a.num_kv_heads, a.head_dim)
        q = constrain(apply_rope(q, cos_BLH, sin_BLH), ("act_batch", "act_len", "act_heads", None))
        k = constrain(apply_rope(k, cos_BLH, sin_BLH), ("act_batch", "act_len", "act_kv", None))
        v = constrain(v, ("act_batch", "act_len", "act_kv", None))
        impl = attention_impl(self.impl, self.dtype, a.head_dim)
        out = gqa_attention(q, k, v, impl, visible_BLL).reshape(B, L, a.q_dim)
        return dense("o", a.hidden_size, a.out_bias)(out)


class SwiGLU(nn.Module):
    arch: Arch
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    matmul_dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        a = self.arch
        dense = lambda n, f, bias=False: MaskedDense(f, bias, self.dtype, self.param_dtype,
                                                     matmul_dtype=self.matmul_dtype, name=n)
        gate, up = dense("gate", a.ffn_size)(x_BLD), dense("up", a.ffn_size)(x_BLD)
        h_BLF = constrain(nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
        return dense("down", a.hidden_size, a.out_bias)(h_BLF)
