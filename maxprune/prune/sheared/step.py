"""Sheared LLaMA's training step: state, optimiser, the step function and its compiled programs.

`make_step` is one mask-learning step (CE of the sampled gated model plus the
Lagrangian, clipped Adam per partition); `programs` compiles ``init`` and
``step`` once per (shapes, plan, settings, mesh), with the batch sharding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import NamedSharding

from maxprune import sharding
from maxprune.model import llama
from maxprune.model.arch import Arch
from maxprune.prune.sheared.gates import (
    MASKS,
    Tree,
    clamp_log_alpha,
    expected_params,
    gate_noise,
    gated_logits,
    init_log_alpha,
    keep_probability,
    lagrangian,
    sample_gates,
    target_sparsity,
)
from maxprune.prune.sheared.plan import Plan
from maxprune.train.optimizer import make_schedule


@struct.dataclass
class ShearState:
    """``variables`` = {"model": params, "log_alpha": gates' log α, "lambdas": {set: [λ1, λ2]}}."""

    step: jax.Array
    variables: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Hyper:
    """How to optimise (``prune.sheared_llama``, whose schema holds the defaults, + the compute dtype);
    hashable, so compiled steps are reused."""

    lr: float
    mask_lr: float
    lambda_lr: float
    warmup_ratio: float
    min_lr_ratio: float
    b1: float
    b2: float
    eps: float
    grad_clip: float
    microbatches: int
    dtype: str
    remat: str

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
    batch_sh = sharding.batch_or_replicated(mesh, plan.global_batch)
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
