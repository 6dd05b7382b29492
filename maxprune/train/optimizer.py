"""The paper's recipe (Table 4) in optax: AdamW, clipping, warmup + cosine to 10 %.

Which params decay is a choice: kernels and the embedding decay; RMSNorm
scales and biases do not (the usual LLM convention, as in MaxText and Lingua).
"""

from __future__ import annotations

import math

import jax
import optax

from maxprune.errors import MaxpruneError


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0


def make_schedule(peak_lr: float, total_steps: int, warmup_ratio: float = 0.05,
                  min_lr_ratio: float = 0.1) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_ratio` of the steps, cosine decay to `min_lr_ratio`·peak."""
    if total_steps < 1:
        raise MaxpruneError(f"a schedule needs at least one step, got total_steps={total_steps}")
    warmup = min(warmup_steps(total_steps, warmup_ratio), total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak_lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak_lr * min_lr_ratio)


DECAYED = ("kernel", "embedding")


def decay_mask(params):
    """True for weights that get weight decay: kernels and the embedding, not norms/biases.

    Decided by name, not rank: layer-stacked norm scales are 2-D too.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: str(getattr(path[-1], "key", path[-1])) in DECAYED, params)


def make_optimizer(train_cfg, total_steps: int, peak_lr: float | None = None) -> optax.GradientTransformation:
    """clip_by_global_norm → AdamW with the recipe's betas, eps and decoupled weight decay.

    Wrapped in `optax.apply_if_finite`: an update with a non-finite gradient is
    dropped (params and moments unchanged) up to `train.skip_nonfinite` times in
    a row; the trainer stops the run when that limit is passed (at once for 0).
    The wrapper is always there, so changing the limit keeps checkpoints valid.
    """
    lr = train_cfg.lr if peak_lr is None else peak_lr
    schedule = make_schedule(lr, total_steps, train_cfg.warmup_ratio, train_cfg.min_lr_ratio)
    adamw = optax.chain(
        optax.clip_by_global_norm(train_cfg.grad_clip),
        optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                    weight_decay=train_cfg.weight_decay, mask=decay_mask),
    )
    return optax.apply_if_finite(adamw, max_consecutive_errors=int(train_cfg.get("skip_nonfinite", 0)))
