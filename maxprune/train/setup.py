"""A run's setup: everything it is made of, resolved and checked before any step runs.

`check` is the cheap half (no params loaded), run before the run dir is even
created; `setup` loads the model (train.init, or a random init, optionally under
train.masks_from's masks), opens the dataset, plans the steps and data ranges
for the token budget, and loads the distillation teacher.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax

from maxprune import sharding
from maxprune.data import budgets as budgets_lib
from maxprune.data.prepared import open_prepared
from maxprune.errors import MaxpruneError
from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch
from maxprune.model.model_dir import MASKS_DIR, load_model_dir, read_arch, read_provenance
from maxprune.model.schema import arch_from_config
from maxprune.train.build import check_batch
from maxprune.train.step import Teacher


@dataclasses.dataclass
class Setup:
    """Everything a run is made of, resolved and checked before any step runs."""

    mesh: Any
    arch: Arch
    params: Any
    masks: Any
    parent: dict
    dataset: Any
    plan: budgets_lib.Plan
    steps: int
    seq_len: int
    tokens_requested: int
    teacher: Teacher | None
    teacher_params: Any


def setup(cfg) -> Setup:
    mesh = sharding.make_mesh(cfg.mesh)
    _check_batch(cfg, mesh)
    arch, params, masks, parent = _resolve_model(cfg, mesh)
    ds = _resolve_data(cfg, arch, parent)
    steps, tokens, plan = _plan_steps(cfg, ds)
    teacher, teacher_params = _resolve_teacher(cfg, arch, mesh)
    return Setup(mesh, arch, params, masks, parent, ds, plan, steps, ds.seq_len, tokens,
                 teacher, teacher_params)


def check(cfg) -> None:
    """The cheap checks of `setup` (no params loaded), run before anything is written:
    mesh and batch, every model dir and dataset named, tokenizers, the data range and budget."""
    _check_batch(cfg, sharding.make_mesh(cfg.mesh))
    t = cfg.train
    for path in (t.masks_from, t.teacher):
        if path:
            read_arch(path)
    if t.masks_from and not (Path(t.masks_from) / MASKS_DIR).is_dir():
        raise MaxpruneError(f"train.masks_from={t.masks_from} has no masks")
    arch = read_arch(t.init) if t.init else arch_from_config(cfg)
    if t.teacher:
        _check_teacher_vocab(t.teacher, read_arch(t.teacher), arch)
    parent = {k: v for k, v in read_provenance(t.init).items() if k == "tokenizer_hash"} if t.init else {}
    ds = _resolve_data(cfg, arch, parent)
    _plan_steps(cfg, ds)
    if cfg.data.validation:
        open_prepared(cfg.data.validation).check_tokenizer(ds.manifest.tokenizer["hash"])


# ------------------------------------------------------------------- model
def _resolve_model(cfg, mesh) -> tuple[Arch, Any, Any, dict]:
    """(arch, params, masks, parent provenance) from train.init or a random init."""
    masks, parent = None, {}
    if cfg.train.init:
        md = load_model_dir(cfg.train.init, mesh)
        arch, params, masks = md.arch, md.params, md.masks
        parent = {"parent": str(md.path), **{k: md.provenance[k] for k in
                                              ("hf_dtype", "hf_config", "tokenizer_hash")
                                              if k in md.provenance}}
    else:
        arch = arch_from_config(cfg)
        params = init_sharded(arch, jax.random.key(cfg.seed), mesh)
    if cfg.train.masks_from:
        masks, parent = _donor_masks(cfg, arch, mesh)
    return arch, masks_lib.apply_masks(params, masks), masks, parent


def _donor_masks(cfg, arch: Arch, mesh) -> tuple[Any, dict]:
    """(masks, parent provenance) of train.masks_from, for a sparse-scratch run."""
    if cfg.train.init:
        raise MaxpruneError("set train.init or train.masks_from, not both: masks_from trains a "
                            "random init under another model's masks (sparse scratch)")
    donor = load_model_dir(cfg.train.masks_from, mesh)
    if donor.arch != arch:
        raise MaxpruneError(f"train.masks_from={cfg.train.masks_from} has Arch {arch_diff(donor.arch, arch)} "
                            f"that differs from the model's")
    if donor.masks is None:
        raise MaxpruneError(f"train.masks_from={cfg.train.masks_from} has no masks")
    return donor.masks, {"masks_from": str(donor.path)}


def init_sharded(arch: Arch, rng, mesh):
    """Random init computed directly in its sharding on `mesh` (never whole on one device)."""
    shardings = sharding.tree_shardings(llama.abstract_params(arch), mesh)
    return jax.jit(lambda r: llama.init_params(arch, r), out_shardings=shardings)(rng)


def _resolve_teacher(cfg, arch: Arch, mesh):
    if not cfg.train.teacher:
        return None, None
    md = load_model_dir(cfg.train.teacher, mesh)
    _check_teacher_vocab(cfg.train.teacher, md.arch, arch)
    teacher = Teacher(md.arch, cfg.train.kd_weight, cfg.train.kd_temperature)
    return teacher, masks_lib.apply_masks(md.params, md.masks)


def _check_teacher_vocab(path, teacher: Arch, student: Arch) -> None:
    if teacher.vocab_size != student.vocab_size:
        raise MaxpruneError(f"train.teacher={path} has vocab_size {teacher.vocab_size} but the "
                            f"student has {student.vocab_size}; distillation needs the same vocabulary")


def arch_diff(a: Arch, b: Arch) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}={da[k]} vs {db[k]}" for k in da if da[k] != db[k]) or "(equal)"


# -------------------------------------------------------------------- data
def _resolve_data(cfg, arch: Arch, parent: dict):
    if not cfg.data.train:
        raise MaxpruneError("data.train is not set: give a prepared dataset dir "
                            "(`maxprune data prepare` or `maxprune data builtin`)")
    ds = open_prepared(cfg.data.train)
    tok = ds.manifest.tokenizer
    if "tokenizer_hash" in parent:
        ds.check_tokenizer(parent["tokenizer_hash"])
    if tok["vocab_size"] > arch.vocab_size:
        raise MaxpruneError(f"data.train={cfg.data.train} uses a tokenizer of {tok['vocab_size']} ids but "
                            f"the model's vocab_size is {arch.vocab_size}")
    return ds


def _plan_steps(cfg, ds) -> tuple[int, int, list]:
    """(steps, tokens requested, sequence ranges consumed) for the run's token budget."""
    seq_len = ds.seq_len
    tokens = budgets_lib.parse_tokens(cfg.train.tokens) if cfg.train.tokens else 0
    per_step = cfg.train.global_batch * seq_len
    if tokens < per_step:
        raise MaxpruneError(f"train.tokens={cfg.train.tokens} is smaller than one step "
                            f"(global_batch {cfg.train.global_batch} x seq_len {seq_len} = {per_step} tokens)")
    steps = math.ceil(tokens / per_step)
    budgets = budgets_lib.parse_budgets(dict(cfg.data.budgets), ds.manifest.num_tokens, seq_len)
    if cfg.data.range not in budgets:
        raise MaxpruneError(f"data.range={cfg.data.range!r} is not a budget; defined: {budgets.names}")
    plan = budgets.take(cfg.data.range, steps * per_step, allow_repeat=cfg.data.allow_repeat)
    return steps, tokens, plan


def _check_batch(cfg, mesh) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    check_batch(cfg.train.global_batch, cfg.train.microbatches, dp, f"this mesh ({mesh.size} devices)")
