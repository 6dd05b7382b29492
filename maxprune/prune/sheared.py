"""Sheared LLaMA (Xia et al. 2024): learn structured pruning masks under a Lagrangian size constraint.

Reference: princeton-nlp/LLM-Shearing (``l0_module.py``, ``composer_llama.py``,
``train.py``) as METHODS.md reads it, with its constants:

- **Gates** are hard-concrete (L0) variables, one per unit of four mask sets:
  ``layer [L]``, ``head [L, K]``, ``ffn [L, F]``, ``hidden [D]``. Temperature
  2/3, stretch limits −0.1 / 1.1, ε 1e-6; log α starts at N(5, 0.01) and is
  clamped to [ln 1e-2, ln 1e2] before every use (so it effectively starts at
  ln 100). One sample per step, shared by the whole batch (all microbatches):
  ``u ~ U(ε, 1−ε)``, ``s = σ((ln u − ln(1−u) + log α)/T)``,
  ``z = clamp(1.2 s − 0.1, 0, 1)``; ``P(z > 0) = 1 − σ(T ln(xn/(1−xn)) − log α)``
  with ``xn = 0.1/1.2`` (clamped to [ε, 1−ε], as the original does).
- **GQA granularity: whole KV groups.** The original gates MHA heads; a head
  gate here multiplies the attention output of one KV group (its G query
  heads), which is the same as scaling that group's v projection. Why: the
  paper's GQA shapes are whole groups (Table 5–7 candidates in steps of 4
  heads = 1 of 8 groups; FLAP's 20 heads = 5 of 8), the cut model stays a
  valid GQA model with no per-group head-count constraint, and a group's
  q, k, v and o weights leave together.
- **Gated model** (the original's semantics): ``hidden`` gates the embedding
  output, every norm output and both branch outputs; ``layer`` gates both
  branch outputs of its layer; ``head`` gates a KV group's attention output;
  ``ffn`` gates the up projection's output. RMSNorm statistics run over the
  channels whose hidden gate is non-zero. It is computed by *folding* the
  gates into a copy of the weights and running the ordinary model
  (`gated_logits`): every gate sits on a linear path, so ``W·z`` equals gating
  the activation, and the gradient reaches z through the weights — an
  elementwise pass over the params instead of one over the (much larger at
  4096-token sequences) activations, and one forward to maintain, with remat,
  sharding and attention kernels included. The kept-channel RMS statistic is
  folded too: the residual stream is exactly zero on gated-off channels, so
  scaling the whole stream by ``c = sqrt(D / D_kept)`` makes the ordinary
  mean over D equal the mean over the kept channels; norm scales get ``1/c``
  back (the tied lm_head ``1/c²``). Cost: a transient folded copy of the
  (sharded) weights inside the step. Tested against a literal activation-gated
  replay of the original in ``tests/test_sheared.py``.
- **Lagrangian** per mask set c: expected sparsity ``ŝ_c = 1 − Σ P(z>0)/size``
  per row (per layer for head and ffn), target ``t_c = 1 − target/size``
  ramped linearly from 0 over ``lagrangian_warmup`` steps, penalty
  ``mean_rows(λ1 (ŝ−t) + λ2 (ŝ−t)²)``; λ's start at 0. The expected number of
  prunable params (the original's ``get_expected_num_params``, for GQA:
  ``Σ_l P(layer_l) (Σ_k P(head_lk) (2G+2) Hd + 3 Σ_f P(ffn_lf)) · Σ_d P(hidden_d)``)
  is reported every step.
- **Optimiser**: one jitted step; total loss ``CE + Lagrangian``; global-norm
  clipping over everything, then Adam (no weight decay) per partition
  (`optax.multi_transform`): model lr 1e-4, log α 1.0, λ −1.0 (negative =
  gradient ascent, the original's convention), β 0.9/0.95, all on one
  warmup (10 %) + cosine-to-10 % schedule (Composer scales every group).
- **Finalise**: deterministic gates ``σ(log α / T · 0.8)``; in every row the
  ``size − target`` smallest are zeroed (uniform counts per layer). The soft
  values of the kept units are folded into the weights (the original's
  ``prune_params``) — without its second scaling of lm_head by the hidden gate
  — and the model is cut with `maxprune.prune.surgery`.

**Training stream.** Mask learning trains on data, not a calibration set:
when ``prune.calibration`` is a prepared dataset dir the steps read it through
the grain loader (seeded by ``prune.seed``, reshuffled every epoch, sequences
cut to ``prune.seq_len`` if set); otherwise they cycle through the calibration
tokens. The budget is ``prune.sheared_llama.tokens`` (the paper's 0.42 B =
3200 steps × 32 × 4096), rounded up to whole steps and reported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from maxprune import sharding
from maxprune.data.budgets import parse_tokens
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model.arch import Arch
from maxprune.prune import engine, shapes
from maxprune.prune.api import PruneResult, register
from maxprune.prune.surgery import Keep, slice_model
from maxprune.train.optimizer import make_schedule

TEMPERATURE = 2.0 / 3.0
LIMIT_LOW, LIMIT_HIGH = -0.1, 1.1
EPSILON = 1e-6
LOG_ALPHA_INIT, LOG_ALPHA_STD = 5.0, 1e-2
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(1e-2), math.log(1e2)
SCORE_SHARPNESS = 0.8  # the original's "magical_number" in the deterministic score
MASKS = ("layer", "head", "ffn", "hidden")
TARGET_KEYS = ("hidden_size", "num_heads", "ffn_size", "num_layers")
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


# =================================================================== step
@struct.dataclass
class ShearState:
    """``variables`` = {"model": params, "log_alpha": gates' log α, "lambdas": {set: [λ1, λ2]}}."""

    step: jax.Array
    variables: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the mask learning will do, fixed before the first step."""

    target: Arch
    steps: int
    global_batch: int
    seq_len: int
    lagrangian_warmup: int

    @property
    def tokens(self) -> int:
        return self.steps * self.global_batch * self.seq_len


@dataclasses.dataclass(frozen=True)
class Hyper:
    """How to optimise (``prune.sheared_llama`` + the compute dtype); hashable, so compiled steps are reused."""

    lr: float = 1e-4
    mask_lr: float = 1.0
    lambda_lr: float = -1.0
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    microbatches: int = 1
    dtype: str = "float32"
    remat: str = "none"

    @classmethod
    def from_config(cls, c, dtype: str) -> "Hyper":
        names = [f.name for f in dataclasses.fields(cls) if f.name != "dtype"]
        return cls(dtype=dtype, **{name: c[name] for name in names})

    @property
    def model_options(self) -> llama.ModelOptions:
        return llama.ModelOptions(dtype=self.dtype, remat=self.remat)


def make_optimizer(h: Hyper, steps: int) -> optax.GradientTransformation:
    """Clip over all variables, then Adam per partition on one warmup + cosine schedule (lr < 0: ascent)."""
    unit = make_schedule(1.0, steps, h.warmup_ratio, h.min_lr_ratio)
    adam = lambda lr: optax.adam(lambda step: lr * unit(step), b1=h.b1, b2=h.b2, eps=h.eps)
    labels = lambda tree: {part: jax.tree.map(lambda _: part, sub) for part, sub in tree.items()}
    return optax.chain(optax.clip_by_global_norm(h.grad_clip),
                       optax.multi_transform({"model": adam(h.lr), "log_alpha": adam(h.mask_lr),
                                              "lambdas": adam(h.lambda_lr)}, labels))


def init_state(params: Tree, arch: Arch, optimizer: optax.GradientTransformation, seed: int) -> ShearState:
    variables = {"model": params, "log_alpha": init_log_alpha(arch, jax.random.key(seed)),
                 "lambdas": {name: jnp.zeros((2,), jnp.float32) for name in MASKS}}
    return ShearState(jnp.zeros((), jnp.int32), variables, optimizer.init(variables))


def make_step(arch: Arch, plan: Plan, h: Hyper, seed: int, optimizer: optax.GradientTransformation):
    """``step(state, tokens_BL) -> (state, metrics)`` (not jitted): CE of the sampled gated model + Lagrangian."""
    targets, options = target_sparsity(arch, plan.target), h.model_options

    def ce_fn(variables, noise, tokens_bl):
        gates = sample_gates(variables["log_alpha"], noise)
        return llama.next_token_loss(gated_logits(variables["model"], gates, tokens_bl, arch, options), tokens_bl)

    def lagrangian_fn(constraint_vars, step):
        probs = keep_probability(constraint_vars["log_alpha"])
        loss, stats = lagrangian(probs, constraint_vars["lambdas"], targets, step, plan.lagrangian_warmup)
        return loss, (stats, expected_params(probs, arch))

    def step(state: ShearState, tokens_BL):
        v = state.variables
        noise = gate_noise(arch, jax.random.fold_in(jax.random.key(seed), state.step))
        ce, ce_grads = _accumulated_grads(ce_fn, v, noise, tokens_BL, h.microbatches)
        constraint_vars = {"log_alpha": v["log_alpha"], "lambdas": v["lambdas"]}
        (lag, (stats, size)), lag_grads = jax.value_and_grad(lagrangian_fn, has_aux=True)(constraint_vars, state.step)
        grads = {**ce_grads, **jax.tree.map(jnp.add, {k: ce_grads[k] for k in lag_grads}, lag_grads)}
        updates, opt_state = optimizer.update(grads, state.opt_state, v)
        new = optax.apply_updates(v, updates)
        new["log_alpha"] = clamp_log_alpha(new["log_alpha"])
        metrics = {"loss": ce + lag, "ce": ce, "lagrangian": lag, "grad_norm": optax.global_norm(grads),
                   "expected_params": size, "expected_sparsity": 1 - size / arch.num_prunable_params(),
                   "masks": stats}
        return ShearState(state.step + 1, new, opt_state), metrics

    return step


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jitted ``init(params) -> state`` and ``step(state, tokens_BL)``, and where batches go."""

    init: Any
    step: Any
    batch_sharding: NamedSharding | None


@functools.lru_cache(maxsize=4)
def programs(arch: Arch, plan: Plan, h: Hyper, seed: int, mesh, donate: bool) -> Programs:
    """Compiled once per (shapes, plan, settings, mesh): a study pruning several parents reuses them."""
    optimizer = make_optimizer(h, plan.steps)
    init = lambda params: init_state(params, arch, optimizer, seed)
    step, donated = make_step(arch, plan, h, seed, optimizer), (0,) if donate else ()
    if mesh is None:
        return Programs(jax.jit(init, donate_argnums=donated), jax.jit(step, donate_argnums=0), None)
    state_sh = sharding.tree_shardings(jax.eval_shape(init, llama.abstract_params(arch)), mesh)
    batch_sh = _batch_sharding(mesh, plan.global_batch)
    return Programs(jax.jit(init, out_shardings=state_sh, donate_argnums=donated),
                    jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                            donate_argnums=0), batch_sh)


