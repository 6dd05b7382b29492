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

This module is the entry (`train` = optional `sweep`, then `run`); a run's flow is

    setup.py       check + setup: model, masks, data plan, teacher, resolved and checked
    (here)         the jitted step, the checkpointer and loader, restore on resume
    loop.py        the step loop: logging, checkpoints, validation, finiteness, stop requests
    validation.py  the validation loss
    run_dir.py     the run fingerprint and resume check, run.json, the final model dir
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from maxprune import sharding
from maxprune.data.loader import data_shard, make_loader
from maxprune.errors import Diverged, MaxpruneError, Stopped
from maxprune.fs import locks
from maxprune.train import build, preemption
from maxprune.train import checkpoint as ckpt_lib
from maxprune.train import metrics as metrics_lib
from maxprune.train import optimizer as opt_lib
from maxprune.train.loop import Loop
from maxprune.train.run_dir import (
    MODEL_SUBDIR,
    check_resume,
    fingerprint,
    read_status,
    save_model,
    write_status,
)
from maxprune.train.setup import Setup, check, setup
from maxprune.train.step import init_state
from maxprune.train.validation import validation_loss, write_validation


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


def train(cfg, run_dir: str | Path, progress: bool = True) -> TrainResult:
    """The `maxprune train` job: optional LR sweep, then the full run with the chosen LR."""
    lr = None
    if cfg.train.lr_sweep and not _finished(read_status(run_dir), run_dir):  # a finished run needs no sweep
        try:
            lr, _ = sweep(cfg, run_dir, progress)
        except SweepUnfinished as e:  # train.stop_after_steps ran out inside a trial
            return e.result
    return run(cfg, run_dir, lr=lr, progress=progress)


# --------------------------------------------------------------------- run
def run(cfg, run_dir: str | Path, *, lr: float | None = None, max_steps: int | None = None,
        schedule_steps: int | None = None, write_model: bool = True, progress: bool = True) -> TrainResult:
    """Train (or resume) the run in `run_dir` to its token budget, or to `max_steps` steps.

    The LR schedule spans `schedule_steps` steps (default: the run's; a
    compressed sweep trial passes its own prefix length). It is part of the
    run's fingerprint, so a resume keeps the schedule it started with.

    One process at a time may train in a run dir (`maxprune.fs.locks`). SIGTERM or
    SIGINT saves a checkpoint and raises `Stopped`; a non-finite loss or gradient
    (past `train.skip_nonfinite` in a row) raises `Diverged`, keeping the last
    good checkpoint.
    """
    run_dir = Path(run_dir).absolute()
    done = read_status(run_dir)
    if _finished(done, run_dir):
        return TrainResult(run_dir, run_dir / MODEL_SUBDIR, "complete", done["steps"], done["tokens_seen"],
                           done["lr"], done.get("final_loss"), done.get("validation_loss"))
    check(cfg)  # a mistake leaves nothing behind, not even the run dir
    with locks.dir_lock(run_dir, f"run dir {run_dir}"):
        return _run_locked(cfg, run_dir, lr, max_steps, schedule_steps, write_model, progress)


def _finished(status: dict, run_dir: Path) -> bool:
    return status.get("status") == "complete" and (Path(run_dir) / MODEL_SUBDIR).exists()


