"""Sheared LLaMA's gates: hard-concrete (L0) sampling, expected sizes, the Lagrangian, the gated model.

Pure functions of log α, gates and params (no training loop, no data): the
four mask sets and their shapes (`mask_shapes`, `unit_counts`), sampling and
the deterministic final gates, the expected parameter count and sparsities
the Lagrangian penalises, and `fold_gates` / `gated_logits`, which run the
gated model as the ordinary one on gate-folded weights. See `sheared` for the
method and its constants' provenance.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxprune.model import llama
from maxprune.model.arch import Arch

TEMPERATURE = 2.0 / 3.0
LIMIT_LOW, LIMIT_HIGH = -0.1, 1.1
EPSILON = 1e-6
LOG_ALPHA_INIT, LOG_ALPHA_STD = 5.0, 1e-2
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
SCORE_SHARPNESS = 0.8  # the original's "magical_number" in the deterministic score
MASKS = ("layer", "head", "ffn", "hidden")
Tree = dict[str, Any]


# ============================================================ hard concrete
def mask_shapes(arch: Arch) -> dict[str, tuple[int, ...]]:
    """Gate shapes; the last axis holds the units of one row (a layer's groups / channels)."""
    L = arch.num_layers
    return {"layer": (L,), "head": (L, arch.num_kv_heads), "ffn": (L, arch.ffn_size), "hidden": (arch.hidden_size,)}


def unit_counts(arch: Arch) -> dict[str, int]:
    """Units per row of each mask set — what the target shape fixes."""
    return {"layer": arch.num_layers, "head": arch.num_kv_heads, "ffn": arch.ffn_size, "hidden": arch.hidden_size}


def init_log_alpha(arch: Arch, rng: jax.Array) -> Tree:
    """N(5, 0.01) per gate, clamped as the original clamps before its first use: gates start open."""
    keys = dict(zip(MASKS, jax.random.split(rng, len(MASKS))))
    return clamp_log_alpha({name: LOG_ALPHA_INIT + LOG_ALPHA_STD * jax.random.normal(keys[name], shape)
                            for name, shape in mask_shapes(arch).items()})


def clamp_log_alpha(log_alpha: Tree) -> Tree:
    return jax.tree.map(lambda a: jnp.clip(a, LOG_ALPHA_MIN, LOG_ALPHA_MAX), log_alpha)


def gate_noise(arch: Arch, rng: jax.Array) -> Tree:
    """``u ~ U(ε, 1−ε)`` for every gate: one draw per step, shared by the batch."""
    keys = dict(zip(MASKS, jax.random.split(rng, len(MASKS))))
    return {name: jax.random.uniform(keys[name], shape, minval=EPSILON, maxval=1 - EPSILON)
            for name, shape in mask_shapes(arch).items()}


def sample_gates(log_alpha: Tree, noise: Tree) -> Tree:
    """Hard-concrete samples z in [0, 1], differentiable in log α (exact 0 and 1 occur)."""
    def one(log_a, u):
        s = jax.nn.sigmoid((jnp.log(u) - jnp.log(1 - u) + log_a) / TEMPERATURE)
        return jnp.clip(s * (LIMIT_HIGH - LIMIT_LOW) + LIMIT_LOW, 0.0, 1.0)
    return jax.tree.map(one, log_alpha, noise)


def keep_probability(log_alpha: Tree) -> Tree:
    """``P(z > 0) = 1 − CDF(0)`` of the stretched concrete distribution (the original's expected score)."""
    xn = -LIMIT_LOW / (LIMIT_HIGH - LIMIT_LOW)
    logit0 = math.log(xn) - math.log(1 - xn)
    return jax.tree.map(lambda a: 1 - jnp.clip(jax.nn.sigmoid(logit0 * TEMPERATURE - a), EPSILON, 1 - EPSILON),
                        log_alpha)


def deterministic_gates(log_alpha: Tree, arch: Arch, target: Arch) -> tuple[Tree, dict[str, np.ndarray]]:
    """The final gates: score ``σ(log α / T · 0.8)``, zero the ``size − target`` lowest per row.

    Returns the gate values (kept units keep their soft score, to be folded)
    and the kept indices per row in ascending order (``[rows, kept]``).
    """
    kept_counts = unit_counts(target)
    gates, keep = {}, {}
    for name, log_a in jax.device_get(log_alpha).items():
        log_a = np.clip(np.asarray(log_a, np.float32), LOG_ALPHA_MIN, LOG_ALPHA_MAX)
        score = 1 / (1 + np.exp(-log_a / TEMPERATURE * SCORE_SHARPNESS))
        rows = score.reshape(-1, score.shape[-1])
        kept = np.sort(np.argsort(-rows, axis=-1, kind="stable")[:, :kept_counts[name]], axis=-1)
        z = np.zeros_like(rows)
        np.put_along_axis(z, kept, np.take_along_axis(rows, kept, -1), -1)
        gates[name], keep[name] = z.reshape(score.shape), kept
    return gates, keep


# ==================================================================== sizes
def expected_params(probs: Tree, arch: Arch) -> jax.Array:
    """Expected prunable-kernel parameters under keep probabilities (or binary gates), GQA-aware.

    Per hidden channel, a KV group holds ``(2G + 2)·Hd`` weights (q and o of its
    G query heads, k and v of its own) and an FFN channel 3 (gate, up, down);
    a layer's width counts only if the layer stays — the original's
    ``get_expected_num_params`` with heads replaced by groups.
    """
    per_group = (2 * arch.group_size + 2) * arch.head_dim
    width_L = per_group * jnp.sum(probs["head"], -1) + 3 * jnp.sum(probs["ffn"], -1)
    return jnp.sum(probs["layer"] * width_L) * jnp.sum(probs["hidden"])


def expected_sparsity(probs: Tree) -> Tree:
    """Per mask set and row: ``1 − Σ P(z > 0) / units`` (scalars for layer and hidden, ``[L]`` otherwise)."""
    return jax.tree.map(lambda p: 1 - jnp.mean(p, -1), probs)


def target_sparsity(parent: Arch, target: Arch) -> dict[str, float]:
    base, kept = unit_counts(parent), unit_counts(target)
    return {name: 1.0 - kept[name] / base[name] for name in MASKS}


def lagrangian(probs: Tree, lambdas: Tree, targets: dict[str, float], step, warmup: int) -> tuple[jax.Array, Tree]:
    """``Σ_c mean_rows(λ1 (ŝ − t) + λ2 (ŝ − t)²)`` with t ramped linearly from 0 over `warmup` steps."""
    ramp = jnp.minimum(1.0, step / warmup) if warmup > 0 else 1.0
    sparsity = expected_sparsity(probs)
    loss, stats = 0.0, {}
    for name in MASKS:
        t = targets[name] * ramp
        gap = sparsity[name] - t
        lam1, lam2 = lambdas[name][0], lambdas[name][1]
        loss = loss + jnp.mean(lam1 * gap + lam2 * gap ** 2)
        stats[name] = {"expected": jnp.mean(sparsity[name]), "target": t, "lambda1": lam1, "lambda2": lam2}
    return loss, stats


# ============================================================= gated model
def fold_gates(params: Tree, gates: Tree, arch: Arch, stream_scale=1.0) -> Tree:
    """Params whose ordinary forward is the gated model's (see the module doc).

    `stream_scale` c scales the residual stream so the norms' mean over D is
    the mean over kept channels; 1 once the gated-off channels are cut away.
    """
    hidden_D, c = gates["hidden"], stream_scale
    out_LD = gates["layer"][:, None] * hidden_D[None, :] * c      # both branch outputs of every layer
    head_LQ = jnp.repeat(gates["head"], arch.head_dim, axis=1)      # a group's gate on its v channels
    final = (1.0 / (c * c)) if arch.tie_embeddings else hidden_D / c  # a tied lm_head carries the gate
    factors = {
        "embed/embedding": hidden_D * c,
        "layers/attn_norm/scale": hidden_D / c,
        "layers/mlp_norm/scale": hidden_D / c,
        "layers/attn/v/kernel": head_LQ[:, None, :],
        "layers/attn/o/kernel": out_LD[:, None, :],
        "layers/attn/o/bias": out_LD,
        "layers/mlp/up/kernel": gates["ffn"][:, None, :],
        "layers/mlp/down/kernel": out_LD[:, None, :],
        "layers/mlp/down/bias": out_LD,
        "final_norm/scale": final,
    }
    return _map_paths(params, lambda path, x: x * jnp.asarray(factors[path], x.dtype) if path in factors else x)


def gated_logits(params: Tree, gates: Tree, tokens_BL, arch: Arch,
                 options: llama.ModelOptions = llama.ModelOptions()) -> jax.Array:
    """Logits ``[B, L, V]`` of the parent under gates z (sampled, deterministic or any values in [0, 1])."""
    kept = jax.lax.stop_gradient(jnp.sum(gates["hidden"] != 0))
    scale = jnp.sqrt(arch.hidden_size / jnp.maximum(kept, 1).astype(jnp.float32))
    return llama.forward(fold_gates(params, gates, arch, scale), tokens_BL, arch, None, options)


def _map_paths(tree: Tree, fn, prefix: str = "") -> Tree:
    return {k: _map_paths(v, fn, f"{prefix}{k}/") if isinstance(v, dict) else fn(f"{prefix}{k}", v)
            for k, v in tree.items()}
