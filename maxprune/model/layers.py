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


class MaskedDense(nn.Module):
    """``y = x @ (W ⊙ M) (+ b)`` with W ``[in, out]`` and an optional bool mask M."""

    features: int
    use_bias: bool = False
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None  # e.g. fp32 logits from bf16 inputs

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # Pruners read every linear's input from the "intermediates" collection;
        # sow is a no-op unless that collection is mutable.
        self.sow("intermediates", "input", x)
        kernel = self.param("kernel", KERNEL_INIT, (x.shape[-1], self.features), self.param_dtype)
        if self.has_variable("masks", "kernel"):
            mask = self.get_variable("masks", "kernel")
            kernel = jnp.where(mask, kernel, jnp.zeros((), kernel.dtype))
        y = jnp.einsum("...i,io->...o", x.astype(self.dtype), kernel.astype(self.dtype),
                       preferred_element_type=self.out_dtype)
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
def gqa_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, impl: str) -> jax.Array:
    """Causal grouped-query attention without repeating K/V; fp32 softmax."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, is_causal=True,
                                            implementation=impl)
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                        preferred_element_type=jnp.float32) / math.sqrt(H)
    causal_TS = jnp.tril(jnp.ones((T, k_BSKH.shape[1]), dtype=bool))
    scores = jnp.where(causal_TS, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs, v_BSKH)
    return out_BTKGH.reshape(B, T, N, H)


class Attention(nn.Module):
    arch: Arch
    impl: str = "einsum"
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array, cos_BLH: jax.Array, sin_BLH: jax.Array) -> jax.Array:
        a = self.arch
        dense = lambda n, f, bias=False: MaskedDense(f, bias, self.dtype, self.param_dtype, name=n)
        B, L, _ = x_BLD.shape
        q = dense("q", a.q_dim)(x_BLD).reshape(B, L, a.num_heads, a.head_dim)
        k = dense("k", a.kv_dim)(x_BLD).reshape(B, L, a.num_kv_heads, a.head_dim)
        v = dense("v", a.kv_dim)(x_BLD).reshape(B, L, a.num_kv_heads, a.head_dim)
        q = constrain(apply_rope(q, cos_BLH, sin_BLH), ("act_batch", "act_len", "act_heads", None))
        k = constrain(apply_rope(k, cos_BLH, sin_BLH), ("act_batch", "act_len", "act_kv", None))
        v = constrain(v, ("act_batch", "act_len", "act_kv", None))
        out = gqa_attention(q, k, v, self.impl).reshape(B, L, a.q_dim)
        return dense("o", a.hidden_size, a.out_bias)(out)


class SwiGLU(nn.Module):
    arch: Arch
    dtype: Dtype = jnp.bfloat16
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        a = self.arch
        gate = MaskedDense(a.ffn_size, False, self.dtype, self.param_dtype, name="gate")(x_BLD)
        up = MaskedDense(a.ffn_size, False, self.dtype, self.param_dtype, name="up")(x_BLD)
        h_BLF = constrain(nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
        return MaskedDense(a.hidden_size, a.out_bias, self.dtype, self.param_dtype, name="down")(h_BLF)