def _run_locked(cfg, run_dir: Path, lr, max_steps, schedule_steps, write_model, progress) -> TrainResult:
    lr = cfg.train.lr if lr is None else lr
    s = setup(cfg)
    schedule_steps = s.steps if schedule_steps is None else schedule_steps
    optimizer, schedule = build.optimizer_and_schedule(cfg.train, schedule_steps, lr)
    with sharding.use_mesh(s.mesh):
        state = init_state(s.params, optimizer)
        step = build.build_step(cfg, s.arch, s.mesh, state, optimizer, schedule, masks=s.masks, teacher=s.teacher,
                                teacher_params=s.teacher_params)
    step_fn, state_sh = step.fn, step.state_sharding
    run_fingerprint = fingerprint(cfg, s, lr, schedule_steps)
    ckpt = ckpt_lib.Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                                 async_save=cfg.train.async_checkpoint)
    p_index, p_count = data_shard(s.mesh)
    loader = make_loader(s.dataset, s.plan.ranges, global_batch=cfg.train.global_batch, seed=cfg.seed,
                         num_epochs=s.plan.epochs,
                         process_index=p_index, process_count=p_count, workers=cfg.data.workers)
    try:
        state = _restore(ckpt, loader, state, state_sh, run_fingerprint, run_dir)
        writer = metrics_lib.MetricsWriter(run_dir, cfg.train.tensorboard)
        try:
            with preemption.StopRequests(ckpt) as stop:
                loop = Loop(cfg, s, step_fn, loader, ckpt, run_fingerprint, writer, run_dir, stop)
                state = loop.run(state, max_steps, progress)
            ckpt.wait()
        except Diverged:
            write_status(run_dir, {"status": "diverged", "steps": loop.failed_step, "total_steps": s.steps,
                                   "last_checkpoint": loop.last_saved})
            raise
        finally:
            writer.close()
    finally:
        loader.close()
        ckpt.close()
    return _finish(cfg, s, run_dir, state, lr, loop.last_loss, stop.signum, ckpt.directory, write_model)


def _restore(ckpt, loader, state, state_sh, run_fingerprint: dict, run_dir: Path):
    """The latest checkpoint's state (and the loader's position), if the run dir holds one of this run."""
    if ckpt.latest_step() is not None:
        check_resume(ckpt.read_meta(), run_fingerprint, run_dir)
        abstract = ckpt_lib.abstract_like(state, state_sh)
        state, data_state, _ = ckpt.restore(abstract)
        loader.set_state(data_state)
    if jax.process_index() == 0:  # rows logged after the checkpoint will be logged again
        metrics_lib.drop_after(run_dir, int(state.step))
    return state


def _finish(cfg, s: Setup, run_dir: Path, state, lr: float, last_loss, signum, ckpt_dir,
            write_model: bool) -> TrainResult:
    """run.json and the result after the loop: preempted (raises `Stopped`), stopped, or complete
    (validation loss and the model dir)."""
    step = int(state.step)
    tokens_seen = step * cfg.train.global_batch * s.seq_len
    record = {"steps": step, "total_steps": s.steps, "tokens_seen": tokens_seen,
              "tokens_requested": s.tokens_requested, "lr": lr, "final_loss": last_loss}
    if signum is not None and step < s.steps:
        write_status(run_dir, {**record, "status": "preempted"})
        name = signal.Signals(signum).name
        raise Stopped(f"{name}: saved checkpoint step {step} of {s.steps} in {ckpt_dir}; "
                      f"run the same command to resume", signum)
    result = TrainResult(run_dir, None, "stopped" if step < s.steps else "complete", step, tokens_seen, lr,
                         last_loss, None)
    if result.status == "complete":
        with sharding.use_mesh(s.mesh):
            result.validation_loss = validation_loss(cfg, s, state.params)
        if result.validation_loss is not None:
            write_validation(run_dir, step, result.validation_loss, cfg.train.tensorboard)
        if write_model:
            result.model_dir = save_model(cfg, s, state, run_dir, tokens_seen, lr)
    write_status(run_dir, {**record, "status": result.status, "validation_loss": result.validation_loss})
    return result


# ------------------------------------------------------------------- sweep
# Where each schedule's trials live: "prefix" keeps the layout it always had.
SWEEP_DIRS = {"compressed": Path("sweep") / "compressed", "prefix": Path("sweep")}


class SweepUnfinished(Exception):
    """A trial stopped short of its prefix (`train.stop_after_steps`); `result` is its stopped run."""

    def __init__(self, result: TrainResult):
        super().__init__(f"sweep trial {result.run_dir} stopped at step {result.steps}")
        self.result = result


