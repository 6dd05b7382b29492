"""The one place the jitted train step is assembled: the trainer runs it, `maxprune compile` compiles it for
a TPU slice ahead of time (`aot`), `maxprune bench step` times it (`bench`).

`optimizer_and_schedule` is the recipe (AdamW behind gradient clipping, warmup
+ cosine); `build_step` wraps `step.make_train_step` in the sharded, donated
``jax.jit`` all three use. State, masks and teacher params may be concrete
arrays or abstract ``ShapeDtypeStruct``\\ s (AOT): only their shapes and tree
structure are read here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax
from jax.sharding import Mesh, NamedSharding

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.train import optimizer as opt_lib
from maxprune.train.step import Teacher, make_train_step


@dataclasses.dataclass(frozen=True)
class Step:
    """``fn(state, tokens_BL, masks, teacher_params) -> (state, metrics)``, jitted with the state donated."""

    fn: Callable
    state_sharding: Any
    batch_sharding: NamedSharding
    masks_sharding: Any
    teacher_sharding: Any


def check_batch(global_batch: int, microbatches: int, data_parallel: int, where: str) -> int:
    """The per-device batch; MaxpruneError when the batch does not split evenly over the devices of
    `where` (a mesh, a TPU slice) or into the microbatches."""
    if global_batch % data_parallel:
        raise MaxpruneError(f"train.global_batch={global_batch} does not divide over the {data_parallel} "
                            f"data-parallel devices (mesh data x fsdp) of {where}: the per-device batch "
                            f"would be {global_batch / data_parallel:g}; use a multiple of {data_parallel}")
    if global_batch % microbatches:
        raise MaxpruneError(f"train.global_batch={global_batch} is not divisible by "
                            f"train.microbatches={microbatches}")
    return global_batch // data_parallel


def optimizer_and_schedule(train_cfg, steps: int, lr: float | None = None
                           ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The recipe's optimizer and its learning-rate schedule over `steps` (peak `lr`, default ``train.lr``)."""
    lr = train_cfg.lr if lr is None else lr
    schedule = opt_lib.make_schedule(lr, steps, train_cfg.warmup_ratio, train_cfg.min_lr_ratio)
    return opt_lib.make_optimizer(train_cfg, steps, lr), schedule


def build_step(cfg, arch, mesh: Mesh, state, optimizer, schedule, *, options: llama.ModelOptions | None = None,
               masks=None, teacher: Teacher | None = None, teacher_params=None) -> Step:
    """The train step of `arch` under `cfg` (``model`` options unless `options`, ``train.microbatches``),
    sharded on `mesh` by the rules table; `masks` / `teacher` add the masked and distillation variants."""
    options = llama.ModelOptions.from_config(cfg.model) if options is None else options
    fn = make_train_step(arch, options, optimizer, schedule, microbatches=cfg.train.microbatches, teacher=teacher)
    state_sh = sharding.tree_shardings(state, mesh)
    batch_sh = sharding.batch_sharding(mesh)
    masks_sh = sharding.tree_shardings(masks, mesh) if masks else None
    teacher_sh = sharding.tree_shardings(teacher_params, mesh) if teacher is not None else None
    jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh, masks_sh, teacher_sh), out_shardings=(state_sh, None),
                     donate_argnums=0)
    return Step(jitted, state_sh, batch_sh, masks_sh, teacher_sh)
