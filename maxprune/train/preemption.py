"""Stop requests: SIGTERM (a TPU maintenance notice, a scheduler) or Ctrl-C during training.

While the training loop runs, the first SIGTERM or SIGINT only sets a flag; the
loop sees it at the next step boundary, saves a checkpoint and stops (bounded
by one step plus one checkpoint write). A second signal stops at once, as if
no handler were installed. Outside the loop the signals keep their default
effect: everything else writes to a staging dir, so being killed loses nothing.

Across hosts, stopping must happen at the same step everywhere, so a
multi-process job asks JAX's preemption sync service instead (through orbax's
`reached_preemption`), which JAX arms for SIGTERM at `jax.distributed.initialize`.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
from tqdm.auto import tqdm

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """Context manager; `requested(step)` says whether to checkpoint and stop after `step`."""

    def __init__(self, checkpointer):
        self._ckpt = checkpointer
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._multiprocess = jax.process_count() > 1

    def __enter__(self) -> StopRequests:
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # the second request: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        tqdm.write(f"maxprune: {signal.Signals(signum).name} received: saving a checkpoint after this step, "
                   f"then stopping (send it again to stop at once)")

    def requested(self, step: int) -> bool:
        if self._multiprocess:
            if self._ckpt.reached_preemption(step):
                self.signum = signal.SIGTERM
        return self.signum is not None
