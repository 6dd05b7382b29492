"""The Llama-3.1 decoder, scanned over layers, with optional pruning masks.

Params (fp32, plain nested dict, layer-stacked: axis 0 of everything under
``layers`` is the layer index)::

    embed/embedding          [V, D]
    layers/attn_norm/scale   [L, D]
    layers/attn/q/kernel     [L, D, N*Hd]     query head n uses KV head n // (N/K)
    layers/attn/k/kernel     [L, D, K*Hd]
    layers/attn/v/kernel     [L, D, K*Hd]
    layers/attn/o/kernel     [L, N*Hd, D]     (+ layers/attn/o/bias [L, D] if arch.out_bias)
    layers/mlp_norm/scale    [L, D]
    layers/mlp/gate/kernel   [L, D, F]
    layers/mlp/up/kernel     [L, D, F]
    layers/mlp/down/kernel   [L, F, D]        (+ layers/mlp/down/bias [L, D] if arch.out_bias)
    final_norm/scale         [D]
    lm_head/kernel           [D, V]           absent if arch.tie_embeddings

Masks mirror the ``layers/attn/{q,k,v,o}/kernel`` and
``layers/mlp/{gate,up,down}/kernel`` entries with bool arrays; a missing entry
means dense (see `maxprune.model.masks`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxprune.config import at_least, choice
from maxprune.model import layers
from maxprune.model.arch import Arch

Params = dict[str, Any]

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How to run the model (not what it is): compute dtype, remat, attention kernel.

    `dtype` is the activations' dtype; `matmul_dtype` ("same": `dtype`) that of
    the linears' operands, which always accumulate in fp32. On CPU,
    ``dtype="float32", matmul_dtype="bfloat16"`` is the fastest mixed precision:
    bf16 GEMMs, while elementwise work stays in fp32, which XLA:CPU runs faster
    than bf16 (a train step ~1.3x fp32's, vs ~1.2x for all-bf16).
    """

    dtype: str = "bfloat16"
    remat: str = "none"
    attention: str = "auto"  # see layers.attention_impl
    scan_unroll: int = 1
    matmul_dtype: str = "same"

    def __post_init__(self):
        for key, valid in (("dtype", DTYPES), ("remat", REMAT_POLICIES), ("attention", ATTENTION_IMPLS),
                           ("matmul_dtype", ("same", *DTYPES))):
            value = getattr(self, key)
            choice(f"model.{key}", value, valid)
        at_least("model.scan_unroll", self.scan_unroll, 1)

    @classmethod
    def from_config(cls, model_cfg) -> "ModelOptions":
        return cls(dtype=model_cfg.dtype, remat=model_cfg.remat, attention=model_cfg.attention,
                   scan_unroll=model_cfg.scan_unroll, matmul_dtype=model_cfg.get("matmul_dtype", "same"))

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def operand_dtype(self):
        """The linears' operand dtype."""
        return self.compute_dtype if self.matmul_dtype == "same" else DTYPES[self.matmul_dtype]


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    Scan-shaped: ``(x, (cos, sin, visible)) -> (x, None)`` so `nn.scan` can
    stack it directly and its params sit right under ``layers/``. `visible` is
    None, or the ``[B, L, L]`` key visibility of packed rows (see `forward`).
    """

    arch: Arch
    options: ModelOptions = ModelOptions()

    @nn.compact
    def __call__(self, x_BLD, context):
        cos_BLH, sin_BLH, visible_BLL = context
        a, dt, mm = self.arch, self.options.compute_dtype, self.options.operand_dtype
        h = layers.RMSNorm(a.norm_eps, dt, name="attn_norm")(x_BLD)
        attn = layers.Attention(a, self.options.attention, dt, matmul_dtype=mm, name="attn")
        x_BLD = x_BLD + attn(h, cos_BLH, sin_BLH, visible_BLL)
        h = layers.RMSNorm(a.norm_eps, dt, name="mlp_norm")(x_BLD)
        x_BLD = x_BLD + layers.SwiGLU(a, dt, matmul_dtype=mm, name="mlp")(h)
        return layers.constrain(x_BLD, ("act_batch", "act_len", "act_embed")), None


class Llama(nn.Module):
    arch: Arch
    options: ModelOptions = ModelOptions()

    def setup(self):
        a, dt = self.arch, self.options.compute_dtype
        self.embed = nn.Embed(a.vocab_size, a.hidden_size, embedding_init=layers.KERNEL_INIT,
                              dtype=dt, name="embed")
        body = DecoderLayer
        if self.options.remat != "none":
            body = nn.remat(body, policy=REMAT_POLICIES[self.options.remat], prevent_cse=False)
        self.layers = nn.scan(
            body, variable_axes={"params": 0, "masks": 0}, split_rngs={"params": True},
            in_axes=(nn.broadcast,), length=a.num_layers, unroll=self.options.scan_unroll,
        )(a, self.options, name="layers")
        self.final_norm = layers.RMSNorm(a.norm_eps, dt, name="final_norm")
        if not a.tie_embeddings:
            self.lm_head = layers.MaskedDense(a.vocab_size, dtype=dt, out_dtype=jnp.float32,
                                              matmul_dtype=self.options.operand_dtype, name="lm_head")

    def hidden_states(self, tokens_BL, positions_BL=None, segments_BL=None, branches_BL=None):
        """Final-norm hidden states ``[B, L, D]`` (before the lm_head)."""
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)
        a = self.arch
        inv_freq = layers.rope_inv_freq(a.head_dim, a.rope_theta, a.rope_scaling)
        cos, sin = layers.rope_cos_sin(positions_BL, inv_freq)
        x_BLD = layers.constrain(self.embed(tokens_BL), ("act_batch", "act_len", "act_embed"))
        visible_BLL = None if segments_BL is None else layers.packed_visibility(segments_BL, branches_BL)
        x_BLD, _ = self.layers(x_BLD, (cos, sin, visible_BLL))
        return self.final_norm(x_BLD)

    def __call__(self, tokens_BL, positions_BL=None, keep_BT=None, segments_BL=None, branches_BL=None):
        """Logits ``[B, L, V]`` in fp32; only at positions `keep_BT` ``[B, T]`` when given."""
        h_BLD = self.hidden_states(tokens_BL, positions_BL, segments_BL, branches_BL)
        if keep_BT is not None:  # e.g. scoring a continuation: no head work on the context
            h_BLD = jnp.take_along_axis(h_BLD, keep_BT[..., None], axis=1)
        if self.arch.tie_embeddings:
            operand = self.options.operand_dtype
            logits = jnp.einsum("bld,vd->blv", h_BLD.astype(operand), self.embed.embedding.astype(operand),
                                preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(h_BLD)
        return layers.constrain(logits, ("act_batch", "act_len", "act_vocab"))


# --------------------------------------------------------------- functional API
def init_params(arch: Arch, rng: jax.Array) -> Params:
    """Random Llama-style init (truncated normal 0.02 kernels/embedding, unit norms, zero biases)."""
    model = Llama(arch, ModelOptions(dtype="float32"))
    tokens = jnp.zeros((1, 1), jnp.int32)
    return _unfreeze(jax.jit(model.init)(rng, tokens)["params"])


def abstract_params(arch: Arch) -> Params:
    """`ShapeDtypeStruct` tree of the params, without allocating them."""
    return jax.eval_shape(lambda: init_params(arch, jax.random.key(0)))


def forward(params: Params, tokens_BL: jax.Array, arch: Arch, masks: Params | None = None,
            options: ModelOptions = ModelOptions(), positions_BL: jax.Array | None = None,
            keep_BT: jax.Array | None = None, segments_BL: jax.Array | None = None,
            branches_BL: jax.Array | None = None) -> jax.Array:
    """Logits ``[B, L, V]`` (fp32) of `tokens_BL` under `params` (and `masks`); with `keep_BT`
    ``[B, T]`` (positions per row), only the logits ``[B, T, V]`` at those positions.

    Packed rows: `segments_BL` gives each token a sequence id, attention stays
    within a sequence, and `positions_BL` (restarting at 0 per sequence) places
    RoPE, so each packed sequence gets the logits it would get alone.
    `branches_BL` packs a tree: branch 0 of a segment is a shared prefix, and
    each branch 1, 2, ... (its positions continuing the prefix's) sees the
    prefix and itself, as if it alone followed the prefix.
    """
    variables = {"params": params}
    if masks:
        variables["masks"] = masks
    return Llama(arch, options).apply(variables, tokens_BL, positions_BL, keep_BT, segments_BL, branches_BL)


def apply_layer(layer_params: Params, x_BLD: jax.Array, arch: Arch, positions_BL=None,
                layer_masks: Params | None = None, options: ModelOptions = ModelOptions(),
                capture: bool = False):
    """Run one decoder layer (params sliced at one layer index) — for layer-wise pruning.

    With `capture=True` returns ``(y_BLD, intermediates)`` where intermediates
    holds every linear's input (``attn/q/input``, ..., ``mlp/down/input``) and
    both norms' outputs (``attn_norm/output``, ``mlp_norm/output``), each a
    1-tuple as Flax's `sow` stores them.
    """
    if positions_BL is None:
        positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
    inv_freq = layers.rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling)
    cos, sin = layers.rope_cos_sin(positions_BL, inv_freq)
    variables = {"params": layer_params}
    if layer_masks:
        variables["masks"] = layer_masks
    layer = DecoderLayer(arch, options)
    if capture:
        (y, _), state = layer.apply(variables, x_BLD, (cos, sin, None), mutable=["intermediates"])
        return y, _unfreeze(state["intermediates"])
    return layer.apply(variables, x_BLD, (cos, sin, None))[0]


def next_token_loss(logits_BLV: jax.Array, tokens_BL: jax.Array, weights_BL: jax.Array | None = None):
    """Mean cross-entropy of predicting token t+1 from position t, in fp32."""
    logits = logits_BLV[:, :-1].astype(jnp.float32)
    targets = tokens_BL[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = logz - picked
    w = jnp.ones_like(nll) if weights_BL is None else weights_BL[:, 1:].astype(jnp.float32)
    return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)


def _unfreeze(tree):
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {k: _unfreeze(v) for k, v in tree.items()}
    return tree
