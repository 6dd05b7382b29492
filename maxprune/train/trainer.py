"""The trainer: one loop for pretraining, retraining, scratch and sparse-scratch runs.

A run lives in a run dir::

    checkpoints/      orbax: train state + loader state + run fingerprint, every K steps
    metrics.jsonl     one line per logged step / validation
    tensorboard/      the same scalars for TensorBoard
    sweep.json        the LR sweep's table and choice (when a sweep ran)
    run.json          status (running / stopped / complete), steps, tokens seen
    model/            the model dir written at the end

Starting a run whose dir holds checkpoints resumes from the latest one, after
checking that the Arch, masks, data and recipe are the ones it was started
with. The step is deterministic (no dropout, a seeded data order), so a resumed
run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from maxprune import locks, sharding
from maxprune.config import arch_from_config, to_dict
from maxprune.data import budgets as budgets_lib
from maxprune.data.loader import data_shard, make_loader, to_global_array
from maxprune.data.prepare import open_prepared
from maxprune.errors import Diverged, MaxpruneError, Stopped
from maxprune.model import llama
from maxprune.model import masks as masks_lib
from maxprune.model.arch import Arch
from maxprune.model.model_dir import MASKS_DIR, load_model_dir, read_arch, read_provenance, save_model_dir
from maxprune.train import checkpoint as ckpt_lib
from maxprune.train import metrics as metrics_lib
from maxprune.train import optimizer as opt_lib
from maxprune.train import preemption
from maxprune.train.step import Teacher, TrainState, init_state, make_train_step

MODEL_SUBDIR = "model"
# Fingerprint fields that must not change when a run resumes.
FINGERPRINT_KEYS = ("arch", "masks_hash", "init", "steps", "global_batch", "seq_len", "lr",
                    "data_ranges", "seed", "microbatches")


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    model_dir: Path | None
    status: str  # "complete" or "stopped"
    steps: int
    tokens_seen: int
    lr: float
    final_loss: float | None
    validation_loss: float | None


# ------------------------------------------------------------------- setup
@dataclasses.dataclass
class _Setup:
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
        if cfg.train.init:
            raise MaxpruneError("set train.init or train.masks_from, not both: masks_from trains a "
                                "random init under another model's masks (sparse scratch)")
        donor = load_model_dir(cfg.train.masks_from, mesh)
        if donor.arch != arch:
            raise MaxpruneError(f"train.masks_from={cfg.train.masks_from} has Arch {_arch_diff(donor.arch, arch)} "
                                f"that differs from the model's")
        if donor.masks is None:
            raise MaxpruneError(f"train.masks_from={cfg.train.masks_from} has no masks")
        masks, parent = donor.masks, {"masks_from": str(donor.path)}
    return arch, masks_lib.apply_masks(params, masks), masks, parent


def init_sharded(arch: Arch, rng, mesh):
    """Random init computed directly in its sharding on `mesh` (never whole on one device)."""
    shardings = sharding.tree_shardings(llama.abstract_params(arch), mesh)
    return jax.jit(lambda r: llama.init_params(arch, r), out_shardings=shardings)(rng)


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
    if cfg.train.global_batch % dp:
        raise MaxpruneError(f"train.global_batch={cfg.train.global_batch} is not divisible by the "
                            f"data-parallel size data x fsdp = {dp}")
    if cfg.train.global_batch % cfg.train.microbatches:
        raise MaxpruneError(f"train.global_batch={cfg.train.global_batch} is not divisible by "
                            f"train.microbatches={cfg.train.microbatches}")


def _resolve_teacher(cfg, arch: Arch, mesh):
    if not cfg.train.teacher:
        return None, None
    md = load_model_dir(cfg.train.teacher, mesh)
    _check_teacher_vocab(cfg.train.teacher, md.arch, arch)
    teacher = Teacher(md.arch, cfg.train.kd_weight, cfg.train.kd_temperature)
    return teacher, masks_lib.apply_masks(md.params, md.masks)


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


def _check_teacher_vocab(path, teacher: Arch, student: Arch) -> None:
    if teacher.vocab_size != student.vocab_size:
        raise MaxpruneError(f"train.teacher={path} has vocab_size {teacher.vocab_size} but the "
                            f"student has {student.vocab_size}; distillation needs the same vocabulary")


def setup(cfg) -> _Setup:
    mesh = sharding.make_mesh(cfg.mesh)
    _check_batch(cfg, mesh)
    arch, params, masks, parent = _resolve_model(cfg, mesh)
    ds = _resolve_data(cfg, arch, parent)
    steps, tokens, plan = _plan_steps(cfg, ds)
    teacher, teacher_params = _resolve_teacher(cfg, arch, mesh)
    return _Setup(mesh, arch, params, masks, parent, ds, plan, steps, ds.seq_len, tokens,
                  teacher, teacher_params)


# ----------------------------------------------------------------- helpers
def masks_hash(masks) -> str | None:
    if not masks:
        return None
    digest = hashlib.sha256()
    for block, name, mask in masks_lib.iter_masks(masks):
        digest.update(f"{block}/{name}".encode())
        digest.update(np.packbits(_fetch(mask)).tobytes())
    return digest.hexdigest()[:16]


def _fetch(x) -> np.ndarray:
    """The whole array on this host, also when its shards live on other hosts' devices."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _arch_diff(a: Arch, b: Arch) -> str:
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}={da[k]} vs {db[k]}" for k in da if da[k] != db[k]) or "(equal)"