def _accumulated_grads(ce_fn, variables, noise, tokens_BL, microbatches: int):
    """Mean CE and its gradient over equal microbatches, summed in fp32 inside a scan."""
    if microbatches == 1:
        return jax.value_and_grad(ce_fn)(variables, noise, tokens_BL)
    B = tokens_BL.shape[0]
    tokens_MBL = tokens_BL.reshape(microbatches, B // microbatches, -1)
    grad_fn = jax.value_and_grad(ce_fn)

    def accumulate(carry, tokens_bl):
        loss_acc, grads_acc = carry
        loss, grads = grad_fn(variables, noise, tokens_bl)
        return (loss_acc + loss, jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), variables)
    (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), tokens_MBL)
    return loss / microbatches, jax.tree.map(lambda g: g / microbatches, grads)


# =============================================================== finalise
def finalize(params: Tree, log_alpha: Tree, arch: Arch, target: Arch) -> tuple[Tree, Arch, dict]:
    """Deterministic gates, folded into the kept weights, then cut to `target`; also the kept indices."""
    gates, keep = deterministic_gates(log_alpha, arch, target)
    folded = _fold_jit(params, jax.tree.map(jnp.asarray, gates), arch)
    full = unit_counts(arch)
    cut = lambda name, rows: None if keep[name].shape[-1] == full[name] else (keep[name] if rows else keep[name][0])
    new_params, new_arch, _ = slice_model(folded, arch, Keep(layers=cut("layer", False), hidden_D=cut("hidden", False),
                                                             ffn_LF=cut("ffn", True), kv_LK=cut("head", True)))
    if new_arch != target:
        raise MaxpruneError(f"internal: the cut model {shapes.describe(new_arch)} is not the target "
                            f"{shapes.describe(target)}")
    return new_params, new_arch, {"gates": gates, "keep": keep}


