"""The `train` config section: the token budget, the paper's recipe (Table 4), checkpoints, validation,
distillation."""

from __future__ import annotations

from typing import Any

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from maxprune.config import at_least, choice
from maxprune.data.budgets import parse_tokens
from maxprune.errors import MaxpruneError


def optimizer_keys(warmup_ratio: float) -> dict[str, float]:
    """The schedule and AdamW keys `train` and `prune.sheared_llama` share (the paper's Table 4 values)."""
    return {"warmup_ratio": warmup_ratio, "min_lr_ratio": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "grad_clip": 1.0}


def check_optimizer(prefix: str, c) -> None:
    """The `optimizer_keys` of section `prefix`: warmup and cosine floor fractions, Adam's betas and eps."""
    if not 0 <= c.warmup_ratio < 1 or not 0 <= c.min_lr_ratio <= 1:
        raise MaxpruneError(f"{prefix}.warmup_ratio={c.warmup_ratio} must be in [0, 1) and "
                            f"{prefix}.min_lr_ratio={c.min_lr_ratio} in [0, 1]")
    if not (0 <= c.b1 < 1 and 0 <= c.b2 < 1 and c.eps > 0 and c.grad_clip > 0):
        raise MaxpruneError(f"{prefix}.b1/b2 must be in [0, 1), {prefix}.eps and {prefix}.grad_clip > 0")


def section() -> dict[str, Any]:
    return {
        "init": placeholder(str),         # model dir to start from; unset = random init of `model`
        "masks_from": placeholder(str),   # sparse scratch: random init under this model dir's masks
        "tokens": placeholder(str),       # token budget, e.g. "2M" or "200B"
        "global_batch": 8,                # sequences per step
        "microbatches": 1,                # gradient accumulation steps per global batch
        # The paper's recipe (Table 4)
        "lr": 3e-4,
        "lr_sweep": placeholder(tuple),   # e.g. (1e-5, 3e-5, 1e-4, 3e-4, 1e-3): prefix runs, lowest loss wins
        "sweep_fraction": 0.1,            # prefix length of each sweep run, as a fraction of the steps
        "sweep_schedule": "compressed",   # a sweep run's LR schedule: "compressed" (its own) or "prefix" (cut)
        **optimizer_keys(warmup_ratio=0.05),
        "weight_decay": 0.01,
        # Checkpoints, logging, validation
        "checkpoint_every": 100,
        "keep_checkpoints": 2,
        "async_checkpoint": True,
        "log_every": 10,
        "eval_every": 0,                  # steps between validation losses (0: at the end only)
        "eval_sequences": 64,
        "tensorboard": True,
        "stop_after_steps": 0,            # stop (with a checkpoint) after this many steps in one call
        "skip_nonfinite": 0,              # drop up to this many non-finite updates in a row (0: stop at the first)
        # Distillation (beyond the paper): forward KL from a teacher model dir
        "teacher": placeholder(str),
        "kd_weight": 0.5,
        "kd_temperature": 1.0,
    }


def check(cfg: ConfigDict) -> None:
    t = cfg.train
    for key in ("global_batch", "microbatches", "checkpoint_every", "keep_checkpoints", "log_every",
                "eval_sequences"):
        at_least(f"train.{key}", t[key], 1)
    for key in ("eval_every", "stop_after_steps", "skip_nonfinite"):
        at_least(f"train.{key}", t[key], 0)
    if t.init and t.masks_from:
        raise MaxpruneError("set train.init or train.masks_from, not both: masks_from trains a random init "
                            "under another model's masks (sparse scratch)")
    if t.tokens is not None:
        parse_tokens(t.tokens)
    if not t.lr > 0:
        raise MaxpruneError(f"train.lr={t.lr} must be > 0")
    if t.lr_sweep is not None and (not t.lr_sweep or any(not lr > 0 for lr in t.lr_sweep)):
        raise MaxpruneError(f"train.lr_sweep={t.lr_sweep} must be a non-empty list of positive LRs")
    if not 0 < t.sweep_fraction <= 1:
        raise MaxpruneError(f"train.sweep_fraction={t.sweep_fraction} must be in (0, 1]")
    choice("train.sweep_schedule", t.sweep_schedule, ("compressed", "prefix"))
    check_optimizer("train", t)
    at_least("train.weight_decay", t.weight_decay, 0)
    if not 0 <= t.kd_weight <= 1 or not t.kd_temperature > 0:
        raise MaxpruneError(f"train.kd_weight={t.kd_weight} must be in [0, 1] and "
                            f"train.kd_temperature={t.kd_temperature} > 0")