def _fingerprint(cfg, s: _Setup, lr: float) -> dict:
    return {"arch": s.arch.to_dict(), "masks_hash": masks_hash(s.masks), "init": cfg.train.init,
            "steps": s.steps, "global_batch": cfg.train.global_batch, "seq_len": s.seq_len, "lr": lr,
            "data_ranges": [list(r) for r in s.plan.ranges], "seed": cfg.seed,
            "microbatches": cfg.train.microbatches}


def _check_resume(saved: dict, current: dict, run_dir: Path) -> None:
    for key in FINGERPRINT_KEYS:
        if saved.get(key) != current.get(key):
            if key == "arch":
                what = _arch_diff(Arch.from_dict(saved["arch"]), Arch.from_dict(current["arch"]))
            else:
                what = f"{saved.get(key)!r} vs now {current.get(key)!r}"
            raise MaxpruneError(f"run dir {run_dir} holds checkpoints of a different run ({key}: {what}); "
                                f"use a new run dir or delete its checkpoints")


def _write_status(run_dir: Path, record: dict) -> None:
    if jax.process_index() == 0:
        tmp = run_dir / "run.json.tmp"
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        tmp.replace(run_dir / "run.json")


def read_status(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ------------------------------------------------------------------- steps
def _compile_step(cfg, s: _Setup, optimizer, schedule, state):
    options = llama.ModelOptions.from_config(cfg.model)
    step_fn = make_train_step(s.arch, options, optimizer, schedule,
                              microbatches=cfg.train.microbatches, teacher=s.teacher)
    state_sh = sharding.tree_shardings(state, s.mesh)
    masks_sh = sharding.tree_shardings(s.masks, s.mesh) if s.masks else None
    teacher_sh = sharding.tree_shardings(s.teacher_params, s.mesh) if s.teacher else None
    return jax.jit(step_fn, in_shardings=(state_sh, sharding.batch_sharding(s.mesh), masks_sh, teacher_sh),
                   out_shardings=(state_sh, None), donate_argnums=0), state_sh


def make_eval_fn(arch: Arch, options: llama.ModelOptions):
    """jitted (params, masks, tokens_BL) -> sum of next-token NLL over the batch."""
    def eval_fn(params, masks, tokens_BL):
        logits = llama.forward(params, tokens_BL, arch, masks, options)
        return llama.next_token_loss(logits, tokens_BL) * (tokens_BL.shape[0] * (tokens_BL.shape[1] - 1))
    return jax.jit(eval_fn)


def validation_loss(cfg, s: _Setup, params) -> float | None:
    """Mean next-token loss on the first `train.eval_sequences` of the validation set."""
    if not cfg.data.validation:
        return None
    ds = open_prepared(cfg.data.validation)
    ds.check_tokenizer(s.dataset.manifest.tokenizer["hash"])
    n = min(cfg.train.eval_sequences, len(ds))
    batch = cfg.train.global_batch
    eval_fn = make_eval_fn(s.arch, llama.ModelOptions.from_config(cfg.model))
    total, count = 0.0, 0
    with sharding.use_mesh(s.mesh):
        for start in range(0, n - n % batch or n, batch):
            tokens = np.stack([ds[i] for i in range(start, min(start + batch, n))])
            if tokens.shape[0] % (s.mesh.shape["data"] * s.mesh.shape["fsdp"]):
                break
            nll = eval_fn(params, s.masks, jax.device_put(tokens, sharding.batch_sharding(s.mesh)))
            total, count = total + float(nll), count + tokens.shape[0] * (tokens.shape[1] - 1)
    return total / count if count else None


# -------------------------------------------------------------------- loop
def run(cfg, run_dir: str | Path, *, lr: float | None = None, max_steps: int | None = None,
        write_model: bool = True, progress: bool = True) -> TrainResult:
    """Train (or resume) the run in `run_dir` to its token budget, or to `max_steps` steps.

    One process at a time may train in a run dir (`maxprune.locks`). SIGTERM or
    SIGINT saves a checkpoint and raises `Stopped`; a non-finite loss or gradient
    (past `train.skip_nonfinite` in a row) raises `Diverged`, keeping the last
    good checkpoint.
    """
    run_dir = Path(run_dir).absolute()
    done = read_status(run_dir)
    if done.get("status") == "complete" and (run_dir / MODEL_SUBDIR).exists():
        return TrainResult(run_dir, run_dir / MODEL_SUBDIR, "complete", done["steps"], done["tokens_seen"],
                           done["lr"], done.get("final_loss"), done.get("validation_loss"))
    check(cfg)  # a mistake leaves nothing behind, not even the run dir
    with locks.dir_lock(run_dir, f"run dir {run_dir}"):
        return _run_locked(cfg, run_dir, lr, max_steps, write_model, progress)


def _run_locked(cfg, run_dir: Path, lr, max_steps, write_model, progress) -> TrainResult:
    lr = cfg.train.lr if lr is None else lr
    s = setup(cfg)
    schedule = opt_lib.make_schedule(lr, s.steps, cfg.train.warmup_ratio, cfg.train.min_lr_ratio)
    optimizer = opt_lib.make_optimizer(cfg.train, s.steps, lr)
    with sharding.use_mesh(s.mesh):
        state = init_state(s.params, optimizer)
        step_fn, state_sh = _compile_step(cfg, s, optimizer, schedule, state)
    fingerprint = _fingerprint(cfg, s, lr)
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                                 async_save=cfg.train.async_checkpoint)
    p_index, p_count = data_shard(s.mesh)
    loader = make_loader(s.dataset, s.plan.ranges, global_batch=cfg.train.global_batch, seed=cfg.seed,
                         num_epochs=s.plan.epochs,
                         process_index=p_index, process_count=p_count, workers=cfg.data.workers)
    try:
        if ckpt.latest_step() is not None:
            _check_resume(ckpt.read_meta(), fingerprint, run_dir)
            abstract = ckpt_lib.abstract_like(state, state_sh)
            state, data_state, _ = ckpt.restore(abstract)
            loader.set_state(data_state)
        if jax.process_index() == 0:  # rows logged after the checkpoint will be logged again
            metrics_lib.drop_after(run_dir, int(state.step))
        writer = metrics_lib.MetricsWriter(run_dir, cfg.train.tensorboard)
        try:
            with preemption.StopRequests(ckpt) as stop:
                loop = _Loop(cfg, s, step_fn, loader, ckpt, fingerprint, writer, run_dir, stop)
                state = loop.run(state, max_steps, progress)
            ckpt.wait()
        except Diverged:
            _write_status(run_dir, {"status": "diverged", "steps": loop.failed_step, "total_steps": s.steps,
                                    "last_checkpoint": loop.last_saved})
            raise
        finally:
            writer.close()
    finally:
        loader.close()
        ckpt.close()
    step = int(state.step)
    tokens_seen = step * cfg.train.global_batch * s.seq_len
    record = {"steps": step, "total_steps": s.steps, "tokens_seen": tokens_seen,
              "tokens_requested": s.tokens_requested, "lr": lr, "final_loss": loop.last_loss}
    if stop.signum is not None and step < s.steps:
        _write_status(run_dir, {**record, "status": "preempted"})
        name = signal.Signals(stop.signum).name
        raise Stopped(f"{name}: saved checkpoint step {step} of {s.steps} in {ckpt.directory}; "
                      f"run the same command to resume", stop.signum)
    result = TrainResult(run_dir, None, "stopped" if step < s.steps else "complete", step, tokens_seen, lr,
                         loop.last_loss, None)
    if result.status == "complete":
        with sharding.use_mesh(s.mesh):
            result.validation_loss = validation_loss(cfg, s, state.params)
        if result.validation_loss is not None:
            _write_validation(run_dir, step, result.validation_loss, cfg.train.tensorboard)
        if write_model:
            result.model_dir = _save_model(cfg, s, state, run_dir, tokens_seen, lr)
    _write_status(run_dir, {**record, "status": result.status, "validation_loss": result.validation_loss})
    return result


