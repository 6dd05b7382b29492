"""How the engine's layer loop runs (not what it decides): `EngineOptions` and their defaults.

`run_options` sets defaults for every `EngineOptions` built inside it (the
caller says compute dtype, progress and donation once); `options_for` builds
the options of one run from the ``prune`` config section, those defaults and
explicit changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

from maxprune.config import at_least, choice
from maxprune.errors import MaxpruneError
from maxprune.model import llama

ORDERS = ("reference", "sequential")


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How the layer loop runs (not what it decides)."""

    batch_size: int = 8            # calibration sequences per jitted forward
    order: str = "reference"       # see `ORDERS`
    dtype: str = "float32"         # compute dtype of the layer passes and the stored activations
    progress: bool = True          # tqdm bar over layers
    donate: bool = False           # may reuse the caller's stacked params buffers (saves a copy)
    reconstruction: bool = True    # measure per-linear relative reconstruction errors
    error_samples: int = 8         # ... on the first this many calibration sequences (whole batches; 0: none)
    desc: str = "prune"            # progress bar label

    def __post_init__(self):
        at_least("prune.batch_size", self.batch_size, 1)
        if self.error_samples < 0:
            raise MaxpruneError(f"prune.error_samples={self.error_samples} must be >= 0 (0: no reconstruction "
                                f"errors)")
        choice("prune.order", self.order, ORDERS)
        llama.ModelOptions(dtype=self.dtype)  # validates the dtype

    @property
    def model_options(self) -> llama.ModelOptions:
        return llama.ModelOptions(dtype=self.dtype)


_DEFAULTS: contextvars.ContextVar[dict] = contextvars.ContextVar("maxprune_engine_defaults", default={})


@contextlib.contextmanager
def run_options(**defaults) -> Iterator[None]:
    """Defaults for every `EngineOptions` built inside (e.g. by a registered pruner).

    Why: the pruner signature is ``fn(params, arch, calibration_NL, cfg)``; the
    caller (`maxprune.prune.run`) still needs to say how to run — compute dtype
    from ``cfg.model.dtype``, progress on/off, donate the freshly loaded params —
    without every method threading those through.
    """
    token = _DEFAULTS.set({**_DEFAULTS.get(), **defaults})
    try:
        yield
    finally:
        _DEFAULTS.reset(token)


def options_for(prune_cfg=None, **changes) -> EngineOptions:
    """EngineOptions from the `prune` config section (batch_size, order, error_samples), `run_options` and `changes`."""
    values = dict(_DEFAULTS.get())
    if prune_cfg is not None:
        values.update(batch_size=prune_cfg.batch_size, order=prune_cfg.order, desc=prune_cfg.method)
        if "error_samples" in prune_cfg:
            values.update(error_samples=prune_cfg.error_samples)
    values.update(changes)
    return EngineOptions(**values)
