"""Training checkpoints with orbax: train state + data-iterator state + run metadata.

A checkpoint holds everything a run needs to continue bit-exactly: params,
optimizer state and step (one sharded pytree), the loader's iterator state and
the run's fingerprint (Arch, mask hash, config) as JSON. Saves are async; the
manager keeps the last `keep` checkpoints. Orbax writes each checkpoint into a
temporary dir and renames it when complete, so a process killed mid-write
leaves the previous checkpoint as the latest; the leftover temporary dir is
removed when the next run opens the directory. Restoring places every array
straight into the sharding of an abstract target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from maxprune.errors import MaxpruneError


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

    def read_meta(self, step: int | None = None) -> dict:
        step = self._require_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of `step` (default: latest), sharded like `abstract_state`."""
        step = self._require_step(step)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            older = [s for s in self.all_steps() if s < step]
            hint = f"delete it to resume from step {older[-1]}" if older else "delete it to start over"
            raise MaxpruneError(f"checkpoint {self.directory / str(step)} cannot be restored "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
                                f"{hint}") from None
        return out["state"], out["data"], out["meta"]

    def reached_preemption(self, step: int) -> bool:
        """Multi-host: whether JAX's preemption sync service says to save and stop at `step`."""
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def _require_step(self, step):
        step = self.latest_step() if step is None else step
        if step is None:
            raise MaxpruneError(f"no checkpoint in {self.directory}")
        return step


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying `shardings`: the target orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