_fold_jit = jax.jit(fold_gates, static_argnames="arch")


@functools.partial(jax.jit, static_argnums=1)
def _final_sizes(log_alpha: Tree, arch: Arch) -> tuple[Tree, jax.Array]:
    probs = keep_probability(log_alpha)
    return probs, expected_params(probs, arch)


# ================================================================== shape
def target_shape(arch: Arch, p) -> Arch:
    """``prune.sheared_llama.{hidden_size, num_heads, ffn_size, num_layers}``, else the paper's rule at the ratio.

    Unset dimensions keep the parent's, except the FFN, which fills the ratio's
    parameter target. Without any, `shapes.target_arch` (the larger of the
    paper's two hidden sizes, every head: Llama-3.1-8B → 3456 / 32 / 7552).
    """
    c = p.sheared_llama
    given = {key: c[key] for key in TARGET_KEYS if c[key] is not None}
    if not given:
        shape = shapes.target_arch("sheared_llama", arch, p.ratio, c.ratio_of, c.multiple)
        return shape.replace(out_bias=arch.out_bias)
    parent = {"hidden_size": arch.hidden_size, "num_heads": arch.num_heads, "ffn_size": arch.ffn_size,
              "num_layers": arch.num_layers}
    for key, value in given.items():
        if value > parent[key]:
            raise MaxpruneError(f"prune.sheared_llama.{key}={value} is larger than the parent's {parent[key]}; "
                                f"the target must fit inside the parent")
    heads = given.get("num_heads", arch.num_heads)
    shape = arch.replace(hidden_size=given.get("hidden_size", arch.hidden_size),
                         num_layers=given.get("num_layers", arch.num_layers),
                         num_kv_heads=shapes.kv_groups_for(arch, heads), num_heads=heads)
    ffn = given.get("ffn_size") or shapes.ffn_for(shape, shapes.target_params(arch, p.ratio, c.ratio_of),
                                                  c.multiple or shapes.auto_multiple(arch))
    if not 1 <= ffn <= arch.ffn_size:
        raise MaxpruneError(f"prune.sheared_llama: no FFN size fills prune.ratio={p.ratio} at hidden "
                            f"{shape.hidden_size}, {heads} heads, {shape.num_layers} layers (got {ffn}); set "
                            f"prune.sheared_llama.ffn_size or a smaller shape")
    return shape.replace(ffn_size=ffn)


