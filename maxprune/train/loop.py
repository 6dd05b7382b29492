"""The step loop of a run: steps, logging, checkpoints, validation, finiteness checks, stop requests.

Each step's loss and gradient norm are checked one step behind, so the host
never stalls the device; a checkpoint is only saved once the steps before it
are known finite. Past `train.skip_nonfinite` non-finite steps in a row the
loop raises `Diverged`, naming the step and the last good checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from maxprune import sharding
from maxprune.data.loader import to_global_array
from maxprune.errors import Diverged
from maxprune.train import metrics as metrics_lib
from maxprune.train.run_dir import write_status
from maxprune.train.setup import Setup
from maxprune.train.validation import validation_loss


class Loop:
    """The step loop: logging, checkpoints, validation, finiteness checks, stop requests."""

    def __init__(self, cfg, s: Setup, step_fn, loader, ckpt, fingerprint, writer, run_dir: Path, stop):
        self.cfg, self.s, self.step_fn, self.loader, self.ckpt = cfg, s, step_fn, loader, ckpt
        self.fingerprint, self.writer, self.run_dir, self.stop = fingerprint, writer, run_dir, stop
        self.last_loss: float | None = None
        self.last_saved = ckpt.latest_step()
        self.failed_step: int | None = None
        self._nonfinite_in_a_row = 0
        self._pending = None  # (step, metrics) not yet checked for finiteness

    def run(self, state, max_steps: int | None, progress: bool):
        """Steps until the budget (or `max_steps`, or `train.stop_after_steps` in this call, or a stop request)."""
        s = self.s
        start = int(state.step)
        end = self._end(start, max_steps)
        self._tokens_per_step = self.cfg.train.global_batch * s.seq_len
        self._flops_per_token = s.arch.train_flops_per_token(s.seq_len)
        self._peak, _ = metrics_lib.device_peak()
        self._bar = tqdm(total=s.steps, initial=start, desc=self.run_dir.name,
                         disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
        self._window_start, self._window_steps, self._pending = time.perf_counter(), 0, None
        write_status(self.run_dir, {"status": "running", "steps": start, "total_steps": s.steps})
        with sharding.use_mesh(s.mesh):
            for step in range(start, end):
                if self.stop.requested(step):
                    break
                state = self._step(state, step + 1, end)
            self._check_pending()
            if self.stop.signum is not None and int(state.step) != self.last_saved:
                self._save(int(state.step), state, force=True)
        self._bar.close()
        return state

    def _end(self, start: int, max_steps: int | None) -> int:
        train = self.cfg.train
        end = self.s.steps if max_steps is None else min(self.s.steps, max_steps)
        if train.stop_after_steps:
            end = min(end, start + train.stop_after_steps)
        return end

    def _step(self, state, done: int, end: int):
        """One step (the `done`-th), then its logging, checkpoint and validation when due."""
        cfg, s = self.cfg, self.s
        batch = to_global_array(next(self.loader), s.mesh)
        state, metrics = self.step_fn(state, batch, s.masks, s.teacher_params)
        self._window_steps += 1
        self._check_pending()  # one step behind, so the host never stalls the device
        self._pending = (done, metrics)
        if done % cfg.train.log_every == 0 or done == end:
            self._check_pending()
            self._log(done, metrics)
        self._bar.update(1)
        if done % cfg.train.checkpoint_every == 0 or done == end:
            self._check_pending()  # never save a state that a non-finite update produced
            self._save(done, state, force=done == end)
        if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != end:
            self.writer.write(done, {"loss": validation_loss(cfg, s, state.params)}, kind="validation")
        return state

    def _log(self, done: int, metrics) -> None:
        """Write the step's metrics with the throughput of the steps since the last log."""
        s = self.s
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        elapsed = time.perf_counter() - self._window_start
        tps = self._window_steps * self._tokens_per_step / elapsed
        values.update(tokens_per_s=tps, step_time_s=elapsed / self._window_steps,
                      mfu=metrics_lib.mfu(tps, self._flops_per_token, s.mesh.devices.size, self._peak),
                      tokens_seen=done * self._tokens_per_step)
        self.writer.write(done, values)
        self.last_loss = values["loss"]
        self._bar.set_postfix(loss=f"{self.last_loss:.3f}", lr=f"{values['lr']:.2e}")
        self._window_start, self._window_steps = time.perf_counter(), 0

    def _save(self, step: int, state, force: bool) -> None:
        self.ckpt.save(step, state, self.loader.get_state(), self.fingerprint, force=force)
        self.last_saved = step

    def _check_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._check_finite(*pending)

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