def sweep(cfg, run_dir: str | Path, progress: bool = True) -> tuple[float, list[dict]]:
    """The paper's LR protocol: a short prefix run per LR, keep the lowest training loss.

    Each trial trains the first `train.sweep_fraction` of the full run's steps
    (its batches), in its own resumable dir under `run_dir/sweep/`. Under
    `train.sweep_schedule="compressed"` a trial is a short run of its own:
    warmup and cosine decay of the recipe's shape over the prefix, so every
    trial reaches its peak LR. Under "prefix" it follows the full run's
    schedule, cut after the prefix (inside the warmup for a short prefix). The
    loss compared is the mean of the logged losses over the prefix's last 20 %;
    a trial that diverges loses. A trial that `train.stop_after_steps` stops
    short raises `SweepUnfinished` (no sweep.json yet: the next call resumes it).
    """
    run_dir = Path(run_dir).absolute()
    kind = cfg.train.sweep_schedule
    table_file = run_dir / "sweep.json"
    if table_file.exists():
        saved = json.loads(table_file.read_text())
        _check_saved_schedule(saved, kind, table_file)
        return saved["chosen_lr"], saved["table"]
    s = setup(cfg)
    prefix = max(1, math.ceil(s.steps * cfg.train.sweep_fraction))
    schedule_steps = prefix if kind == "compressed" else s.steps
    if kind == "compressed":
        _check_prefix_passes_warmup(cfg, prefix)
    table = [_trial(cfg, run_dir / SWEEP_DIRS[kind] / f"lr_{lr:g}", lr, prefix, schedule_steps, progress)
             for lr in cfg.train.lr_sweep]
    finite = [row for row in table if math.isfinite(row["loss"])]
    if not finite:
        raise MaxpruneError(f"every LR of train.lr_sweep={list(cfg.train.lr_sweep)} diverged")
    chosen = min(finite, key=lambda row: row["loss"])["lr"]
    if jax.process_index() == 0:
        record = {"schedule": kind, "chosen_lr": chosen, "table": table}
        table_file.write_text(json.dumps(record, indent=2) + "\n")
    return chosen, table


def _trial(cfg, sub: Path, lr: float, prefix: int, schedule_steps: int, progress: bool) -> dict:
    """One sweep trial's row: its tail loss, and the LRs it logged (peak and last)."""
    diverged_at = final_loss = None
    try:
        result = run(cfg, sub, lr=lr, max_steps=prefix, schedule_steps=schedule_steps, write_model=False,
                     progress=progress)
        final_loss = result.final_loss
        if result.steps < prefix:
            raise SweepUnfinished(result)
    except Diverged as e:
        diverged_at = read_status(sub).get("steps")
        if progress and jax.process_index() == 0:
            print(f"maxprune: sweep lr={lr:g} diverged: {e}")
    rows = [r for r in metrics_lib.read_metrics(sub, "train") if r["step"] <= prefix]
    tail = [r["loss"] for r in rows][-max(1, len(rows) // 5):]
    # Only process 0 writes metrics.jsonl: every process takes its number, so all pick one LR.
    loss = np.nan if diverged_at is not None or not tail else np.mean(tail)
    loss = float(multihost_utils.broadcast_one_to_all(np.float32(loss)))
    lrs = [r["lr"] for r in rows]
    return {"lr": lr, "prefix_steps": prefix, "schedule_steps": schedule_steps, "loss": loss,
            "final_loss": final_loss, "peak_lr": max(lrs, default=None), "final_lr": lrs[-1] if lrs else None,
            "diverged_at": diverged_at}


def _check_prefix_passes_warmup(cfg, prefix: int) -> None:
    warmup = opt_lib.warmup_steps(prefix, cfg.train.warmup_ratio)
    if warmup >= prefix:  # the peak is applied at step `warmup` (0-based), past the trial's last
        raise MaxpruneError(f"train.sweep_fraction={cfg.train.sweep_fraction} gives {prefix}-step sweep trials, "
                            f"too short to pass their {warmup}-step warmup (train.warmup_ratio="
                            f"{cfg.train.warmup_ratio}); raise train.sweep_fraction")


def _check_saved_schedule(saved: dict, kind: str, table_file: Path) -> None:
    made = saved.get("schedule", "prefix")  # sweep.json files older than the key were made with "prefix"
    if made != kind:
        raise MaxpruneError(f"{table_file} was made with train.sweep_schedule={made!r}, not {kind!r}: set "
                            f"train.sweep_schedule={made!r} to keep this run, or use a new run dir")
