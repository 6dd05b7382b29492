"""Sheared LLaMA (Xia et al. 2024): learn structured pruning masks under a Lagrangian size constraint.

Reference: princeton-nlp/LLM-Shearing (``l0_module.py``, ``composer_llama.py``,
``train.py``) as docs/methods.md reads it, with its constants:

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
  — and the model is cut with `maxprune.prune.structured.surgery`.

**Training stream.** Mask learning trains on data, not a calibration set:
when ``prune.calibration`` is a prepared dataset dir the steps read it through
the grain loader (seeded by ``prune.seed``, reshuffled every epoch, sequences
cut to ``prune.seq_len`` if set); otherwise they cycle through the calibration
tokens. The budget is ``prune.sheared_llama.tokens`` (the paper's 0.42 B =
3200 steps × 32 × 4096), rounded up to whole steps and reported.

The method in modules, in the order a run uses them (every name a test or
caller used is re-exported here):

- `sheared_plan`: the target shape and the step budget (`check`, `make_plan`);
- `sheared_data`: the training token stream;
- `sheared_gates`: hard-concrete gates, expected sizes, the Lagrangian, the gated model;
- `sheared_step`: optimiser, the jitted step and its programs;
- this module: learning the masks, finalising (fold and cut), the report.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from maxprune import sharding
from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.prune.api import PruneResult, register
from maxprune.prune.engine.activations import mesh_of
from maxprune.prune.engine.options import options_for
from maxprune.prune.sheared.data import Stream, place_batch, token_stream
from maxprune.prune.sheared.gates import (
    MASKS,
    Tree,
    deterministic_gates,
    expected_params,
    fold_gates,
    keep_probability,
    target_sparsity,
    unit_counts,
)
from maxprune.prune.sheared.plan import Plan, make_plan
from maxprune.prune.sheared.step import Hyper, ShearState, programs
from maxprune.prune.structured import shapes
from maxprune.prune.structured.surgery import Keep, slice_model


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


# ================================================================== learn
def learn_masks(params: Tree, arch: Arch, stream: Stream, plan: Plan, h: Hyper, seed: int,
                log_every: int = 10, progress: bool = False, donate: bool = False) -> tuple[ShearState, list[dict]]:
    """Run the mask-learning steps; returns the final state and the trajectory recorded every `log_every` steps."""
    mesh = mesh_of(params)
    prog = programs(arch, plan, h, seed, mesh, donate)
    trajectory = []
    with sharding.mesh_scope(mesh):
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
    options = options_for(cfg)
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