def _write_validation(run_dir: Path, step: int, loss: float, tensorboard: bool) -> None:
    writer = metrics_lib.MetricsWriter(run_dir, tensorboard)
    writer.write(step, {"loss": loss}, kind="validation")
    writer.close()


class _Loop:
    """The step loop: logging, checkpoints, validation, finiteness checks, stop requests."""

    def __init__(self, cfg, s: _Setup, step_fn, loader, ckpt, fingerprint, writer, run_dir: Path, stop):
        self.cfg, self.s, self.step_fn, self.loader, self.ckpt = cfg, s, step_fn, loader, ckpt
        self.fingerprint, self.writer, self.run_dir, self.stop = fingerprint, writer, run_dir, stop
        self.last_loss: float | None = None
        self.last_saved = ckpt.latest_step()
        self.failed_step: int | None = None
        self._nonfinite_in_a_row = 0

    def run(self, state, max_steps: int | None, progress: bool):
        """Steps until the budget (or `max_steps`, or `train.stop_after_steps` in this call, or a stop request)."""
        cfg, s = self.cfg, self.s
        start = int(state.step)
        end = s.steps if max_steps is None else min(s.steps, max_steps)
        if cfg.train.stop_after_steps:
            end = min(end, start + cfg.train.stop_after_steps)
        tokens_per_step = cfg.train.global_batch * s.seq_len
        flops_per_token = s.arch.train_flops_per_token(s.seq_len)
        peak, _ = metrics_lib.device_peak()
        bar = tqdm(total=s.steps, initial=start, desc=self.run_dir.name,
                   disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
        window_start, window_steps, pending = time.perf_counter(), 0, None
        _write_status(self.run_dir, {"status": "running", "steps": start, "total_steps": s.steps})
        with sharding.use_mesh(s.mesh):
            for step in range(start, end):
                if self.stop.requested(step):
                    break
                batch = to_global_array(next(self.loader), s.mesh)
                state, metrics = self.step_fn(state, batch, s.masks, s.teacher_params)
                window_steps += 1
                done = step + 1
                if pending is not None:  # one step behind, so the host never stalls the device
                    self._check_finite(*pending)
                pending = (done, metrics)
                if done % cfg.train.log_every == 0 or done == end:
                    self._check_finite(*pending)
                    pending = None
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    elapsed = time.perf_counter() - window_start
                    tps = window_steps * tokens_per_step / elapsed
                    values.update(tokens_per_s=tps, step_time_s=elapsed / window_steps,
                                  mfu=metrics_lib.mfu(tps, flops_per_token, s.mesh.devices.size, peak),
                                  tokens_seen=done * tokens_per_step)
                    self.writer.write(done, values)
                    self.last_loss = values["loss"]
                    bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{values['lr']:.2e}")
                    window_start, window_steps = time.perf_counter(), 0
                bar.update(1)
                if done % cfg.train.checkpoint_every == 0 or done == end:
                    if pending is not None:  # never save a state that a non-finite update produced
                        self._check_finite(*pending)
                        pending = None
                    self._save(done, state, force=done == end)
                if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != end:
                    self.writer.write(done, {"loss": validation_loss(cfg, s, state.params)}, kind="validation")
            if pending is not None:
                self._check_finite(*pending)
            if self.stop.signum is not None and int(state.step) != self.last_saved:
                self._save(int(state.step), state, force=True)
        bar.close()
        return state

    def _save(self, step: int, state, force: bool) -> None:
        self.ckpt.save(step, state, self.loader.get_state(), self.fingerprint, force=force)
        self.last_saved = step

    def _check_finite(self, step: int, metrics) -> None:
        loss, grad_norm = (float(metrics[k]) for k in ("loss", "grad_norm"))
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self._nonfinite_in_a_row = 0
            return
        self._nonfinite_in_a_row += 1
        limit = self.cfg.train.skip_nonfinite
        if self._nonfinite_in_a_row > limit:
            self.failed_step = step
            self.ckpt.wait()
            kept = (f"the last good checkpoint is step {self.last_saved} in {self.ckpt.directory}"
                    if self.last_saved is not None else "no checkpoint was saved before it")
            skipped = f" after {limit} skipped in a row" if limit else ""
            raise Diverged(f"loss {loss} / gradient norm {grad_norm} at step {step}{skipped}; {kept}; "
                           f"lower train.lr or raise train.skip_nonfinite")
        tqdm.write(f"maxprune: step {step}: loss {loss}, gradient norm {grad_norm}: update skipped "
                   f"({self._nonfinite_in_a_row} of at most {limit} in a row)")


def _save_model(cfg, s: _Setup, state: TrainState, run_dir: Path, tokens_seen: int, lr: float) -> Path:
    tok = s.dataset.manifest.tokenizer
    provenance = {**s.parent, "method": "train", "tokens_seen": tokens_seen, "lr": lr,
                  "steps": int(state.step), "data": str(s.dataset.path), "data_ranges": [list(r) for r in s.plan.ranges],
                  "tokenizer_hash": tok["hash"], "masks_hash": masks_hash(s.masks), "config": to_dict(cfg)}
    tokenizer_dir = _tokenizer_dir(cfg, s)
    return save_model_dir(run_dir / MODEL_SUBDIR, s.arch, state.params, s.masks, provenance,
                          overwrite=True, tokenizer_dir=tokenizer_dir)


def _tokenizer_dir(cfg, s: _Setup):
    """Tokenizer files to ship with the model: the parent's, else the dataset's if it kept them."""
    if cfg.train.init:
        tok = Path(cfg.train.init) / "tokenizer"
        if tok.is_dir():
            return tok
    tok = Path(s.dataset.path) / "tokenizer"
    return tok if tok.is_dir() else None


# ------------------------------------------------------------------- sweep
def sweep(cfg, run_dir: str | Path, progress: bool = True) -> tuple[float, list[dict]]:
    """The paper's LR protocol: a short prefix run per LR, keep the lowest training loss.

    Each prefix run is the first `train.sweep_fraction` of the full run's steps
    (same schedule), in its own resumable dir under `run_dir/sweep/`. The
    loss compared is the mean of the logged losses over the prefix's last 20 %.
    """
    run_dir = Path(run_dir).absolute()
    table_file = run_dir / "sweep.json"
    if table_file.exists():
        saved = json.loads(table_file.read_text())
        return saved["chosen_lr"], saved["table"]
    s = setup(cfg)
    prefix = max(1, math.ceil(s.steps * cfg.train.sweep_fraction))
    table = []
    for lr in cfg.train.lr_sweep:
        sub = run_dir / "sweep" / f"lr_{lr:g}"
        result = run(cfg, sub, lr=lr, max_steps=prefix, write_model=False, progress=progress)
        losses = [r["loss"] for r in metrics_lib.read_metrics(sub, "train") if r["step"] <= prefix]
        tail = losses[-max(1, len(losses) // 5):]
        # Only process 0 writes metrics.jsonl: every process takes its number, so all pick one LR.
        loss = float(multihost_utils.broadcast_one_to_all(np.float32(np.mean(tail) if tail else np.nan)))
        table.append({"lr": lr, "prefix_steps": prefix, "loss": loss,
                      "final_loss": result.final_loss})
    finite = [row for row in table if math.isfinite(row["loss"])]
    if not finite:
        raise MaxpruneError(f"every LR of train.lr_sweep={list(cfg.train.lr_sweep)} diverged")
    chosen = min(finite, key=lambda row: row["loss"])["lr"]
    if jax.process_index() == 0:
        table_file.write_text(json.dumps({"chosen_lr": chosen, "table": table}, indent=2) + "\n")
    return chosen, table


def train(cfg, run_dir: str | Path, progress: bool = True) -> TrainResult:
    """The `maxprune train` job: optional LR sweep, then the full run with the chosen LR."""
    lr = None
    if cfg.train.lr_sweep:
        lr, _ = sweep(cfg, run_dir, progress)
    return run(cfg, run_dir, lr=lr, progress=progress)
