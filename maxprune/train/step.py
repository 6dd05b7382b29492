"""One jitted training step: microbatch accumulation, masks kept exact, optional distillation.

Masked weights stay exactly zero: the masked forward gives them zero gradient,
so their Adam moments stay zero and decoupled weight decay of a zero is zero;
the step also re-applies the masks to the updated params, so a weight that was
not zero at the start (or drifts by rounding) is forced back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def init_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    """A fresh state: every run starts its optimizer anew (retraining re-warms, as the paper does)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


@dataclasses.dataclass(frozen=True)
class Teacher:
    """Knowledge distillation: forward KL from a teacher's logits, mixed into the loss."""

    arch: Arch
    weight: float = 0.5
    temperature: float = 1.0


def distill_loss(student_BLV, teacher_BLV, temperature: float) -> jax.Array:
    """Mean over tokens of KL(teacher ‖ student) at `temperature`, scaled by T² (Hinton et al.)."""
    t = temperature
    log_p_teacher = jax.nn.log_softmax(teacher_BLV.astype(jnp.float32) / t, axis=-1)
    log_p_student = jax.nn.log_softmax(student_BLV.astype(jnp.float32) / t, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student), axis=-1)
    return jnp.mean(kl) * t * t


def make_loss_fn(arch: Arch, options: llama.ModelOptions, teacher: Teacher | None = None):
    """loss(params, tokens_BL, masks, teacher_params) -> (loss, ce)."""
    def loss_fn(params, tokens_BL, masks, teacher_params):
        logits_BLV = llama.forward(params, tokens_BL, arch, masks, options)
        ce = llama.next_token_loss(logits_BLV, tokens_BL)
        if teacher is None:
            return ce, ce
        teacher_BLV = jax.lax.stop_gradient(
            llama.forward(teacher_params, tokens_BL, teacher.arch, None, options))
        kd = distill_loss(logits_BLV, teacher_BLV, teacher.temperature)
        return (1.0 - teacher.weight) * ce + teacher.weight * kd, ce
    return loss_fn


def make_train_step(arch: Arch, options: llama.ModelOptions, optimizer: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], *, microbatches: int = 1,
                    teacher: Teacher | None = None):
    """`step(state, tokens_BL, masks, teacher_params) -> (state, metrics)` (not yet jitted).

    The batch is split into `microbatches` equal parts whose gradients are
    averaged in fp32 inside a scan, so peak activation memory is one part's.
    """
    loss_fn = make_loss_fn(arch, options, teacher)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, tokens_BL, masks, teacher_params=None):
        B = tokens_BL.shape[0]
        if B % microbatches:
            raise MaxpruneError(f"batch {B} is not divisible by train.microbatches={microbatches}")
        tokens_MBL = tokens_BL.reshape(microbatches, B // microbatches, -1)

        def accumulate(carry, tokens_bl):
            grads_acc, loss_acc, ce_acc = carry
            (loss, ce), grads = grad_fn(state.params, tokens_bl, masks, teacher_params)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, loss_acc + loss, ce_acc + ce), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, loss, ce), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), tokens_MBL)
        grads = jax.tree.map(lambda g: g / microbatches, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = masks_lib.apply_masks(optax.apply_updates(state.params, updates), masks)
        metrics = {"loss": loss / microbatches, "ce": ce / microbatches,
                   "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step