def check(arch: Arch, p) -> Arch:
    """The target shape, valid and smaller than the parent (`maxprune.prune.run` calls it before loading data)."""
    target = target_shape(arch, p)
    if target == arch:
        raise MaxpruneError("prune.sheared_llama: the target shape equals the parent's; nothing would be pruned")
    return target


def make_plan(arch: Arch, p, seq_len: int) -> Plan:
    """Target, steps of the token budget, and the Lagrangian warmup (a budget too short for it is an error)."""
    c = p.sheared_llama
    target = check(arch, p)
    tokens, per_step = parse_tokens(c.tokens), c.global_batch * seq_len
    if tokens < per_step:
        raise MaxpruneError(f"prune.sheared_llama.tokens={c.tokens} is smaller than one step (global_batch "
                            f"{c.global_batch} x seq_len {seq_len} = {per_step} tokens)")
    steps = math.ceil(tokens / per_step)
    warmup = math.ceil(0.1 * steps) if c.lagrangian_warmup is None else c.lagrangian_warmup
    if warmup >= steps:
        raise MaxpruneError(f"prune.sheared_llama.tokens={c.tokens} gives {steps} steps of {per_step} tokens, but the "
                            f"target sparsity ramps up over lagrangian_warmup={warmup} steps and would never be "
                            f"reached; raise the budget or lower prune.sheared_llama.lagrangian_warmup")
    return Plan(target, steps, c.global_batch, seq_len, warmup)


