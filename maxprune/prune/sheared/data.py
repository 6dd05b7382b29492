"""Sheared LLaMA's training tokens: a prepared dataset through the grain loader, or calibration cycled.

`token_stream` yields global batches for the mask-learning steps (and what
they are, for the report); `place_batch` puts one on the step's batch sharding.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from maxprune.data.loader import make_loader
from maxprune.data.prepared import open_prepared
from maxprune.errors import MaxpruneError
from maxprune.model.arch import Arch
from maxprune.prune.engine.activations import check_calibration


@dataclasses.dataclass
class Stream:
    """Global batches of mask-learning tokens, and what they are (for the report)."""

    batches: Iterator[np.ndarray]
    seq_len: int
    info: dict
    close: Any = lambda: None


def token_stream(p, calibration_NL, arch: Arch) -> Stream:
    """A prepared ``prune.calibration`` dir through the grain loader, else the calibration tokens cycled."""
    c = p.sheared_llama
    if p.calibration and Path(p.calibration).is_dir():
        return _prepared_stream(p, arch)
    if calibration_NL is None:
        raise MaxpruneError("sheared_llama learns its masks on training tokens: set prune.calibration (a prepared "
                            "dataset dir, or calibration tokens to cycle through)")
    tokens = check_calibration(calibration_NL, arch)
    n = tokens.shape[0]

    def cycle():
        for step in range(2**62):
            yield tokens[(step * c.global_batch + np.arange(c.global_batch)) % n]

    return Stream(cycle(), tokens.shape[1], {"kind": "calibration", "sequences": n})


def _prepared_stream(p, arch: Arch) -> Stream:
    ds = open_prepared(p.calibration)
    if ds.manifest.tokenizer["vocab_size"] > arch.vocab_size:
        raise MaxpruneError(f"prune.calibration={p.calibration} uses a tokenizer of "
                            f"{ds.manifest.tokenizer['vocab_size']} ids but the model's vocab_size is "
                            f"{arch.vocab_size}")
    seq_len = min(p.seq_len or ds.seq_len, ds.seq_len)
    # Every process reads the whole global batch (a few MB at most) and places its shards: one data order.
    loader = make_loader(ds, [(0, len(ds))], global_batch=p.sheared_llama.global_batch, seed=p.seed,
                         num_epochs=None, process_index=0, process_count=1)
    return Stream((batch[:, :seq_len] for batch in loader), seq_len,
                  {"kind": "prepared", "path": str(Path(p.calibration).absolute()), "sequences": len(ds)},
                  loader.close)


def place_batch(batch_BL: np.ndarray, batch_sharding):
    """The global batch as a jax.Array; each process fills its own shards from the same host batch."""
    if batch_sharding is None:
        return jnp.asarray(batch_BL)
    return jax.make_array_from_callback(batch_BL.shape, batch_sharding, lambda index: batch_BL[index])
