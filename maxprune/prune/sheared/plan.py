"""Sheared LLaMA's plan: the target shape and the step budget, fixed before the first step.

`target_shape` reads ``prune.sheared_llama.{hidden_size, num_heads, ffn_size,
num_layers}`` (else the paper's rule at the ratio), `check` validates it
before any data is loaded, and `make_plan` turns the token budget into steps
and the Lagrangian warmup.
"""

from __future__ import annotations

import dataclasses
import math

from maxprune.data.budgets import parse_tokens
from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.prune.structured import shapes

TARGET_KEYS = ("hidden_size", "num_heads", "ffn_size", "num_layers")


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