# =================================================================== data
@dataclasses.dataclass
class Stream:
    """Global batches of mask-learning tokens, and what they are (for the report)."""

    batches: Iterator[np.ndarray]
    seq_len: int
    info: dict
    close: Any = lambda: None


def token_stream(p, calibration_NL, arch: Arch) -> Stream:
    """A prepared ``prune.calibration`` dir through the grain loader, else the calibration tokens cycled."""
    c = p.sheared_llama
    if p.calibration and Path(p.calibration).is_dir():
        return _prepared_stream(p, arch)
    if calibration_NL is None:
        raise MaxpruneError("sheared_llama learns its masks on training tokens: set prune.calibration (a prepared "
                            "dataset dir, or calibration tokens to cycle through)")
    tokens = engine.check_calibration(calibration_NL, arch)
    n = tokens.shape[0]

    def cycle():
        for step in range(2**62):
            yield tokens[(step * c.global_batch + np.arange(c.global_batch)) % n]

    return Stream(cycle(), tokens.shape[1], {"kind": "calibration", "sequences": n})


def _prepared_stream(p, arch: Arch) -> Stream:
    from maxprune.data.loader import make_loader
    from maxprune.data.prepare import open_prepared
    ds = open_prepared(p.calibration)
    if ds.manifest.tokenizer["vocab_size"] > arch.vocab_size:
        raise MaxpruneError(f"prune.calibration={p.calibration} uses a tokenizer of "
                            f"{ds.manifest.tokenizer['vocab_size']} ids but the model's vocab_size is "
                            f"{arch.vocab_size}")
    seq_len = min(p.seq_len or ds.seq_len, ds.seq_len)
    # Every process reads the whole global batch (a few MB at most) and places its shards: one data order.
    loader = make_loader(ds, [(0, len(ds))], global_batch=p.sheared_llama.global_batch, seed=p.seed,
                         num_epochs=None, process_index=0, process_count=1)
    return Stream((batch[:, :seq_len] for batch in loader), seq_len,
                  {"kind": "prepared", "path": str(Path(p.calibration).absolute()), "sequences": len(ds)},
                  loader.close)


def _batch_sharding(mesh, global_batch: int) -> NamedSharding:
    """Batch over data x fsdp when they divide it, else replicated (tiny batches on many devices)."""
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    return sharding.batch_sharding(mesh) if global_batch % dp == 0 else NamedSharding(mesh, PartitionSpec())


def place_batch(batch_BL: np.ndarray, batch_sharding):
    """The global batch as a jax.Array; each process fills its own shards from the same host batch."""
    if batch_sharding is None:
        return jnp.asarray(batch_BL)
    return jax.make_array_from_callback(batch_BL.shape, batch_sharding, lambda index: batch_BL[index])


