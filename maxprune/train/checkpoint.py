"""Training checkpoints with orbax: train state + data-iterator state + run metadata.

A checkpoint holds everything a run needs to continue bit-exactly: params,
optimizer state and step (one sharded pytree), the loader's iterator state and
the run's fingerprint (Arch, mask hash, config) as JSON. Saves are async; the
manager keeps the last `keep` checkpoints. Restoring places every array
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
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
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
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

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