# ================================================================== learn
def learn_masks(params: Tree, arch: Arch, stream: Stream, plan: Plan, h: Hyper, seed: int,
                log_every: int = 10, progress: bool = False, donate: bool = False) -> tuple[ShearState, list[dict]]:
    """Run the mask-learning steps; returns the final state and the trajectory recorded every `log_every` steps."""
    mesh = engine.mesh_of(params)
    prog = programs(arch, plan, h, seed, mesh, donate)
    trajectory = []
    with mesh_scope(mesh):
        state = prog.init(params)
        bar = tqdm(range(plan.steps), desc="sheared_llama", unit="step",
                   disable=not (progress and jax.process_index() == 0))
        for i in bar:
            state, metrics = prog.step(state, place_batch(next(stream.batches), prog.batch_sharding))
            if (i + 1) % log_every == 0 or i + 1 == plan.steps:
                record = _record(i + 1, metrics)
                if not math.isfinite(record["loss"]):
                    raise MaxpruneError(f"sheared_llama: the loss is {record['loss']} at step {i + 1}; lower "
                                        f"prune.sheared_llama.lr or mask_lr")
                trajectory.append(record)
                bar.set_postfix(ce=f"{record['ce']:.3f}", sparsity=f"{record['expected_sparsity']:.3f}")
    return state, trajectory


def mesh_scope(mesh):
    """`sharding.use_mesh` (activation constraints on) for a mesh; nothing for a single device."""
    return sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _record(step: int, metrics) -> dict:
    m = jax.device_get(metrics)
    record = {"step": step, **{k: float(v) for k, v in m.items() if k != "masks"}}
    record["masks"] = {name: {k: float(v) for k, v in stats.items()} for name, stats in m["masks"].items()}
    return record


# ================================================================= method
@register("sheared_llama")
def prune(params, arch: Arch, calibration_NL, cfg) -> PruneResult:
    """Learn the gates on the token budget, then fold and cut to the target shape (see module doc)."""
    start_time = time.perf_counter()
    options = engine.options_for(cfg)
    stream = token_stream(cfg, calibration_NL, arch)
    try:
        plan = make_plan(arch, cfg, stream.seq_len)
        h = Hyper.from_config(cfg.sheared_llama, options.dtype)
        state, trajectory = learn_masks(params, arch, stream, plan, h, cfg.seed, cfg.sheared_llama.log_every,
                                        options.progress, options.donate)
    finally:
        stream.close()
    v = state.variables
    del state  # the optimizer moments (twice the params) go before the cut
    new_params, new_arch, final = finalize(v["model"], v["log_alpha"], arch, plan.target)
    report = _report(arch, plan, stream, trajectory, v, final, cfg)
    report["summary"] = {**shapes.summary(arch, new_arch, time.perf_counter() - start_time),
                         "mask_learning_tokens": plan.tokens, "steps": plan.steps,
                         "final_expected_sparsity": trajectory[-1]["expected_sparsity"],
                         "target_sparsity": 1 - plan.target.num_prunable_params() / arch.num_prunable_params()}
    return PruneResult(new_params, new_arch, None, report)


def _report(arch: Arch, plan: Plan, stream: Stream, trajectory: list[dict], variables, final: dict, p) -> dict:
    c = p.sheared_llama
    probs, size = jax.device_get(_final_sizes(variables["log_alpha"], arch))
    gates = final["gates"]
    kept_soft = {name: gates[name][gates[name] > 0] for name in MASKS}
    return {
        "method": "sheared_llama", "gqa_granularity": "kv_groups",
        "target": shapes.describe(plan.target),
        "training": {"steps": plan.steps, "tokens": plan.tokens, "global_batch": plan.global_batch,
                     "seq_len": plan.seq_len, "lagrangian_warmup": plan.lagrangian_warmup, "data": stream.info,
                     "lr": c.lr, "mask_lr": c.mask_lr, "lambda_lr": c.lambda_lr},
        "final": {"expected_params": float(size),
                  "target_params": plan.target.num_prunable_params(),
                  "expected_sparsity": {name: float(np.mean(1 - np.mean(probs[name], -1))) for name in MASKS},
                  "target_sparsity": target_sparsity(arch, plan.target),
                  "lambdas": {name: np.asarray(lam).tolist()  # [λ1, λ2]
                              for name, lam in jax.device_get(variables["lambdas"]).items()},
                  "folded_gate_range": {name: [float(v.min()), float(v.max())] for name, v in kept_soft.items()}},
        "kept": {"layers": final["keep"]["layer"][0].tolist(), "kv_groups": final["keep"]["head"].tolist()},
        "trajectory": trajectory,
    }
